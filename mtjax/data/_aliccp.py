"""Ali-CCP (Alibaba Click and Conversion Prediction, the ESMM paper's data) loaders: the raw
skeleton + common-features files, and the common processed CSV form."""

from __future__ import annotations

import array
import os
from typing import Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._dataset import _BadRows
from mtjax.data._dataset import _check_file
from mtjax.data._dataset import _check_on_bad_rows
from mtjax.data._dataset import _cut_hint
from mtjax.data._dataset import _lines
from mtjax.data._dataset import _map_to_ids
from mtjax.data._dataset import _no_rows
from mtjax.data._dataset import _open_text
from mtjax.data._dataset import _read_csv
from mtjax.data._dataset import _read_header
from mtjax.data._dataset import _RowError
from mtjax.data._dataset import _vocabulary
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

PathLike = Union[str, os.PathLike]

#: The 18 single-valued fields of the usual processed form (user side 101-129 from the common
#: features, ad side 205-853 and 301 from the skeleton).
ALICCP_FIELDS = (
  "101",
  "121",
  "122",
  "124",
  "125",
  "126",
  "127",
  "128",
  "129",
  "205",
  "206",
  "207",
  "216",
  "508",
  "509",
  "702",
  "853",
  "301",
)

#: The dense float columns of the widely shared processed CSVs (torch-rechub's ``ali_ccp_*.csv``);
#: :func:`aliccp_processed` reads every column named ``D<digit>...`` as dense by default.
ALICCP_PROCESSED_DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")

_ITEM, _FIELD, _VALUE = "\x01", "\x02", "\x03"


def _parse_feature_list(text: str, count: str, wanted: dict, out: list) -> None:
  """Fills ``out[j]`` with the first feature id of each wanted field (``field\\x02id\\x03value``).

  Raises:
    _RowError: ``count`` (the row's ``num_features``) is not the number of items (a row cut short),
      or a wanted item is not ``field\\x02id\\x03value`` with an integer id.
  """
  items = text.split(_ITEM) if text else []
  try:
    n = int(count)
  except ValueError:
    raise _RowError(f"column 'num_features' holds {count!r}, not an integer") from None
  if n != len(items):
    raise _RowError(f"num_features is {n} but the feature list has {len(items)} item(s) (a row cut short?)")
  for item in items:
    field, sep, rest = item.partition(_FIELD)
    j = wanted.get(field)
    if j is None or out[j] != -1:
      continue
    feat, sep_value, value = rest.partition(_VALUE)
    if not sep or not feat or not sep_value or not value:
      raise _RowError(f"feature item {item!r} is not 'field\\x02id\\x03value'")
    try:
      out[j] = int(feat)
    except ValueError:
      raise _RowError(f"feature item {item!r} has an id that is not an integer") from None


def _read_common(path: str, wanted: dict, on_bad_rows: str) -> dict:
  """``common_feature_index -> tuple of raw ids`` (-1 where the field is absent)."""
  table = {}
  bad = _BadRows(path, on_bad_rows)
  seen_line = False
  with _open_text(path) as fh:
    for line, text, complete in _lines(fh):
      if not text:
        continue
      seen_line = True
      parts = text.split(",", 2)
      if line == 1 and parts[0] == "common_feature_index":
        continue  # a header row
      ids = [-1] * len(wanted)
      try:
        if len(parts) != 3 or "," in parts[2]:
          raise _RowError(
            f"has {text.count(',') + 1} fields; expected 'common_feature_index,num_features,"
            f"feature_list'{_cut_hint(complete)}"
          )
        _parse_feature_list(parts[2], parts[1], wanted, ids)
      except _RowError as e:
        bad(line, str(e))
        continue
      table[parts[0]] = tuple(ids)
  if not seen_line:
    raise ValueError(f"mtjax: {path!r} line 1: the file is empty; expected Ali-CCP common features rows.")
  if not table:
    raise _no_rows(path, 2, bad)
  bad.warn()
  return table


def _read_skeleton(path: str, common: dict, wanted: dict, on_bad_rows: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """Streams a skeleton file: returns ``(raw ids [N, F] int64, labels [2, N], counts)``."""
  num_fields = len(wanted)
  ids = array.array("q")
  click, conv = array.array("b"), array.array("b")
  counts = {"rows": 0, "dropped_click0_conversion1": 0, "missing_common": 0}
  bad = _BadRows(path, on_bad_rows)
  seen_line = False
  with _open_text(path) as fh:
    for line, text, complete in _lines(fh):
      if not text:
        continue
      seen_line = True
      parts = text.split(",", 5)
      if line == 1 and parts[0] == "sample_id":
        continue
      row = [-1] * num_fields
      try:
        if len(parts) != 6 or "," in parts[5]:
          raise _RowError(
            f"has {text.count(',') + 1} fields; expected 'sample_id,click,conversion,"
            f"common_feature_index,num_features,feature_list'{_cut_hint(complete)}"
          )
        for name, s in (("click", parts[1]), ("conversion", parts[2])):
          if s.strip() not in ("0", "1"):
            raise _RowError(f"column {name!r} holds {s!r}, not 0 or 1")
        _parse_feature_list(parts[5], parts[4], wanted, row)
      except _RowError as e:
        bad(line, str(e))
        continue
      counts["rows"] += 1
      c, v = int(parts[1]), int(parts[2])
      if c == 0 and v == 1:  # a conversion without a click: noise, dropped
        counts["dropped_click0_conversion1"] += 1
        continue
      user = common.get(parts[3])
      if user is None:
        counts["missing_common"] += 1
      else:
        row = [r if r != -1 else u for r, u in zip(row, user)]  # the sample's own value wins
      ids.extend(row)
      click.append(c)
      conv.append(v)
  if not seen_line:
    raise ValueError(f"mtjax: {path!r} line 1: the file is empty; expected Ali-CCP sample skeleton rows.")
  if not counts["rows"]:
    raise _no_rows(path, 2, bad)
  bad.warn()
  if bad.mode == "skip":
    counts["dropped_malformed"] = bad.count
  raw = np.frombuffer(ids, np.int64).reshape(-1, num_fields).copy() if len(ids) else np.zeros((0, num_fields), np.int64)
  labels = np.stack([np.frombuffer(click, np.int8), np.frombuffer(conv, np.int8)]).astype(np.float32)
  return raw, labels, counts


def _funnel_dataset(feats: dict, labels: np.ndarray, spec: FeatureSpec, extras: dict, metadata: dict):
  click = labels[0] > 0.5
  return MultiTaskDataset(
    features=feats,
    labels=labels,
    masks=np.stack([np.ones_like(click), click]),
    task_names=("click", "conversion"),
    spec=spec,
    extras=extras,
    metadata=metadata,
  )


def aliccp(
  skeleton_path: PathLike,
  common_features_path: PathLike,
  *,
  test_skeleton_path: Optional[PathLike] = None,
  test_common_features_path: Optional[PathLike] = None,
  min_count: int = 10,
  fields: Sequence[str] = ALICCP_FIELDS,
  embed_dim: int = 8,
  on_bad_rows: str = "error",
) -> dict[str, MultiTaskDataset]:
  """Loads Ali-CCP from the raw ``sample_skeleton_*.csv`` + ``common_features_*.csv`` files.

  Format: a skeleton row is ``sample_id,click,conversion,common_feature_index,num_features,
  feature_list`` and a common-features row ``common_feature_index,num_features,feature_list``,
  where ``feature_list`` is ``field\\x02feature_id\\x03value`` items joined by ``\\x01``. Each
  sample is joined with the user-side features of its ``common_feature_index`` (the sample's
  own value wins if a field is in both; a sample whose index is absent from the common file
  keeps its own fields only, counted in ``metadata['counts']['missing_common']``).

  * Cleaning: rows with ``click = 0`` and ``conversion = 1`` are dropped (counted in
    ``metadata['counts']``).
  * Features: one int32 categorical field per name in ``fields`` (single-valued fields; for a
    field listed several times in a row, the first feature id is used and the value after
    ``\\x03`` is ignored). Vocabulary per field, built on the training skeleton: raw feature
    ids seen at least ``min_count`` times, sorted, become ids ``1..K``; id ``0`` is a rare,
    unseen (test) or missing feature (vocab size ``K + 1``).
  * Tasks ``('click', 'conversion')``: ``labels[1]`` is the file's conversion column, the
    click-and-buy (CTCVR) label over all impressions; ``masks[1] = click`` marks where it is the
    CVR label (``masks[0]`` all True).
  * ``extras['user_id']``: the raw id of field ``101`` (user), int64, when that field is loaded.
  * Malformed rows: a row without its 6 (skeleton) or 3 (common features) fields, a click or
    conversion that is not ``0`` / ``1``, a ``num_features`` that is not the number of items in
    the row's feature list (a row cut short), a loaded item that is not
    ``field\\x02id\\x03value`` with an integer id, or a file without any row raise a
    ``ValueError`` naming the file and the line (``on_bad_rows='error'``, the default);
    ``on_bad_rows='skip'`` drops the malformed rows instead, warns once per file with their count
    and the first one, and adds ``metadata['counts']['dropped_malformed']`` (skeleton rows). A
    UTF-8 byte-order mark is ignored.

  Files are streamed line by line (the full training skeleton is ~42M rows; the processed form,
  :func:`aliccp_processed`, loads much faster).

  Examples:
    >>> from mtjax import data
    >>> splits = data.aliccp('sample_skeleton_train.csv', 'common_features_train.csv',
    ...                      test_skeleton_path='sample_skeleton_test.csv',
    ...                      test_common_features_path='common_features_test.csv')  # doctest: +SKIP

  Args:
    skeleton_path, common_features_path: the training files.
    test_skeleton_path, test_common_features_path: the test files (optional, both or neither).
    min_count: minimum training count for a feature id to get its own embedding row.
    fields: the field ids to load, in feature order.
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).

  Returns:
    ``{'train'}`` or ``{'train', 'test'}`` of :class:`MultiTaskDataset`.

  References:
    Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, *Entire Space Multi-Task Model: An Effective Approach
    for Estimating Post-Click Conversion Rate*, SIGIR 2018.
  """
  if (test_skeleton_path is None) != (test_common_features_path is None):
    raise ValueError("mtjax: aliccp needs both test_skeleton_path and test_common_features_path, or neither.")
  fields = tuple(str(f) for f in fields)
  if not fields or len(set(fields)) != len(fields):
    raise ValueError(f"mtjax: aliccp fields must be distinct field ids, got {fields}.")
  if int(min_count) < 1:
    raise ValueError(f"mtjax: aliccp min_count must be >= 1, got {min_count}.")
  _check_on_bad_rows(on_bad_rows)
  wanted = {f: j for j, f in enumerate(fields)}
  paths = {"train": (skeleton_path, common_features_path)}
  if test_skeleton_path is not None:
    paths["test"] = (test_skeleton_path, test_common_features_path)
  raw = {}
  for split, (skel, com) in paths.items():
    skel = _check_file(skel, f"Ali-CCP {split} skeleton")
    com = _check_file(com, f"Ali-CCP {split} common features")
    raw[split] = _read_skeleton(skel, _read_common(com, wanted, on_bad_rows), wanted, on_bad_rows)

  train_ids = raw["train"][0]
  vocab = {f: _vocabulary(train_ids[:, j], min_count=int(min_count), missing=-1) for j, f in enumerate(fields)}
  spec = FeatureSpec(categorical=tuple(Categorical(f, len(vocab[f]) + 1, embed_dim) for f in fields))
  out = {}
  for split, (ids, labels, counts) in raw.items():
    feats = {f: _map_to_ids(ids[:, j], vocab[f]) for j, f in enumerate(fields)}
    extras = {"user_id": ids[:, wanted["101"]]} if "101" in wanted else {}
    out[split] = _funnel_dataset(
      feats, labels, spec, extras, {"name": "aliccp", "counts": counts, "vocabularies": vocab, "min_count": min_count}
    )
  return out


def _processed_dense(header: Sequence[str], dense_columns: Optional[Sequence[str]], path: str) -> tuple[str, ...]:
  if dense_columns is None:
    return tuple(h for h in header if len(h) > 1 and h[0] == "D" and h[1].isdigit())
  dense = tuple(str(c) for c in dense_columns)
  missing = [c for c in dense if c not in header]
  if missing:
    raise ValueError(f"mtjax: {path!r} line 1: the header lacks dense column(s) {missing}; it is {list(header)}.")
  return dense


def aliccp_processed(
  train_path: PathLike,
  test_path: Optional[PathLike] = None,
  *,
  validation_path: Optional[PathLike] = None,
  dense_columns: Optional[Sequence[str]] = None,
  embed_dim: int = 8,
  on_bad_rows: str = "error",
) -> dict[str, MultiTaskDataset]:
  """Loads the common processed Ali-CCP CSVs: a header row, labels ``click`` and ``purchase``, one column per field.

  Two forms are in wide use, both read as they are:

  * ``click,purchase,101,121,...,853,301``: the 18 :data:`ALICCP_FIELDS` as integer ids;
  * the torch-rechub ``ali_ccp_{train,val,test}.csv`` (and ``*_sample.csv``) files: ``click``,
    ``purchase``, integer-id columns (``101`` .. ``301``, ``210``, ``109_14``, ``110_14``,
    ``127_14``, ``150_14``) and the dense float columns :data:`ALICCP_PROCESSED_DENSE`
    (``D109_14``, ``D110_14``, ``D127_14``, ``D150_14``, ``D508``, ``D509``, ``D702``, ``D853``).

  Schema (by column name, never guessed from the values): ``click`` and ``purchase`` are the
  labels (0 or 1, anywhere in the header); a dense column (``dense_columns``; by default every
  column whose name is ``D`` followed by a digit, the processed form's naming) is a float32 ``[N]``
  dense feature kept as it is (an empty field is 0.0); every other column is an int32 categorical
  field named by its header (ids kept; vocabulary size = max id + 1 over all the files; an empty
  field gets its own id ``max id + 1``). Rows with ``click = 0`` and ``purchase = 1`` are
  dropped. Tasks and masks as in :func:`aliccp` (``labels[1]`` = purchase, ``masks[1]`` = click);
  ``extras['user_id']`` is column ``101`` when present.

  Malformed rows: a row with more or fewer fields than the header (a file cut mid-row ends with
  one), a field that is not a number, ``nan`` / ``inf``, a non-integer id, a label that is not
  0 or 1 or is empty, or a header without any data row raise a ``ValueError`` naming the file,
  the line and the column (``on_bad_rows='error'``, the default); ``on_bad_rows='skip'`` drops
  the malformed rows instead and warns once per file with their count and the first one. A UTF-8
  byte-order mark is ignored.

  Examples:
    >>> from mtjax import data
    >>> splits = data.aliccp_processed('ali_ccp_train.csv', 'ali_ccp_test.csv',
    ...                                validation_path='ali_ccp_val.csv')  # doctest: +SKIP
    >>> splits['train'].spec.dense[0].name  # doctest: +SKIP
    'D109_14'

  Args:
    train_path: the training CSV.
    test_path: the test CSV (optional; same header).
    validation_path: the validation CSV (optional; same header).
    dense_columns: the names of the dense float columns; None: the columns named ``D<digit>...``.
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).

  Returns:
    ``{'train'}`` plus ``'validation'`` / ``'test'`` for the files given, of :class:`MultiTaskDataset`.

  References:
    Ma et al., *Entire Space Multi-Task Model*, SIGIR 2018.
  """
  _check_on_bad_rows(on_bad_rows)
  paths = {"train": train_path, "validation": validation_path, "test": test_path}
  raw, header, dense, fields = {}, None, None, None
  for split, path in paths.items():
    if path is None:
      continue
    path = _check_file(path, f"Ali-CCP processed {split}")
    head = _read_header(path)
    if header is None:
      missing = [c for c in ("click", "purchase") if c not in head]
      if missing or len(head) < 3:
        raise ValueError(
          f"mtjax: {path!r} line 1: the header {head} lacks {missing or 'feature columns'}; expected "
          "'click,purchase,<field ids>'."
        )
      header = head
      dense = _processed_dense(header, dense_columns, path)
      fields = tuple(h for h in header if h not in ("click", "purchase") and h not in dense)
    elif head != header:
      raise ValueError(f"mtjax: {path!r} line 1: its header {head} is not the training file's {header}.")
    schema = {"click": "int", "purchase": "int"}
    schema.update({f: "int" for f in fields})
    schema.update({f: "float" for f in dense})
    values, missing = _read_csv(
      path,
      schema,
      required=("click", "purchase"),
      on_bad_rows=on_bad_rows,
      allowed={"click": (0, 1), "purchase": (0, 1)},
      header=head,
    )
    for f in fields:
      if ((values[f] < 0) & ~missing[f]).any():
        raise ValueError(f"mtjax: {path!r}: column {f!r} has negative ids; processed Ali-CCP ids are >= 0.")
    keep = ~((values["click"] == 0) & (values["purchase"] == 1))
    raw[split] = ({k: v[keep] for k, v in values.items()}, {k: m[keep] for k, m in missing.items()}, int((~keep).sum()))
  vocab, missing_id = {}, {}
  for f in fields:
    seen = [v[f][~m[f]] for v, m, _ in raw.values()]
    top = max((int(s.max()) for s in seen if s.size), default=-1)
    missing_id[f] = top + 1
    vocab[f] = top + 1 + int(any(m[f].any() for _, m, _ in raw.values()))
  spec = FeatureSpec(
    categorical=tuple(Categorical(f, max(vocab[f], 1), embed_dim) for f in fields), dense=tuple(Dense(f) for f in dense)
  )
  out = {}
  for split, (values, missing, dropped) in raw.items():
    feats = {f: np.where(missing[f], missing_id[f], values[f]).astype(np.int32) for f in fields}
    feats.update({f: np.where(missing[f], 0.0, values[f]).astype(np.float32) for f in dense})
    labels = np.stack([values["click"], values["purchase"]]).astype(np.float32)
    extras = {"user_id": values["101"]} if "101" in fields else {}
    out[split] = _funnel_dataset(
      feats, labels, spec, extras, {"name": "aliccp_processed", "dropped_click0_conversion1": dropped}
    )
  return out
