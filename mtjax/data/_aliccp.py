"""Ali-CCP (Alibaba Click and Conversion Prediction, the ESMM paper's data) loaders: the raw
skeleton + common-features files, and the common processed CSV form."""

from __future__ import annotations

import array
import os
from typing import Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import (MultiTaskDataset, _check_file, _map_to_ids, _read_header, _read_numeric_columns,
                                 _vocabulary)
from mtjax.models._features import Categorical, FeatureSpec

PathLike = Union[str, os.PathLike]

#: The 18 single-valued fields of the usual processed form (user side 101-129 from the common
#: features, ad side 205-853 and 301 from the skeleton).
ALICCP_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "216",
                 "508", "509", "702", "853", "301")

_ITEM, _FIELD, _VALUE = "\x01", "\x02", "\x03"


def _parse_feature_list(text: str, wanted: dict, out: list, path: str, line: int) -> None:
  """Fills ``out[j]`` with the first feature id of each wanted field (``field\\x02id\\x03value``)."""
  if not text:
    return
  for item in text.split(_ITEM):
    field, sep, rest = item.partition(_FIELD)
    j = wanted.get(field)
    if j is None or out[j] != -1:
      continue
    feat = rest.partition(_VALUE)[0]
    if not sep or not feat:
      raise ValueError(f"mtjax: {path!r} line {line}: feature item {item!r} is not 'field\\x02id\\x03value'.")
    out[j] = int(feat)


def _read_common(path: str, wanted: dict) -> dict:
  """``common_feature_index -> tuple of raw ids`` (-1 where the field is absent)."""
  table = {}
  with open(path, newline="") as fh:
    for line, text in enumerate(fh, start=1):
      text = text.rstrip("\r\n")
      if not text:
        continue
      parts = text.split(",", 2)
      if len(parts) != 3:
        raise ValueError(f"mtjax: {path!r} line {line}: expected 'common_feature_index,num_features,feature_list'.")
      if line == 1 and parts[0] == "common_feature_index":
        continue  # a header row
      ids = [-1] * len(wanted)
      _parse_feature_list(parts[2], wanted, ids, path, line)
      table[parts[0]] = tuple(ids)
  return table


def _read_skeleton(path: str, common: dict, wanted: dict) -> tuple[np.ndarray, np.ndarray, dict]:
  """Streams a skeleton file: returns ``(raw ids [N, F] int64, labels [2, N], counts)``."""
  num_fields = len(wanted)
  ids = array.array("q")
  click, conv = array.array("b"), array.array("b")
  counts = {"rows": 0, "dropped_click0_conversion1": 0, "missing_common": 0}
  with open(path, newline="") as fh:
    for line, text in enumerate(fh, start=1):
      text = text.rstrip("\r\n")
      if not text:
        continue
      parts = text.split(",", 5)
      if len(parts) != 6:
        raise ValueError(f"mtjax: {path!r} line {line}: expected 'sample_id,click,conversion,common_feature_index,"
                         "num_features,feature_list'.")
      if line == 1 and parts[0] == "sample_id":
        continue
      counts["rows"] += 1
      c, v = int(parts[1]), int(parts[2])
      if c == 0 and v == 1:  # a conversion without a click: noise, dropped
        counts["dropped_click0_conversion1"] += 1
        continue
      row = [-1] * num_fields
      _parse_feature_list(parts[5], wanted, row, path, line)
      user = common.get(parts[3])
      if user is None:
        counts["missing_common"] += 1
      else:
        row = [r if r != -1 else u for r, u in zip(row, user)]  # the sample's own value wins
      ids.extend(row)
      click.append(c)
      conv.append(v)
  raw = np.frombuffer(ids, np.int64).reshape(-1, num_fields).copy() if len(ids) else np.zeros((0, num_fields), np.int64)
  labels = np.stack([np.frombuffer(click, np.int8), np.frombuffer(conv, np.int8)]).astype(np.float32)
  return raw, labels, counts


def _funnel_dataset(feats: dict, labels: np.ndarray, spec: FeatureSpec, extras: dict, metadata: dict):
  click = labels[0] > 0.5
  return MultiTaskDataset(features=feats, labels=labels, masks=np.stack([np.ones_like(click), click]),
                          task_names=("click", "conversion"), spec=spec, extras=extras, metadata=metadata)


def aliccp(skeleton_path: PathLike, common_features_path: PathLike, *, test_skeleton_path: Optional[PathLike] = None,
           test_common_features_path: Optional[PathLike] = None, min_count: int = 10,
           fields: Sequence[str] = ALICCP_FIELDS, embed_dim: int = 8) -> dict[str, MultiTaskDataset]:
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
  wanted = {f: j for j, f in enumerate(fields)}
  paths = {"train": (skeleton_path, common_features_path)}
  if test_skeleton_path is not None:
    paths["test"] = (test_skeleton_path, test_common_features_path)
  raw = {}
  for split, (skel, com) in paths.items():
    skel = _check_file(skel, f"Ali-CCP {split} skeleton")
    com = _check_file(com, f"Ali-CCP {split} common features")
    raw[split] = _read_skeleton(skel, _read_common(com, wanted), wanted)

  train_ids = raw["train"][0]
  vocab = {f: _vocabulary(train_ids[:, j], min_count=int(min_count), missing=-1) for j, f in enumerate(fields)}
  spec = FeatureSpec(categorical=tuple(Categorical(f, len(vocab[f]) + 1, embed_dim) for f in fields))
  out = {}
  for split, (ids, labels, counts) in raw.items():
    feats = {f: _map_to_ids(ids[:, j], vocab[f]) for j, f in enumerate(fields)}
    extras = {"user_id": ids[:, wanted["101"]]} if "101" in wanted else {}
    out[split] = _funnel_dataset(feats, labels, spec, extras,
                                 {"name": "aliccp", "counts": counts, "vocabularies": vocab, "min_count": min_count})
  return out


def aliccp_processed(train_path: PathLike, test_path: Optional[PathLike] = None, *,
                     embed_dim: int = 8) -> dict[str, MultiTaskDataset]:
  """Loads the common processed Ali-CCP CSV: ``click,purchase,<field ids>`` with a header.

  The usual header is ``click,purchase,101,121,...,853,301`` (the 18 :data:`ALICCP_FIELDS`);
  every column after ``click`` and ``purchase`` is loaded as an int32 categorical field named
  by its header (ids kept; vocabulary size = max id + 1 over train and test; an empty field gets
  its own id ``max id + 1``). Rows with ``click = 0`` and ``purchase = 1`` are dropped. Tasks
  and masks as in :func:`aliccp` (``labels[1]`` = purchase, ``masks[1]`` = click);
  ``extras['user_id']`` is column ``101`` when present.

  Examples:
    >>> from mtjax import data
    >>> splits = data.aliccp_processed('ali_ccp_train.csv', 'ali_ccp_test.csv')  # doctest: +SKIP

  Args:
    train_path: the training CSV.
    test_path: the test CSV (optional; same header).
    embed_dim: embedding width put in the spec.

  Returns:
    ``{'train'}`` or ``{'train', 'test'}`` of :class:`MultiTaskDataset`.

  References:
    Ma et al., *Entire Space Multi-Task Model*, SIGIR 2018.
  """
  paths = {"train": train_path} if test_path is None else {"train": train_path, "test": test_path}
  raw, fields = {}, None
  for split, path in paths.items():
    path = _check_file(path, f"Ali-CCP processed {split}")
    header = _read_header(path)
    if header[:2] != ["click", "purchase"] or len(header) < 3:
      raise ValueError(f"mtjax: {path!r} header starts with {header[:3]}; expected 'click,purchase,<field ids>'.")
    if fields is None:
      fields = tuple(header[2:])
    elif tuple(header[2:]) != fields:
      raise ValueError(f"mtjax: {path!r} has fields {header[2:]}, the training file {list(fields)}.")
    values, missing = _read_numeric_columns(path, header, np.int64, header=header)
    if missing[:, :2].any():
      raise ValueError(f"mtjax: {path!r} has an empty click or purchase field.")
    keep = ~((values[:, 0] == 0) & (values[:, 1] == 1))
    raw[split] = (values[keep], missing[keep], int((~keep).sum()))
  vocab, missing_id = [], []
  for j in range(len(fields)):
    seen = [v[:, 2 + j][~m[:, 2 + j]] for v, m, _ in raw.values()]
    if any(((s < 0).any() for s in seen)):
      raise ValueError(f"mtjax: processed Ali-CCP field {fields[j]!r} has negative ids.")
    top = max((int(s.max()) for s in seen if s.size), default=-1)
    missing_id.append(top + 1)
    vocab.append(top + 1 + int(any(m[:, 2 + j].any() for _, m, _ in raw.values())))
  spec = FeatureSpec(categorical=tuple(Categorical(f, max(v, 1), embed_dim) for f, v in zip(fields, vocab)))
  out = {}
  for split, (values, missing, dropped) in raw.items():
    feats = {f: np.where(missing[:, 2 + j], missing_id[j], values[:, 2 + j]).astype(np.int32)
             for j, f in enumerate(fields)}
    labels = (values[:, :2].T > 0).astype(np.float32)
    extras = {"user_id": values[:, 2 + fields.index("101")]} if "101" in fields else {}
    out[split] = _funnel_dataset(feats, labels, spec, extras,
                                 {"name": "aliccp_processed", "dropped_click0_conversion1": dropped})
  return out
