"""AliExpress (processed CSV, one directory per country) loader."""

from __future__ import annotations

import operator
import os
import shutil
import tempfile
from typing import IO, Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._dataset import _check_file
from mtjax.data._dataset import _check_on_bad_rows
from mtjax.data._dataset import _read_csv
from mtjax.data._dataset import _read_csv_chunks
from mtjax.data._store import StoreError
from mtjax.data._store import StoreWriter
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

PathLike = Union[str, os.PathLike]

ALIEXPRESS_CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
ALIEXPRESS_NUMERICAL = tuple(f"numerical_{i}" for i in range(1, 64))
ALIEXPRESS_COUNTRIES = ("NL", "ES", "FR", "US")


def _country_dir(path: str, country: Optional[str]) -> str:
  if country is not None:
    path = os.path.join(path, f"AliExpress_{country}")
  if not os.path.isdir(path):
    raise ValueError(f"mtjax: AliExpress directory {path!r} does not exist.")
  if not os.path.isfile(os.path.join(path, "train.csv")):
    found = sorted(d for d in os.listdir(path) if d.startswith("AliExpress_"))
    hint = f" It holds {found}: pass country=... (one of {ALIEXPRESS_COUNTRIES})." if found else ""
    raise ValueError(f"mtjax: {path!r} has no train.csv; pass an AliExpress_<country> directory.{hint}")
  return path


def aliexpress(
  path: PathLike, country: Optional[str] = None, *, embed_dim: int = 8, on_bad_rows: str = "error"
) -> dict[str, MultiTaskDataset]:
  """Loads one country of the AliExpress dataset (``AliExpress_{NL,ES,FR,US}/{train,test}.csv``).

  Each CSV has a header with ``search_id``, ``categorical_1`` .. ``categorical_16`` (integer
  ids), ``numerical_1`` .. ``numerical_63`` (floats in ``[0, 1]``), ``click`` and ``conversion``.

  * Features: the 16 categorical columns as int32 fields (ids kept as they are; vocabulary size
    = max id + 1 over train and test), and the 63 numerical columns as ONE dense field
    ``numerical`` of width 63 (float32 ``[N, 63]``).
  * Tasks ``('click', 'conversion')``: ``labels[1]`` is the file's ``conversion`` column, which
    is click-and-purchase over all impressions (the CTCVR label). ``masks[0]`` is all True and
    ``masks[1] = click`` (where ``labels[1]`` is the CVR label, for masked CVR losses; drop the
    masks, ``dataclasses.replace(ds, masks=None)``, to train both tasks on all impressions).
  * Missing values (empty fields; the published files have none): a missing categorical id
    gets its own id ``max id + 1`` (the vocabulary grows by one for that column), a missing
    numerical value is 0.0, a missing label is 0.
  * ``extras['search_id']``: int64 (the search session of each impression).

  * Malformed rows: a row with more or fewer fields than the header (a file cut mid-row ends
    with one), a field that is not a number, ``nan`` / ``inf`` (the files have none), a
    non-integer id, a label that is not 0 or 1, or a header without any data row raise a
    ``ValueError`` naming the file, the line and the column (``on_bad_rows='error'``, the
    default); ``on_bad_rows='skip'`` drops the malformed rows instead and warns once per file
    with their count and the first one. Columns are found by their header names (any order;
    extra columns are not read, but every row must have as many fields as the header); a UTF-8
    byte-order mark is ignored.

  Parsing uses ``np.loadtxt`` (fast C parser), falling back to a line-by-line reader (which
  finds the line of a malformed row) when a field is empty or anything is off.

  Examples:
    >>> from mtjax import data
    >>> splits = data.aliexpress('/data/aliexpress', country='NL')  # doctest: +SKIP
    >>> splits['train'].features['numerical'].shape  # doctest: +SKIP
    (N, 63)

  Args:
    path: an ``AliExpress_<country>`` directory, or the directory holding them with ``country``.
    country: ``'NL'``, ``'ES'``, ``'FR'`` or ``'US'`` (with a parent ``path``).
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).

  Returns:
    ``{'train', 'test'}`` of :class:`MultiTaskDataset` (``'test'`` only if ``test.csv`` exists).

  References:
    Li, Zhao, Chen, Guo, Xu, Chen, Zhang, Liu, *Improving Multi-Scenario Learning to Rank in
    E-commerce by Exploiting Task Relationships in the Label Space*, CIKM 2020 (the dataset).
  """
  directory = _country_dir(os.fspath(path), country)
  files = {"train": os.path.join(directory, "train.csv")}
  if os.path.isfile(os.path.join(directory, "test.csv")):
    files["test"] = os.path.join(directory, "test.csv")

  _check_on_bad_rows(on_bad_rows)
  raw = {}
  for split, file in files.items():
    file = _check_file(file, f"AliExpress {split}")
    values, missing = _read_csv(file, _SCHEMA, on_bad_rows=on_bad_rows, allowed=_ALLOWED)
    raw[split] = ids, ids_missing, _, _ = _arrays(values, missing)
    del values, missing
    if _negative_ids(ids, ids_missing):  # search_id included
      raise _negative_error(file)

  # Vocabulary: max id + 1 over train and test; a missing id gets the next id.
  top = [max(_top_id(r[0][:, 1 + j], r[1][:, 1 + j]) for r in raw.values()) for j in range(_NUM_CAT)]
  any_missing = [any(bool(r[1][:, 1 + j].any()) for r in raw.values()) for j in range(_NUM_CAT)]
  missing_id = [t + 1 for t in top]
  spec = _spec(top, any_missing, embed_dim)

  out = {}
  for split, (ids, ids_missing, num, num_missing) in raw.items():
    feats, labels, masks, extras = _columns(ids, ids_missing, num, num_missing, missing_id)
    out[split] = MultiTaskDataset(
      features=feats,
      labels=labels,
      masks=masks,
      task_names=TASKS,
      spec=spec,
      extras=extras,
      metadata={"name": "aliexpress", "directory": directory},
    )
  return out


TASKS = ("click", "conversion")
_NUM_CAT = len(ALIEXPRESS_CATEGORICAL)
_IDS = ("search_id",) + ALIEXPRESS_CATEGORICAL
_NUMS = ALIEXPRESS_NUMERICAL + ("click", "conversion")
_SCHEMA = {**{c: "int" for c in _IDS}, **{c: "float" for c in _NUMS}}
_ALLOWED = {"click": (0, 1), "conversion": (0, 1)}


def _arrays(values, missing):
  """``(ids [n, 17] int64, their missing mask, numbers [n, 65] float64, their missing mask)`` of parsed columns."""
  ids = np.stack([values[c] for c in _IDS], axis=1)
  ids_missing = np.stack([missing[c] for c in _IDS], axis=1)
  num = np.stack([values[c] for c in _NUMS], axis=1)
  num_missing = np.stack([missing[c] for c in _NUMS], axis=1)
  return ids, ids_missing, num, num_missing


def _negative_ids(ids, ids_missing) -> bool:
  return bool(((ids < 0) & ~ids_missing).any())


def _negative_error(file: str) -> ValueError:
  return ValueError(f"mtjax: {file!r} has negative categorical ids; AliExpress ids are >= 0.")


def _top_id(ids, ids_missing) -> int:
  """The largest id present (-1 when none is)."""
  seen = ids[~ids_missing]
  return int(seen.max()) if seen.size else -1


def _spec(top: Sequence[int], any_missing: Sequence[bool], embed_dim: int) -> FeatureSpec:
  vocab = [t + 1 + int(m) for t, m in zip(top, any_missing)]
  return FeatureSpec(
    categorical=tuple(Categorical(c, max(v, 1), embed_dim) for c, v in zip(ALIEXPRESS_CATEGORICAL, vocab)),
    dense=(Dense("numerical", len(ALIEXPRESS_NUMERICAL)),),
  )


def _columns(ids, ids_missing, num, num_missing, missing_id: Sequence[int]):
  """``(features, labels [2, n], masks [2, n], extras)`` of parsed rows; a missing id becomes ``missing_id``."""
  feats = {}
  for j, c in enumerate(ALIEXPRESS_CATEGORICAL):
    feats[c] = np.where(ids_missing[:, 1 + j], missing_id[j], ids[:, 1 + j]).astype(np.int32)
  feats["numerical"] = np.where(num_missing[:, :63], 0.0, num[:, :63]).astype(np.float32)
  click = num[:, 63] > 0.5
  conversion = num[:, 64] > 0.5
  labels = np.stack([click, conversion]).astype(np.float32)
  masks = np.stack([np.ones_like(click), click])
  return feats, labels, masks, {"search_id": ids[:, 0]}


def _chunk_columns(values, missing, missing_id: Sequence[int]):
  """``_columns(*_arrays(values, missing), missing_id)`` without building the ``[n, 17]`` / ``[n, 65]`` arrays."""
  feats = {}
  for j, c in enumerate(ALIEXPRESS_CATEGORICAL):
    feats[c] = np.where(missing[c], missing_id[j], values[c]).astype(np.int32)
  numerical = np.empty((len(values["click"]), len(ALIEXPRESS_NUMERICAL)), np.float32)
  for k, c in enumerate(ALIEXPRESS_NUMERICAL):
    numerical[:, k] = np.where(missing[c], 0.0, values[c]) if missing[c].any() else values[c]
  feats["numerical"] = numerical
  click = np.where(missing["click"], 0.0, values["click"]) > 0.5
  conversion = np.where(missing["conversion"], 0.0, values["conversion"]) > 0.5
  labels = np.stack([click, conversion]).astype(np.float32)
  masks = np.stack([np.ones_like(click), click])
  search_id = np.where(missing["search_id"], 0, values["search_id"])
  return feats, labels, masks, {"search_id": search_id}


def aliexpress_to_store(
  path: PathLike,
  out: PathLike,
  country: Optional[str] = None,
  *,
  embed_dim: int = 8,
  on_bad_rows: str = "error",
  chunk_rows: int = 1_000_000,
  overwrite: bool = False,
) -> str:
  """Converts one country of the AliExpress dataset to a store (:func:`open_store`), streaming.

  Reads ``train.csv`` (and ``test.csv`` if present) a chunk of lines at a time, so memory is
  bounded by the chunk (about 1.5 KB a row while it is parsed; at most ``chunk_rows`` and 65,536
  lines, about 100 MB), not by the file: the published files have tens of millions of rows, more
  than :func:`aliexpress` can hold. The store is the
  same, file for file, as ``write_store(aliexpress(path, country, ...), out)``: the same features,
  labels, masks, ``extras['search_id']``, spec (vocabulary = max id + 1 over train and test, one
  more for a column with a missing id, which gets id max id + 1) and metadata; a malformed row
  raises the same ``ValueError`` (the CSV file, its line and the column) or, with
  ``on_bad_rows='skip'``, is dropped with the same warning.

  Each chunk is parsed by ``pyarrow.csv`` when pyarrow is installed (else ``np.loadtxt``) and by
  the line-by-line reader where those cannot vouch for it. Missing ids are written as a
  placeholder and set once the vocabulary is known (a second pass over only those rows). Nothing
  is visible at ``out/<split>`` until every split is converted: an interrupted or failed
  conversion leaves no store that looks complete (see :class:`StoreWriter`).

  Examples:
    >>> from mtjax import data
    >>> data.aliexpress_to_store('/data/aliexpress', '/data/aliexpress_nl', country='NL')  # doctest: +SKIP
    '/data/aliexpress_nl'
    >>> splits = data.open_store('/data/aliexpress_nl')  # doctest: +SKIP

  Args:
    path: an ``AliExpress_<country>`` directory, or the directory holding them with ``country``.
    out: the store folder to write (sub-folders ``train`` and ``test``).
    country: ``'NL'``, ``'ES'``, ``'FR'`` or ``'US'`` (with a parent ``path``).
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).
    chunk_rows: the most lines parsed at a time (a smaller memory bound than the default pieces
      of 65,536 lines, which are faster than larger ones: their buffers are reused).
    overwrite: replace an existing store at ``out``.

  Returns:
    The store's path (absolute).
  """
  directory = _country_dir(os.fspath(path), country)
  files = {"train": os.path.join(directory, "train.csv")}
  if os.path.isfile(os.path.join(directory, "test.csv")):
    files["test"] = os.path.join(directory, "test.csv")
  _check_on_bad_rows(on_bad_rows)
  if int(chunk_rows) < 1:
    raise ValueError(f"mtjax: chunk_rows must be >= 1, got {chunk_rows}.")
  files = {split: _check_file(file, f"AliExpress {split}") for split, file in files.items()}
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not overwrite:
    raise StoreError(f"mtjax: {out!r} already exists; pass overwrite=True to replace it.")
  created = not os.path.exists(out)
  os.makedirs(out, exist_ok=True)

  top = [-1] * _NUM_CAT
  placeholder = [-1] * _NUM_CAT  # missing ids until the vocabulary is known; their rows are listed in `where`
  where: dict[tuple[str, int], IO[bytes]] = {}  # (split, column) -> temporary file of the rows with a missing id
  writers: dict[str, StoreWriter] = {}
  try:
    for split, file in files.items():
      w = writers[split] = StoreWriter(
        os.path.join(out, split),
        task_names=TASKS,
        spec=_spec(top, [False] * _NUM_CAT, embed_dim),
        metadata={"name": "aliexpress", "directory": directory},
        overwrite=True,
      )
      negative = False
      for values, missing in _read_csv_chunks(
        file, _SCHEMA, chunk_rows=int(chunk_rows), on_bad_rows=on_bad_rows, allowed=_ALLOWED
      ):
        # a negative id (search_id included) is reported after the whole file, as the loader does
        negative = negative or any(_negative_ids(values[c], missing[c]) for c in _IDS)
        for j, c in enumerate(ALIEXPRESS_CATEGORICAL):
          top[j] = max(top[j], _top_id(values[c], missing[c]))
          rows = np.flatnonzero(missing[c])
          if rows.size:
            if (split, j) not in where:
              where[split, j] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally clause)
            where[split, j].write((rows + w.num_rows).astype(np.int64).tobytes())
        feats, labels, masks, extras = _chunk_columns(values, missing, placeholder)
        del values, missing
        w.append(feats, labels, masks=masks, extras=extras)
      if negative:
        raise _negative_error(file)

    any_missing = [any(j == k for _, k in where) for j in range(_NUM_CAT)]
    for (split, j), rows_file in where.items():
      _set_rows(writers[split], ALIEXPRESS_CATEGORICAL[j], rows_file, top[j] + 1)
    spec = _spec(top, any_missing, embed_dim)
    for w in writers.values():
      w.close(spec=spec)
  except BaseException:
    for w in writers.values():
      w.abort()
    if created:
      shutil.rmtree(out, ignore_errors=True)
    raise
  finally:
    for rows_file in where.values():
      rows_file.close()
  if "test" not in files and overwrite and os.path.isdir(os.path.join(out, "test")):
    shutil.rmtree(os.path.join(out, "test"))  # a test split of an earlier conversion (its test.csv is gone)
  return out


def _set_rows(writer: StoreWriter, feature: str, rows_file: IO[bytes], value: int, chunk: int = 1 << 20) -> None:
  """Sets feature ``feature`` of an open writer to ``value`` at the rows listed (int64) in ``rows_file``."""
  rows_file.seek(0)
  while block := rows_file.read(8 * chunk):
    writer.set_rows(feature, np.frombuffer(block, np.int64), value)


# Vocabulary sizes of the generator's 16 categorical columns (a mix of small and large fields).
_SYNTHETIC_VOCAB = (12, 4, 50, 1000, 20, 3, 200, 8, 5000, 300, 10, 40, 100, 2, 20000, 60)


def write_aliexpress_csv(
  path: PathLike,
  num_rows: int,
  *,
  seed: int = 0,
  click_rate: float = 0.03,
  conversion_rate: float = 0.005,
  missing_rate: float = 0.0,
  decimals: int = 4,
  templates: int = 4096,
) -> str:
  """Writes a synthetic CSV file in the AliExpress format, fast (for benchmarks and tests of the converters).

  The header and columns are those :func:`aliexpress` reads: ``search_id``, ``categorical_1`` ..
  ``categorical_16`` (integer ids), ``numerical_1`` .. ``numerical_63`` (floats in ``[0, 1]`` with
  ``decimals`` decimals), ``click``, ``conversion`` (1 only where ``click`` is). Rows are drawn from
  ``templates`` feature rows formatted once (so rows repeat their features; every row has its own
  draw of template and labels); each template has its own click and conversion-after-click
  probabilities (log-normal around the given rates), so the labels depend on the features.
  ``search_id`` grows by one every ~20 rows (a search session). About 500 bytes a row with 4
  decimals: 20 million rows are about 10 GB.

  Examples:
    >>> import os, tempfile
    >>> from mtjax import data
    >>> d = os.path.join(tempfile.mkdtemp(), 'AliExpress_NL')
    >>> _ = data.write_aliexpress_csv(os.path.join(d, 'train.csv'), 1000, seed=0)
    >>> len(data.aliexpress(d)['train'])
    1000

  Args:
    path: the CSV file to write (its folder is created).
    num_rows: data rows.
    seed: seed of everything drawn.
    click_rate: mean fraction of rows with ``click`` = 1.
    conversion_rate: mean fraction of rows with ``conversion`` = 1 (all of them clicked); at most ``click_rate``.
    missing_rate: fraction of the categorical fields of the templates left empty (missing ids; the
      published files have none).
    decimals: decimals of the numerical values.
    templates: distinct feature rows.

  Returns:
    ``path``.
  """
  if num_rows < 0 or templates < 1 or not 0 <= conversion_rate <= click_rate <= 1 or not 0 <= missing_rate <= 1:
    raise ValueError(
      "mtjax: write_aliexpress_csv needs num_rows >= 0, templates >= 1, 0 <= conversion_rate <= click_rate <= 1 "
      f"and 0 <= missing_rate <= 1; got {num_rows}, {templates}, {conversion_rate}, {click_rate}, {missing_rate}."
    )
  path = os.fspath(path)
  rng = np.random.default_rng(seed)
  vocab = np.asarray(_SYNTHETIC_VOCAB)
  ids = np.floor(vocab * rng.random((templates, _NUM_CAT)) ** 2).astype(np.int64)  # skewed to small ids
  empty = rng.random((templates, _NUM_CAT)) < missing_rate
  numbers = np.round(rng.random((templates, len(ALIEXPRESS_NUMERICAL))) * rng.random((templates, 1)), decimals)
  cat_text = np.where(empty, "", ids.astype(str))
  num_text = np.char.mod(f"%.{int(decimals)}f", numbers)
  middles = [
    ("," + ",".join(c) + "," + ",".join(x) + ",").encode() for c, x in zip(cat_text.tolist(), num_text.tolist())
  ]
  lognormal = lambda: (z := np.exp(rng.normal(0.0, 0.5, templates))) / z.mean()
  p_click = np.clip(click_rate * lognormal(), 0.0, 1.0)
  p_buy = np.clip((conversion_rate / click_rate if click_rate else 0.0) * lognormal(), 0.0, 1.0)
  endings = (b"0,0\n", b"1,0\n", b"1,1\n")

  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  block_rows = 1 << 16
  search_id = 1
  with open(path, "wb") as fh:
    fh.write((",".join(("search_id",) + ALIEXPRESS_CATEGORICAL + ALIEXPRESS_NUMERICAL + TASKS) + "\n").encode())
    for lo in range(0, num_rows, block_rows):
      n = min(block_rows, num_rows - lo)
      pick = rng.integers(0, templates, n)
      click = rng.random(n) < p_click[pick]
      outcome = click.astype(np.int64) + (click & (rng.random(n) < p_buy[pick]))
      sessions = search_id + np.cumsum(rng.random(n) < 0.05)
      search_id = int(sessions[-1]) + 1
      parts: list = [None] * (3 * n)
      parts[0::3] = "\n".join(map(str, sessions.tolist())).encode().split(b"\n")
      parts[1::3] = operator.itemgetter(*pick.tolist())(middles) if n > 1 else [middles[int(pick[0])]]
      parts[2::3] = operator.itemgetter(*outcome.tolist())(endings) if n > 1 else [endings[int(outcome[0])]]
      fh.write(b"".join(parts))
  return path
