"""The container every generator and loader returns, and small helpers the loaders share."""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence, Union

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

  def __post_init__(self):
    setattr_ = lambda k, v: object.__setattr__(self, k, v)
    labels = np.asarray(self.labels)
    if labels.ndim != 2:
      raise ValueError(f"mtjax: MultiTaskDataset.labels must be [T, N], got shape {labels.shape}; "
                       "put the task axis first (labels.T if yours is [N, T]).")
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
    return (f"MultiTaskDataset(num_samples={len(self)}, tasks={self.task_names}, features={feats}, "
            f"masks={self.masks is not None}, extras={sorted(self.extras)})")

  def subset(self, indices: Index) -> "MultiTaskDataset":
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
        extras={k: _take(v, idx) for k, v in self.extras.items()})

  def split(self, fractions: Sequence[float], *, seed: Optional[int] = None) -> tuple["MultiTaskDataset", ...]:
    """Splits into consecutive parts of the given fractions of ``N``.

    Part ``k`` holds samples ``[round(c_{k-1} N), round(c_k N))`` of the order, where ``c`` is the
    cumulative sum of ``fractions`` (samples beyond ``c_K`` are left out when the fractions sum to
    less than 1). The order is the stored one, or ``np.random.default_rng(seed).permutation(N)``
    when ``seed`` is given.
    """
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr < 0) or fr.sum() > 1 + 1e-9:
      raise ValueError(f"mtjax: split fractions must be non-negative and sum to at most 1, got {fractions}.")
    n = len(self)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    bounds = np.rint(np.concatenate([[0.0], np.cumsum(fr)]) * n).astype(np.int64).clip(0, n)
    return tuple(self.subset(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))

  def batch(self, indices: Index, *, include_extras: bool = False) -> dict[str, Any]:
    """The batch dict of the samples at ``indices``; only those rows are read (fancy indexing).

    Returns:
      ``{'x': features, 'labels': [T, B], 'mask': [T, B]}``; ``'mask'`` only when the dataset has
      masks; ``'extras'`` (a dict) only with ``include_extras=True``.
    """
    idx = indices if isinstance(indices, slice) else np.asarray(indices)
    if isinstance(self.features, dict):
      x = {k: _take(v, idx) for k, v in self.features.items()}
    else:
      x = _take(self.features, idx)
    out = {"x": x, "labels": _take(self.labels, idx, axis=1)}
    if self.masks is not None:
      out["mask"] = _take(self.masks, idx, axis=1)
    if include_extras:
      out["extras"] = {k: _take(v, idx) for k, v in self.extras.items()}
    return out


# ----------------------------------------------------------------------------------------------
# Helpers shared by the loaders (private).


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


def _read_header(path: str) -> list[str]:
  with open(path, newline="") as fh:
    header = next(csv.reader(fh), None)
  if not header:
    raise ValueError(f"mtjax: {path!r} is empty; expected a CSV file with a header row.")
  return [h.strip() for h in header]


def _column_indices(path: str, header: Sequence[str], columns: Sequence[str]) -> list[int]:
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f"mtjax: {path!r} lacks column(s) {missing}; its header is {list(header)}.")
  return [list(header).index(c) for c in columns]


def _read_numeric_columns(path: str, columns: Sequence[str], dtype, *, header: Optional[Sequence[str]] = None,
                          skip_header: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads the named numeric columns of a CSV file into ``[N, C]``.

  The fast path is ``np.loadtxt`` (C parser). If a field is empty or not a number of ``dtype``
  (e.g. "1.0" in an int column) the file is re-read with the ``csv`` module: ints are parsed
  through ``float``, and empty / unparsable fields are reported in the returned ``[N, C]``
  missing mask (their value is 0).

  Returns:
    ``(values [N, C] of dtype, missing [N, C] bool)``.
  """
  header = _read_header(path) if header is None else list(header)
  cols = _column_indices(path, header, columns)
  try:
    values = np.loadtxt(path, delimiter=",", skiprows=1 if skip_header else 0, usecols=cols, dtype=dtype,
                        ndmin=2, comments=None)
    return values, np.zeros(values.shape, bool)
  except ValueError:
    pass
  is_int = np.issubdtype(np.dtype(dtype), np.integer)
  rows, missing = [], []
  with open(path, newline="") as fh:
    reader = csv.reader(fh)
    if skip_header:
      next(reader, None)
    for line, row in enumerate(reader, start=2 if skip_header else 1):
      if not row:
        continue
      vals, miss = [], []
      for c in cols:
        s = row[c].strip() if c < len(row) else ""
        try:
          v = float(s)
          if is_int:
            v = int(v)
          vals.append(v)
          miss.append(False)
        except ValueError:
          if s not in ("", "?", "nan", "NaN", "NA", "null"):
            raise ValueError(f"mtjax: {path!r} line {line}: column {header[c]!r} holds {s!r}, not a number.")
          vals.append(0)
          miss.append(True)
      rows.append(vals)
      missing.append(miss)
  values = np.asarray(rows, dtype=dtype).reshape(len(rows), len(cols))
  return values, np.asarray(missing, bool).reshape(len(rows), len(cols))
