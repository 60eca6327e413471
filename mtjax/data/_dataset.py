"""The container every generator and loader returns, and small helpers the loaders share."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
import os
import warnings
from typing import Any, Collection, Mapping, Optional, Sequence, Union

import numpy as np

from mtjax.models._features import FeatureSpec

Features = Union[np.ndarray, Mapping[str, np.ndarray]]
Index = Union[np.ndarray, slice, Sequence[int]]

TASK_TYPES = ("binary", "regression")


def _take(array: np.ndarray, index, axis: int = 0) -> np.ndarray:
  """``array[index]`` along ``axis``: basic slicing for a slice, fancy indexing otherwise."""
  if axis == 0:
    return array[index]
  return array[(slice(None),) * axis + (index,)]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class MultiTaskDataset:
  """``N`` samples of inputs with ``T`` task labels, held in memory as NumPy arrays.

  Layout (``N`` samples, ``T`` tasks; the task axis comes first, like model outputs ``[T, B]``):

  * ``features``: either a dict ``name -> array`` (``[N]`` int32 ids for a categorical field,
    ``[N]`` or ``[N, dim]`` float32 for a dense one; described by ``spec``), or one dense float32
    array ``[N, D]`` (purely dense data such as :func:`mmoe_synthetic`; ``spec`` is then None).
  * ``labels``: ``[T, N]`` float32 (0/1 for binary tasks, real values for regression tasks).
  * ``masks``: optional ``[T, N]`` bool; False where a label is not observed (e.g. the CVR label
    of an impression without a click). None means every label is observed.
  * ``extras``: arrays with leading axis ``N`` that are not model inputs: raw user ids for GAUC,
    dates, ground-truth probabilities of synthetic data, ...
  * ``metadata``: anything describing how the data was built (vocabularies, normalization
    statistics, generator constants); not indexed by :meth:`subset`.

  A batch (:meth:`batch`, :func:`mtjax.data.batches`) is the dict
  ``{'x': features, 'labels': [T, B], 'mask': [T, B]}`` (``'mask'`` only when ``masks`` is set,
  ``'extras'`` only when asked for), which is what models (``model.apply(params, batch['x'])``)
  and masked losses take.

  Examples:
    >>> import numpy as np
    >>> from mtjax import data
    >>> ds = data.MultiTaskDataset(features=np.zeros((6, 2), np.float32),
    ...                            labels=np.array([[0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 1]]),
    ...                            task_names=('a', 'b'))
    >>> len(ds), ds.num_tasks
    (6, 2)
    >>> train, test = ds.split((0.5, 0.5))
    >>> test.labels
    array([[1., 0., 1.],
           [0., 1., 1.]], dtype=float32)
    >>> ds.batch(np.array([0, 5]))['labels'].shape
    (2, 2)

  Attributes:
    features: dict of ``[N]``/``[N, dim]`` arrays, or a dense ``[N, D]`` float array.
    labels: ``[T, N]`` float32.
    task_names: ``T`` names.
    spec: the :class:`mtjax.models.FeatureSpec` of a feature dict (None for a dense array).
    masks: optional ``[T, N]`` bool.
    weights: optional ``[T, N]`` (or ``[N]``, every task) non-negative per-sample loss weights
      (e.g. watch time on the positives); ``fit`` weights its ``"bce"`` / ``"mse"`` task losses
      with them (:func:`mtjax.losses.per_task_loss`, ``"valid"`` normalization); metrics stay unweighted.
    task_types: ``"binary"`` or ``"regression"`` per task (default: all binary).
    extras: dict of ``[N, ...]`` arrays that are not model inputs.
    metadata: dict describing how the data was built.
  """

  features: Features
  labels: np.ndarray
  task_names: Sequence[str]
  spec: Optional[FeatureSpec] = None
  masks: Optional[np.ndarray] = None
  task_types: Optional[Sequence[str]] = None
  extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  weights: Optional[np.ndarray] = None

  def __post_init__(self):
    setattr_ = lambda k, v: object.__setattr__(self, k, v)
    labels = np.asarray(self.labels)
    if labels.ndim != 2:
      raise ValueError(
        f"mtjax: MultiTaskDataset.labels must be [T, N], got shape {labels.shape}; "
        "put the task axis first (labels.T if yours is [N, T])."
      )
    setattr_("labels", labels.astype(np.float32, copy=False))
    num_tasks, n = labels.shape
    names = tuple(self.task_names)
    if len(names) != num_tasks:
      raise ValueError(f"mtjax: MultiTaskDataset has {num_tasks} label rows but task_names {names}.")
    setattr_("task_names", names)
    types = ("binary",) * num_tasks if self.task_types is None else tuple(self.task_types)
    if len(types) != num_tasks or any(t not in TASK_TYPES for t in types):
      raise ValueError(f"mtjax: task_types must be {num_tasks} of {TASK_TYPES}, got {types}.")
    setattr_("task_types", types)
    if self.masks is not None:
      masks = np.asarray(self.masks)
      if masks.shape != labels.shape:
        raise ValueError(f"mtjax: masks have shape {masks.shape}, labels {labels.shape}; they must match.")
      setattr_("masks", masks.astype(bool, copy=False))
    if self.weights is not None:
      weights = np.asarray(self.weights, np.float32)
      if weights.shape == (n,):
        weights = np.broadcast_to(weights[None], labels.shape).copy()
      if weights.shape != labels.shape:
        raise ValueError(f"mtjax: weights must be [T, N] = {labels.shape} or [N] = ({n},), got shape {weights.shape}.")
      if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("mtjax: sample weights must be finite and non-negative (a weight scales a sample's loss).")
      setattr_("weights", weights)

    if isinstance(self.features, Mapping):
      feats = {k: np.asarray(v) for k, v in self.features.items()}
      if not feats:
        raise ValueError("mtjax: MultiTaskDataset.features is an empty dict.")
      for k, v in feats.items():
        if v.ndim not in (1, 2) or v.shape[0] != n:
          raise ValueError(f"mtjax: feature {k!r} has shape {v.shape}; expected [N] or [N, dim] with N = {n}.")
      if self.spec is not None:
        missing = [name for name in self.spec.names if name not in feats]
        if missing:
          raise ValueError(f"mtjax: the spec names feature(s) {missing} that are not in features {sorted(feats)}.")
        for f in self.spec.categorical:
          if not np.issubdtype(feats[f.name].dtype, np.integer):
            raise ValueError(f"mtjax: categorical feature {f.name!r} must hold integer ids, got {feats[f.name].dtype}.")
        for f in getattr(self.spec, "sequences", ()):
          v = feats[f.name]
          if v.ndim != 2 or not np.issubdtype(v.dtype, np.integer) or v.shape[1] > f.max_len:
            raise ValueError(
              f"mtjax: sequence feature {f.name!r} must be [N, L] integer ids with L <= max_len {f.max_len} "
              f"(negative = padding), got {v.dtype}{list(v.shape)}."
            )
      setattr_("features", feats)
    else:
      x = np.asarray(self.features)
      if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"mtjax: dense features must be [N, D] with N = {n}, got shape {x.shape}.")
      if self.spec is not None:
        raise ValueError("mtjax: a dense feature array takes no spec; pass a feature dict to use a FeatureSpec.")
      setattr_("features", x)

    extras = {k: np.asarray(v) for k, v in self.extras.items()}
    for k, v in extras.items():
      if v.ndim < 1 or v.shape[0] != n:
        raise ValueError(f"mtjax: extra {k!r} has shape {v.shape}; its leading axis must be N = {n}.")
    setattr_("extras", extras)
    setattr_("metadata", dict(self.metadata))

  def __len__(self) -> int:
    return self.labels.shape[1]

  @property
  def num_tasks(self) -> int:
    return self.labels.shape[0]

  def __repr__(self) -> str:
    if isinstance(self.features, dict):
      feats = "{" + ", ".join(f"{k}: {v.dtype}{list(v.shape[1:]) or ''}" for k, v in self.features.items()) + "}"
    else:
      feats = f"{self.features.dtype}[N, {self.features.shape[1]}]"
    return (
      f"MultiTaskDataset(num_samples={len(self)}, tasks={self.task_names}, features={feats}, "
      f"masks={self.masks is not None}, extras={sorted(self.extras)})"
    )

  def subset(self, indices: Index) -> MultiTaskDataset:
    """The samples at ``indices`` (int array, bool mask of length N, or a slice), as a new dataset."""
    idx = indices if isinstance(indices, slice) else np.asarray(indices)
    if not isinstance(idx, slice) and idx.dtype == bool:
      if idx.shape != (len(self),):
        raise ValueError(f"mtjax: a boolean subset mask must have shape ({len(self)},), got {idx.shape}.")
      idx = np.flatnonzero(idx)
    if isinstance(self.features, dict):
      feats = {k: _take(v, idx) for k, v in self.features.items()}
    else:
      feats = _take(self.features, idx)
    return dataclasses.replace(
      self,
      features=feats,
      labels=_take(self.labels, idx, axis=1),
      masks=None if self.masks is None else _take(self.masks, idx, axis=1),
      extras={k: _take(v, idx) for k, v in self.extras.items()},
      weights=None if self.weights is None else _take(self.weights, idx, axis=1),
    )

  def split(
    self, fractions: Sequence[float], *, seed: Optional[int] = None, stratify: bool = False
  ) -> tuple[MultiTaskDataset, ...]:
    """Splits into consecutive parts of the given fractions of ``N``.

    Part ``k`` holds samples ``[round(c_{k-1} N), round(c_k N))`` of the order, where ``c`` is the
    cumulative sum of ``fractions`` (samples beyond ``c_K`` are left out when the fractions sum to
    less than 1). The order is the stored one, or ``np.random.default_rng(seed).permutation(N)``
    when ``seed`` is given.

    ``stratify=True`` keeps the part sizes but gives every part (as nearly as rounding allows) the
    same fraction of each joint label pattern: the tuple of the labels of the binary tasks, where
    a masked label counts as a value of its own (regression tasks are ignored; with no binary task
    this is the plain split). The samples are sorted by pattern (patterns in reflected Gray-code
    order, which without masks makes the positives of the first two binary tasks contiguous runs;
    inside a pattern the stored or seeded order), then dealt out one by one, each to the part
    furthest behind its share so far. Any run of the sorted samples, so every pattern (and,
    without masks, the positives of the first two binary tasks) ends up in each part within about
    1 of its share; other tasks' positives, spread over several patterns, within a few. The
    samples inside a part keep the order. Same ``seed``, same split.

    Examples:
      >>> import numpy as np
      >>> from mtjax import data
      >>> ds = data.MultiTaskDataset(features=np.zeros((8, 1), np.float32),
      ...                            labels=np.array([[1, 1, 0, 0, 0, 0, 0, 0]]), task_names=('a',))
      >>> [float(part.labels.sum()) for part in ds.split((0.5, 0.5), seed=0, stratify=True)]
      [1.0, 1.0]
    """
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr < 0) or fr.sum() > 1 + 1e-9:
      raise ValueError(f"mtjax: split fractions must be non-negative and sum to at most 1, got {fractions}.")
    n = len(self)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    bounds = np.rint(np.concatenate([[0.0], np.cumsum(fr)]) * n).astype(np.int64).clip(0, n)
    binary = [t for t, kind in enumerate(self.task_types) if kind == "binary"]
    if not (stratify and binary and n):
      return tuple(self.subset(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    radix = 2 if self.masks is None else 3
    # the pattern's place in the reflected (boustrophedon) Gray order, one task at a time (small dtypes:
    # a stored dataset of tens of millions of samples is split without holding [T, N] int64 digits)
    rank = np.zeros(n, np.int32 if radix ** len(binary) < 2**31 else np.int64)
    reflect = np.zeros(n, bool)
    for t in binary:
      d = (np.asarray(self.labels[t])[order] > 0.5).astype(np.int8)  # in the order
      if self.masks is not None:
        d = np.where(np.asarray(self.masks[t])[order], d, np.int8(2))
      d = np.where(reflect, np.int8(radix - 1) - d, d)
      rank = rank * radix + d
      reflect ^= d % 2 == 1
      del d
    sorted_positions = np.argsort(rank, kind="stable")  # grouped by pattern, in the order inside a group
    del rank, reflect
    sizes = np.diff(bounds).tolist() + [n - int(bounds[-1] - bounds[0])]  # the parts, then what is left out
    part = _deal(sizes)
    positions = [np.sort(sorted_positions[part == k]) for k in range(len(sizes) - 1)]
    del sorted_positions, part
    parts = []
    while positions:  # each part's positions freed once it is built
      parts.append(self.subset(order[positions.pop(0)]))
    return tuple(parts)

  def batch(self, indices: Index, *, include_extras: bool = False) -> dict[str, Any]:
    """The batch dict of the samples at ``indices``; only those rows are read (fancy indexing).

    Returns:
      ``{'x': features, 'labels': [T, B], 'mask': [T, B], 'weights': [T, B]}``; ``'mask'`` only when
      the dataset has masks, ``'weights'`` only when it has sample weights; ``'extras'`` (a dict) only
      with ``include_extras=True``.
    """
    idx = indices if isinstance(indices, slice) else np.asarray(indices)
    if isinstance(self.features, dict):
      x = {k: _take(v, idx) for k, v in self.features.items()}
    else:
      x = _take(self.features, idx)
    out = {"x": x, "labels": _take(self.labels, idx, axis=1)}
    if self.masks is not None:
      out["mask"] = _take(self.masks, idx, axis=1)
    if self.weights is not None:
      out["weights"] = _take(self.weights, idx, axis=1)
    if include_extras:
      out["extras"] = {k: _take(v, idx) for k, v in self.extras.items()}
    return out


# ----------------------------------------------------------------------------------------------
# Helpers shared by the loaders (private).


def _deal(sizes: Sequence[int]) -> np.ndarray:
  """Deals ``sum(sizes)`` places to parts of the given sizes: place ``i`` goes to the part most behind its share
  ``sizes[k] / N * (i + 1)`` (ties: the first). Every run of consecutive places holds each part's share of it
  within 2, and part ``k`` gets exactly ``sizes[k]`` places."""
  n = int(sum(sizes))
  share = [s / n for s in sizes]
  given = [0] * len(sizes)
  out = np.empty(n, np.int8 if len(sizes) < 128 else np.int64)
  for i in range(n):
    best, lag = 0, -2.0
    for k, w in enumerate(share):
      behind = w * (i + 1) - given[k]
      if behind > lag + 1e-12:
        best, lag = k, behind
    given[best] += 1
    out[i] = best
  return out


def _check_file(path: Union[str, os.PathLike], what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"mtjax: {what} file {path!r} does not exist; pass the path of the file you downloaded.")
  return path


def _vocabulary(train_values: np.ndarray, min_count: int = 1, missing: Any = None) -> np.ndarray:
  """Sorted values of ``train_values`` seen at least ``min_count`` times (``missing`` left out)."""
  values, counts = np.unique(train_values, return_counts=True)
  keep = counts >= min_count
  if missing is not None:
    keep &= values != missing
  return values[keep]


def _map_to_ids(values: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
  """``vocabulary[k] -> k + 1``; anything not in the (sorted) vocabulary -> 0. Returns int32."""
  if vocabulary.size == 0:
    return np.zeros(values.shape, np.int32)
  pos = np.searchsorted(vocabulary, values)
  pos_c = np.minimum(pos, vocabulary.size - 1)
  found = vocabulary[pos_c] == values
  return np.where(found, pos_c + 1, 0).astype(np.int32)


ON_BAD_ROWS = ("error", "skip")


class _RowError(ValueError):
  """What is wrong with one row (without the file and line, which :class:`_BadRows` adds)."""


def _check_on_bad_rows(on_bad_rows: str) -> str:
  if on_bad_rows not in ON_BAD_ROWS:
    raise ValueError(f"mtjax: on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}.")
  return on_bad_rows


class _BadRows:
  """The malformed rows of one file: ``on_bad_rows='error'`` raises at the first, ``'skip'`` counts them.

  Every message reads ``mtjax: '<path>' line <L>: <what is wrong>``.
  """

  def __init__(self, path: str, on_bad_rows: str):
    self.path = path
    self.mode = _check_on_bad_rows(on_bad_rows)
    self.count = 0
    self.first: Optional[str] = None

  def message(self, line: int, why: str) -> str:
    return f"mtjax: {self.path!r} line {line}: {why}"

  def __call__(self, line: int, why: str) -> None:
    if self.mode == "error":
      raise ValueError(self.message(line, why))
    self.count += 1
    if self.first is None:
      self.first = f"line {line}: {why}"

  def warn(self) -> None:
    if self.count:
      warnings.warn(
        f"mtjax: dropped {self.count} malformed row(s) of {self.path!r} (on_bad_rows='skip'); the first, {self.first}",
        stacklevel=4,
      )


def _open_text(path: str):
  """Opens a text file for reading; a UTF-8 byte-order mark at its start is dropped."""
  return open(path, newline="", encoding="utf-8-sig")


def _lines(fh, start: int = 1):
  """``(line number, text, complete)`` of each line, numbered from ``start`` (1: the file's first line);
  ``complete`` is False for a last line without a newline (a file cut mid-row ends so)."""
  for line, text in enumerate(fh, start=start):
    complete = text.endswith("\n")
    yield line, text.rstrip("\r\n"), complete


def _split_fields(text: str) -> list[str]:
  """The comma-separated fields of one CSV line (quoted fields through the ``csv`` module)."""
  if '"' in text:
    return next(csv.reader([text], skipinitialspace=True), [])
  return text.split(",")


def _cut_hint(complete: bool) -> str:
  return "" if complete else " (it is the last line and has no newline: is the file cut short?)"


def _number(text: str, kind: str, column: str):
  """The number in a non-empty field: ``kind`` ``'int'`` (an integer id; ``3.0`` is 3) or ``'float'``.

  Raises:
    _RowError: not a number, a non-finite number (``nan``, ``inf``: the formats have none), or a
      non-integer in an integer column.
  """
  s = text.strip()
  try:
    if "_" in s:
      raise ValueError
    v = float(s)
  except ValueError:
    raise _RowError(f"column {column!r} holds {text!r}, not a number") from None
  if not math.isfinite(v):
    raise _RowError(f"column {column!r} holds {text!r}, a non-finite number (the format has none)")
  if kind == "int":
    if v != math.floor(v):
      raise _RowError(f"column {column!r} holds {text!r}, not an integer")
    try:
      return int(s)
    except ValueError:
      return int(v)
  return v


def _read_header(path: str) -> list[str]:
  with _open_text(path) as fh:
    header = next(csv.reader(fh), None)
  if not header or (len(header) == 1 and not header[0].strip()):
    raise ValueError(f"mtjax: {path!r} line 1: the file is empty; expected a CSV file with a header row.")
  return [h.strip() for h in header]


def _column_indices(path: str, header: Sequence[str], columns: Sequence[str]) -> list[int]:
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f"mtjax: {path!r} line 1: the header lacks column(s) {missing}; it is {list(header)}.")
  return [list(header).index(c) for c in columns]


def _no_rows(path: str, line: int, bad: _BadRows) -> ValueError:
  if bad.count:
    return ValueError(f"mtjax: {path!r}: every row is malformed ({bad.count} dropped); the first, {bad.first}.")
  return ValueError(
    f"mtjax: {path!r} line {line}: no data rows after the header (the file holds only a header; is it cut short?)."
  )


def _read_csv(
  path: str,
  columns: Mapping[str, str],
  *,
  required: Collection[str] = (),
  on_bad_rows: str = "error",
  allowed: Optional[Mapping[str, Sequence[float]]] = None,
  header: Optional[Sequence[str]] = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Reads the named numeric columns of a CSV file with a header row, strictly.

  ``columns`` maps a column name to ``'int'`` (int64 values) or ``'float'`` (float64). A row is
  malformed when it has more or fewer fields than the header (a file cut mid-row ends with such a
  row), or when a read column holds something that is not a number, a non-finite number (``nan``,
  ``inf``), a non-integer in an ``'int'`` column, a value outside ``allowed[name]`` (e.g. a 0/1
  label), or nothing in a ``required`` column. An empty
  field of another column is missing (value 0, flagged in the missing mask). Blank lines are
  ignored; a UTF-8 byte-order mark is dropped. A malformed row raises a ``ValueError`` naming the
  file, the line and the column (``on_bad_rows='error'``) or is dropped with one warning per file
  (``'skip'``); a file with no data row raises.

  The fast path is one ``np.loadtxt`` (C parser) of every column as float64; when it fails or
  finds anything it cannot vouch for, the file is re-read line by line, which decides.

  Returns:
    ``(values, missing)``: dicts ``name -> [N]`` array (values int64/float64, missing bool).
  """
  bad = _BadRows(path, on_bad_rows)
  header = _read_header(path) if header is None else list(header)
  names = list(columns)
  cols = _column_indices(path, header, names)
  required = set(required)
  allowed = {name: tuple(v) for name, v in (allowed or {}).items()}
  fast = _read_csv_fast(path, header, columns, cols, allowed)
  if fast is not None:
    return fast

  with _open_text(path) as fh:
    lines = _lines(fh)
    next(lines, None)
    values, missing = _parse_lines(lines, columns, cols, len(header), required, allowed, bad)
  if not values[names[0]].size:
    raise _no_rows(path, 2, bad)
  bad.warn()
  return values, missing


def _parse_lines(lines, columns, cols, width, required, allowed, bad):
  """The line-by-line reader of :func:`_read_csv` over ``(line number, text, complete)`` data lines (no
  header); malformed rows go to ``bad``. Returns ``(values, missing)`` (possibly with no rows)."""
  names = list(columns)
  spec = [(name, columns[name], j, name in required, allowed.get(name)) for name, j in zip(names, cols)]
  values = {name: [] for name in names}
  missing = {name: [] for name in names}
  for line, text, complete in lines:
    if not text.strip():
      continue
    row = _split_fields(text)
    try:
      if len(row) != width:
        raise _RowError(f"has {len(row)} fields, the header has {width}{_cut_hint(complete)}")
      parsed = []
      for name, kind, j, req, ok in spec:
        s = row[j]
        if not s.strip():
          if req:
            raise _RowError(f"column {name!r} is empty{_cut_hint(complete)}")
          parsed.append(None)
          continue
        v = _number(s, kind, name)
        if ok is not None and v not in ok:
          raise _RowError(f"column {name!r} holds {s!r}, not one of {ok}")
        parsed.append(v)
    except _RowError as e:
      bad(line, str(e))
      continue
    for (name, *_), v in zip(spec, parsed):
      values[name].append(0 if v is None else v)
      missing[name].append(v is None)
  out = {name: np.asarray(values[name], np.int64 if columns[name] == "int" else np.float64) for name in names}
  return out, {name: np.asarray(missing[name], bool) for name in names}


def _read_csv_fast(source, header, columns, cols, allowed, skiprows: int = 1):
  """:func:`_read_csv` through ``np.loadtxt`` (``source``: a path or a text stream), or None where the
  line-by-line reader must decide."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      table = np.loadtxt(source, delimiter=",", skiprows=skiprows, dtype=np.float64, ndmin=2, comments=None)
  except ValueError:  # a row with another field count, an empty field, not a number: the slow reader says which
    return None
  if table.shape[0] == 0 or table.shape[1] != len(header):
    return None
  return _check_fast({name: table[:, j] for name, j in zip(columns, cols)}, columns, allowed)


def _check_fast(table, columns, allowed, missing=None):
  """The float64 columns a fast parser read, as :func:`_read_csv` returns them, or None when a value is one
  the line-by-line reader must judge (non-finite, not allowed, an id that is not an exact integer)."""
  values = {}
  for name, kind in columns.items():
    x = table[name]
    if not np.isfinite(x).all() or (name in allowed and not np.isin(x, allowed[name]).all()):
      return None
    if kind == "int":
      if (np.abs(x) >= 2.0**53).any() or (x != np.floor(x)).any():
        return None
      x = x.astype(np.int64)
    values[name] = np.ascontiguousarray(x)
  n = len(next(iter(values.values())))
  if missing is None:
    missing = {}
  return values, {name: missing.get(name, np.zeros(n, bool)) for name in columns}


def _read_block_arrow(block: bytes, header, columns, cols, required, allowed):
  """Data lines (bytes, no header) through ``pyarrow.csv`` (multi-threaded C++ parser), or None where the
  line-by-line reader must decide (or pyarrow is not installed). An empty field of a column that is not
  required is missing (0), as in the line-by-line reader; quotes are not parsed (such a block falls back)."""
  try:
    import pyarrow as pa
    import pyarrow.csv as pacsv
  except ImportError:
    return None
  names = [f"f{j}" for j in range(len(header))]
  try:
    table = pacsv.read_csv(
      io.BytesIO(block),
      read_options=pacsv.ReadOptions(column_names=names),
      parse_options=pacsv.ParseOptions(
        delimiter=",", quote_char=False, escape_char=False, newlines_in_values=False, ignore_empty_lines=True
      ),
      convert_options=pacsv.ConvertOptions(
        column_types={names[j]: pa.float64() for j in cols},
        include_columns=[names[j] for j in cols],
        null_values=[""],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
      ),
    )
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # the slow reader says which row
    return None
  if table.num_rows == 0:
    return None
  values, missing = {}, {}
  for name, j in zip(columns, cols):
    column = table.column(names[j])
    if column.null_count:
      if name in required:
        return None
      missing[name] = column.is_null().to_numpy(zero_copy_only=False)
      column = column.fill_null(0.0)
    values[name] = column.to_numpy()
  return _check_fast(values, columns, allowed, missing)


def _lone_cr(data: bytes) -> bool:
  """Whether ``data`` holds a carriage return that is not part of ``\\r\\n`` (a line end of its own in text mode)."""
  return b"\r" in data and data.count(b"\r") != data.count(b"\r\n")


# The most lines :func:`_read_csv_chunks` parses at once: larger pieces are slower (fresh memory for every
# piece's buffers instead of reused memory: 120k rows/s at 1M lines, 200k rows/s at 64k, AliExpress rows on 2 cores).
_PIECE_ROWS = 1 << 16


def _read_csv_chunks(
  path: str,
  columns: Mapping[str, str],
  *,
  chunk_rows: int = 1_000_000,
  required: Collection[str] = (),
  on_bad_rows: str = "error",
  allowed: Optional[Mapping[str, Sequence[float]]] = None,
  header: Optional[Sequence[str]] = None,
  use_arrow: bool = True,
):
  """:func:`_read_csv` a chunk of at most ``chunk_rows`` lines at a time (and at most :data:`_PIECE_ROWS`): yields
  ``(values, missing)`` per chunk (chunks whose rows were all dropped or blank are left out), so memory is
  bounded by the chunk, not the file.

  The concatenated chunks equal :func:`_read_csv` of the whole file, and so do the errors (the same message,
  with the file's own line numbers) and the one ``on_bad_rows='skip'`` warning (given after the last chunk).
  Each chunk goes through ``pyarrow.csv`` (``use_arrow`` and installed) or ``np.loadtxt``, and through the
  line-by-line reader where those cannot vouch for it.
  """
  bad = _BadRows(path, on_bad_rows)
  header = _read_header(path) if header is None else list(header)
  cols = _column_indices(path, header, list(columns))
  required = set(required)
  allowed = {name: tuple(v) for name, v in (allowed or {}).items()}
  if chunk_rows < 1:
    raise ValueError(f"mtjax: chunk_rows must be >= 1, got {chunk_rows}.")
  rows, line = 0, 2
  with open(path, "rb") as fh:
    carry = fh.readline()  # the header line (with the lines after it when they end in a lone CR)
    carry_lines = 0
    if _lone_cr(carry):
      text_lines = list(io.StringIO(carry.decode("utf-8-sig"), newline=""))
      carry, carry_lines = "".join(text_lines[1:]).encode(), len(text_lines) - 1
    else:
      carry = b""
    while True:
      raw = list(itertools.islice(fh, min(chunk_rows, _PIECE_ROWS)))
      block = carry + b"".join(raw)
      count, carry, carry_lines = len(raw) + carry_lines, b"", 0
      del raw
      if not block:
        break
      if _lone_cr(block):  # text mode counts a lone CR as a line end: number the lines as the file reader does
        lines = list(_lines(io.StringIO(block.decode("utf-8"), newline=""), start=line))
        parsed, count = None, len(lines)
      else:
        parsed = _read_block_arrow(block, header, columns, cols, required, allowed) if use_arrow else None
        if parsed is None:
          text = block.decode("utf-8")
          parsed = _read_csv_fast(io.StringIO(text), header, columns, cols, allowed, skiprows=0)
          lines = _lines(io.StringIO(text, newline=""), start=line)
      if parsed is None:
        parsed = _parse_lines(lines, columns, cols, len(header), required, allowed, bad)
      line += count
      n = len(next(iter(parsed[0].values())))
      if n:
        rows += n
        yield parsed
  if not rows:
    raise _no_rows(path, 2, bad)
  bad.warn()
