"""Datasets stored on disk: written once, read a batch at a time with bounded memory.

A store is a folder per split: ``rows.bin``, one fixed-width little-endian record per sample (a
NumPy structured dtype with the fields ``x.<feature>`` -- or ``x`` for a dense feature array --
``labels``, ``masks``, ``weights``), the ``[N, T]`` columns ``labels.bin`` / ``masks.bin`` /
``weights.bin`` and the ``extra.<name>.bin`` columns for whole-column reads (splits, evaluation),
and ``manifest.json`` (row count, the record fields, dtypes and shapes, CRC32 of every file,
tasks, the :class:`~mtjax.models.FeatureSpec`, metadata). The files are the arrays' bytes, so any
tool can read them (``np.memmap('rows.bin', dtype=<the manifest's fields>)``).

Why this form (measured in ``benchmarks/data_throughput.py``): a shuffled batch is a gather of
``B`` random samples. Row-major records make that ``B`` reads of one record each (``pread``,
through the OS page cache: ~1 ms for 1,024 rows); a file per column would take one read per row
and column, and Parquet decodes every row group (tens of thousands of rows) holding one of the
rows (~100x slower). The batch path does not read through a memory map: a modern kernel maps a
whole page-cache folio (up to 2 MiB) at each fault, so a 1,024-row gather from a mapped 5 GiB
column put ~1.5 GiB into the process's resident set.

Writing is all-or-nothing: :class:`StoreWriter` writes into ``<split>.partial/`` and renames it
when :meth:`StoreWriter.close` has written the manifest, so a killed conversion leaves no store
that looks complete. Opening checks every file's size against the manifest (a truncated file is a
clear error naming it); ``open_store(..., verify=True)`` also checks the checksums.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec
from mtjax.models._features import IdSequence

PathLike = Union[str, os.PathLike]

MANIFEST = "manifest.json"
RECORDS = "rows.bin"
FORMAT = "mtjax-store"
VERSION = 2
RELEASE_EVERY = 64  # batches between two releases of the mapped pages (bounds the resident set)


class StoreError(ValueError):
  """A store that cannot be opened or written; messages start with ``mtjax:``."""


# ----------------------------------------------------------------------------------------------
# The spec and metadata as JSON.


def spec_to_json(spec: Optional[FeatureSpec]) -> Optional[dict]:
  if spec is None:
    return None
  return {
    "categorical": [dataclasses.asdict(f) for f in spec.categorical],
    "dense": [dataclasses.asdict(f) for f in spec.dense],
    "sequences": [dataclasses.asdict(f) for f in spec.sequences],
    "oov": spec.oov,
  }


def spec_from_json(raw: Optional[Mapping[str, Any]]) -> Optional[FeatureSpec]:
  if raw is None:
    return None
  return FeatureSpec(
    categorical=tuple(Categorical(**f) for f in raw.get("categorical", ())),
    dense=tuple(Dense(**f) for f in raw.get("dense", ())),
    sequences=tuple(IdSequence(**f) for f in raw.get("sequences", ())),
    oov=raw.get("oov", "reserved"),
  )


def _jsonable(value: Any, folder: str, key: str) -> Any:
  """Metadata as JSON: arrays go to ``meta.<key>.npy`` files, numpy scalars to Python numbers."""
  if isinstance(value, np.ndarray):
    name = f"meta.{key}.npy"
    np.save(os.path.join(folder, name), value, allow_pickle=False)
    return {"__npy__": name}
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, folder, f"{key}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, folder, f"{key}.{i}") for i, v in enumerate(value)]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)  # not representable: kept as its description


def _from_jsonable(value: Any, folder: str) -> Any:
  if isinstance(value, Mapping):
    if set(value) == {"__npy__"}:
      return np.load(os.path.join(folder, value["__npy__"]), allow_pickle=False)
    return {k: _from_jsonable(v, folder) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_jsonable(v, folder) for v in value]
  return value


# ----------------------------------------------------------------------------------------------
# Writing.


def _check_name(name: str) -> str:
  if not name or "/" in name or os.sep in name or name.startswith("."):
    raise StoreError(f"mtjax: {name!r} cannot be stored (a feature or extra name must be a plain file name part).")
  return name


class StoreWriter:
  """Writes a dataset to a store folder in chunks of rows (a converter's streaming output).

  Every :meth:`append` adds ``n`` rows: the same keys, dtypes and trailing shapes each time (the
  first chunk fixes them). Nothing is visible at ``path`` until :meth:`close` (files go to
  ``path + '.partial'``); :meth:`abort` (or an exception inside a ``with`` block) removes them.

  Examples:
    >>> import numpy as np, tempfile, os
    >>> from mtjax import data
    >>> folder = os.path.join(tempfile.mkdtemp(), 'train')
    >>> with data.StoreWriter(folder, task_names=('click', 'buy')) as w:
    ...   for _ in range(3):
    ...     w.append(np.ones((4, 2), np.float32), labels=np.zeros((2, 4), np.float32))
    >>> len(data.open_store(folder))
    12

  Args:
    path: the split's folder (created; must not exist unless ``overwrite``).
    task_names: the ``T`` task names.
    task_types: ``"binary"`` / ``"regression"`` per task (default all binary).
    spec: the :class:`~mtjax.models.FeatureSpec` of a feature dict.
    metadata: JSON-able description (arrays are stored as ``.npy`` files); :meth:`close` may add more.
    overwrite: replace an existing store at ``path``.
  """

  def __init__(
    self,
    path: PathLike,
    *,
    task_names: Sequence[str],
    task_types: Optional[Sequence[str]] = None,
    spec: Optional[FeatureSpec] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
  ):
    self.path = os.path.abspath(os.fspath(path))
    if os.path.exists(self.path) and not overwrite:
      raise StoreError(f"mtjax: {self.path!r} exists; pass overwrite=True (mtjax convert --overwrite) to replace it.")
    self.partial = self.path + ".partial"
    shutil.rmtree(self.partial, ignore_errors=True)
    os.makedirs(self.partial)
    self.task_names = tuple(task_names)
    self.task_types = tuple(task_types) if task_types is not None else ("binary",) * len(self.task_names)
    self.spec = spec
    self.metadata = dict(metadata or {})
    self.num_rows = 0
    self._columns: dict[str, dict] = {}  # column file -> {dtype, shape (trailing), crc, handle}
    self._record: Optional[dict] = None  # the row-major record file: {dtype, fields, crc32, handle}
    self._dense_features: Optional[bool] = None
    self._records_patched = False  # set_rows changed the record file in place: its CRC32 is recomputed at close
    self._closed = False

  def __enter__(self) -> StoreWriter:
    return self

  def __exit__(self, kind, value, tb) -> None:
    if kind is None:
      self.close()
    else:
      self.abort()

  def _write(self, file: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    col = self._columns.get(file)
    if col is None:
      if self.num_rows:
        raise StoreError(
          f"mtjax: StoreWriter: {file!r} appears after the first chunk; every chunk needs the same keys."
        )
      col = {
        "dtype": array.dtype.newbyteorder("<").str,
        "shape": list(array.shape[1:]),
        "crc32": 0,
        "handle": open(os.path.join(self.partial, file), "wb"),  # noqa: SIM115 (closed in close/abort)
      }
      self._columns[file] = col
    if array.dtype.newbyteorder("<").str != col["dtype"] or list(array.shape[1:]) != col["shape"]:
      raise StoreError(
        f"mtjax: StoreWriter: {file!r} chunk is {array.dtype}{list(array.shape[1:])}, the first was "
        f"{col['dtype']}{col['shape']}; every chunk needs the same dtypes and shapes."
      )
    data = array.astype(col["dtype"], copy=False).tobytes()
    col["crc32"] = zlib.crc32(data, col["crc32"])
    col["handle"].write(data)

  def _write_records(self, fields: Mapping[str, np.ndarray], n: int) -> None:
    if self._record is None:
      dtype = np.dtype([(k, v.dtype.newbyteorder("<"), v.shape[1:]) for k, v in fields.items()])
      self._record = {
        "dtype": dtype,
        "crc32": 0,
        "handle": open(os.path.join(self.partial, RECORDS), "wb"),  # noqa: SIM115 (closed in close/abort)
      }
    rec = self._record
    got = [(k, v.dtype.newbyteorder("<"), v.shape[1:]) for k, v in fields.items()]
    want = [(k, rec["dtype"].fields[k][0].base, rec["dtype"].fields[k][0].shape) for k in rec["dtype"].names]
    if [g[0] for g in got] != [w[0] for w in want] or any(g[1:] != w[1:] for g, w in zip(got, want)):
      desc = lambda fs: ", ".join(f"{k}: {d.name}{list(sh)}" for k, d, sh in fs)
      raise StoreError(
        f"mtjax: StoreWriter: a chunk of ({desc(got)}), the first chunk was ({desc(want)}); "
        "every chunk needs the same keys, dtypes and shapes."
      )
    out: Any = np.empty(n, rec["dtype"])  # a structured array (indexed by field name)
    for k, v in fields.items():
      out[k] = v
    data = out.tobytes()
    rec["crc32"] = zlib.crc32(data, rec["crc32"])
    rec["handle"].write(data)

  def append(
    self,
    features: Union[np.ndarray, Mapping[str, np.ndarray]],
    labels: np.ndarray,
    *,
    masks: Optional[np.ndarray] = None,
    weights: Optional[np.ndarray] = None,
    extras: Optional[Mapping[str, np.ndarray]] = None,
  ) -> None:
    """Adds ``n`` rows: features ``[n, ...]`` (a dict or one dense array), labels/masks/weights ``[T, n]``."""
    if self._closed:
      raise StoreError("mtjax: StoreWriter is closed.")
    labels = np.asarray(labels, np.float32)
    if labels.ndim != 2 or labels.shape[0] != len(self.task_names):
      raise StoreError(f"mtjax: StoreWriter: labels must be [T={len(self.task_names)}, n], got {labels.shape}.")
    n = labels.shape[1]
    dense = not isinstance(features, Mapping)
    if self._dense_features is not None and dense != self._dense_features:
      raise StoreError("mtjax: StoreWriter: every chunk's features must be a dict, or every chunk's one array.")
    self._dense_features = dense
    feats = {"": np.asarray(features)} if dense else {_check_name(k): np.asarray(v) for k, v in features.items()}
    arrays = {("x.bin" if k == "" else f"x.{k}.bin"): v for k, v in feats.items()}
    arrays["labels.bin"] = labels.T
    for name, value, dtype in (("masks.bin", masks, bool), ("weights.bin", weights, np.float32)):
      if value is not None:
        value = np.asarray(value, dtype)
        if value.shape != labels.shape:
          raise StoreError(f"mtjax: StoreWriter: {name[:-4]} must be [T, n] = {labels.shape}, got {value.shape}.")
        arrays[name] = value.T
    for k, v in (extras or {}).items():
      arrays[f"extra.{_check_name(k)}.bin"] = np.asarray(v)
    for file, value in arrays.items():
      if value.shape[0] != n:
        raise StoreError(f"mtjax: StoreWriter: {file!r} has {value.shape[0]} rows in a chunk of {n} labels.")
    columns = {f for f in arrays if not f.startswith("x")}
    if self.num_rows and columns != set(self._columns):
      raise StoreError(
        f"mtjax: StoreWriter: a chunk with arrays {sorted(arrays)}, the first had {sorted(self._columns)} "
        "(and features); every chunk needs the same keys."
      )
    # one row-major record per sample (features, labels, masks, weights): a batch reads B records;
    # labels / masks / weights / extras also as columns, for whole-column reads (splits, evaluation)
    record = {k[:-4]: v for k, v in arrays.items() if not k.startswith("extra.")}
    self._write_records(record, n)
    for file, value in arrays.items():
      if not file.startswith("x"):
        self._write(file, value)
    self.num_rows += n

  def set_rows(self, feature: str, rows: np.ndarray, value: Any) -> None:
    """Sets the already written rows ``rows`` of feature ``feature`` to ``value`` (before :meth:`close`).

    For values known only at the end of a streaming conversion (e.g. the id of a missing value, one past
    the largest id of train AND test); the file's checksum is recomputed at :meth:`close`.
    """
    field = "x" if feature == "" else f"x.{feature}"
    rec = self._record
    if rec is None or field not in rec["dtype"].names or self._closed:
      names = [] if rec is None else [f[2:] for f in rec["dtype"].names if f.startswith("x.")]
      raise StoreError(f"mtjax: StoreWriter.set_rows: no open feature {feature!r} (written: {names}).")
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise StoreError(f"mtjax: StoreWriter.set_rows: rows must be in [0, {self.num_rows}).")
    rec["handle"].flush()
    mapped: Any = np.memmap(os.path.join(self.partial, RECORDS), dtype=rec["dtype"], mode="r+", shape=(self.num_rows,))
    mapped[field][rows] = value
    mapped.flush()
    del mapped
    self._records_patched = True

  def close(self, metadata: Optional[Mapping[str, Any]] = None, *, spec: Optional[FeatureSpec] = None) -> str:
    """Writes the manifest (``metadata`` / ``spec`` added or replaced), makes the store visible; returns its path."""
    if self._closed:
      return self.path
    if not self.num_rows:
      self.abort()
      raise StoreError(f"mtjax: StoreWriter: no rows were written to {self.path!r}.")
    if spec is not None:
      self.spec = spec
    self.metadata.update(metadata or {})
    rec = self._record
    assert rec is not None
    for col in [*self._columns.values(), rec]:
      col["handle"].flush()
      os.fsync(col["handle"].fileno())
      col["handle"].close()
    if self._records_patched:  # set_rows changed the record file after its running checksum
      rec["crc32"] = _file_crc32(os.path.join(self.partial, RECORDS))
    columns = {
      f: {"dtype": c["dtype"], "shape": c["shape"], "crc32": c["crc32"] & 0xFFFFFFFF} for f, c in self._columns.items()
    }
    records = {
      "file": RECORDS,
      "fields": [
        [k, rec["dtype"].fields[k][0].base.str, list(rec["dtype"].fields[k][0].shape)] for k in rec["dtype"].names
      ],
      "itemsize": rec["dtype"].itemsize,
      "crc32": rec["crc32"] & 0xFFFFFFFF,
    }
    manifest = {
      "format": FORMAT,
      "version": VERSION,
      "num_samples": self.num_rows,
      "task_names": list(self.task_names),
      "task_types": list(self.task_types),
      "spec": spec_to_json(self.spec),
      "dense_features": bool(self._dense_features),
      "records": records,
      "columns": columns,
      "metadata": _jsonable(self.metadata, self.partial, "metadata"),
    }
    with open(os.path.join(self.partial, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(self.path):
      shutil.rmtree(self.path)
    os.rename(self.partial, self.path)
    self._closed = True
    return self.path

  def abort(self) -> None:
    """Removes what was written (the store at ``path`` is left as it was)."""
    for col in [*self._columns.values(), *([self._record] if self._record else [])]:
      col["handle"].close()
    shutil.rmtree(self.partial, ignore_errors=True)
    self._closed = True


def write_store(
  dataset: Union[MultiTaskDataset, Mapping[str, MultiTaskDataset]],
  path: PathLike,
  *,
  chunk_rows: int = 1 << 18,
  overwrite: bool = False,
) -> str:
  """Writes a :class:`MultiTaskDataset` (or a loader's dict of splits, one sub-folder each) to a store.

  Use it to convert the output of any loader once (``write_store(data.census_income(...), 'census')``)
  and train from the store afterwards with bounded memory (:func:`open_store`). For files larger
  than memory use a streaming converter (:func:`aliexpress_to_store`) or :class:`StoreWriter`.

  Examples:
    >>> import numpy as np, tempfile, os
    >>> from mtjax import data
    >>> ds = data.mmoe_synthetic(100, 0.5, dim=4, seed=0)
    >>> folder = data.write_store({'train': ds}, os.path.join(tempfile.mkdtemp(), 'store'))
    >>> stored = data.open_store(folder)['train']
    >>> bool(np.array_equal(stored.batch(np.arange(5))['x'], ds.batch(np.arange(5))['x']))
    True

  Returns:
    The store's path.
  """
  path = os.path.abspath(os.fspath(path))
  if isinstance(dataset, Mapping):
    if os.path.exists(path) and not overwrite:
      raise StoreError(f"mtjax: {path!r} exists; pass overwrite=True (mtjax convert --overwrite) to replace it.")
    os.makedirs(path, exist_ok=True)
    for split, ds in dataset.items():
      write_store(ds, os.path.join(path, _check_name(split)), chunk_rows=chunk_rows, overwrite=True)
    return path
  if not isinstance(dataset, MultiTaskDataset):
    raise StoreError(f"mtjax: write_store takes a MultiTaskDataset or a dict of them, got {type(dataset).__name__}.")
  with StoreWriter(
    path,
    task_names=dataset.task_names,
    task_types=dataset.task_types,
    spec=dataset.spec,
    metadata=dataset.metadata,
    overwrite=overwrite,
  ) as w:
    n = len(dataset)
    for lo in range(0, n, int(chunk_rows)):
      b = dataset.batch(slice(lo, min(n, lo + int(chunk_rows))), include_extras=True)
      w.append(b["x"], b["labels"], masks=b.get("mask"), weights=b.get("weights"), extras=b.get("extras"))
  return path


# ----------------------------------------------------------------------------------------------
# Reading.


def _read_manifest(path: str) -> dict:
  file = os.path.join(path, MANIFEST)
  if not os.path.isfile(file):
    if os.path.isdir(path + ".partial"):
      raise StoreError(
        f"mtjax: {path!r} is an unfinished store ({path}.partial exists: the conversion was interrupted); "
        "run the conversion again."
      )
    raise StoreError(
      f"mtjax: {path!r} is not an mtjax store (no {MANIFEST}); write one with write_store or a converter."
    )
  try:
    with open(file) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise StoreError(f"mtjax: {file!r} cannot be read as a store manifest: {e}") from e
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise StoreError(f"mtjax: {file!r} is not a version-{VERSION} {FORMAT} manifest.")
  return manifest


def _file_crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc & 0xFFFFFFFF


def _map(path: str, file: str, column: Mapping[str, Any], num_samples: int, verify: bool) -> np.memmap:
  full = os.path.join(path, file)
  dtype = np.dtype(column["dtype"])
  shape = (num_samples, *column["shape"])
  expected = int(np.prod(shape)) * dtype.itemsize
  size = os.path.getsize(full) if os.path.isfile(full) else -1
  if size != expected:
    what = "is missing" if size < 0 else f"has {size} bytes"
    raise StoreError(
      f"mtjax: store file {full!r} {what}; the manifest says {num_samples} rows of {dtype}{list(shape[1:])} "
      f"= {expected} bytes (a truncated or damaged store: convert again)."
    )
  if verify:
    if _file_crc32(full) != column["crc32"]:
      raise StoreError(f"mtjax: store file {full!r} fails its CRC32 checksum (damaged on disk): convert again.")
  if expected == 0:
    return np.zeros(shape, dtype)  # type: ignore[return-value]  # mmap cannot map an empty file
  return np.memmap(full, dtype=dtype, mode="r", shape=shape)


class _RowReader:
  """Reads records of the row-major file by ``pread`` (one call per row, one for a contiguous range).

  Not through the memory map: a modern kernel maps a whole large page-cache folio (up to 2 MiB) at
  each fault, so gathering 1,024 random rows of a mapped file put ~1.5 GiB into the process's
  resident set (measured on a 6 GiB store); ``pread`` copies only the rows' bytes.
  """

  def __init__(self, file: str, dtype: np.dtype, num_rows: int):
    self.file, self.dtype, self.num_rows = file, dtype, num_rows
    self._fd, self._pid = None, None

  def _handle(self) -> int:
    if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
      self._fd, self._pid = os.open(self.file, os.O_RDONLY), os.getpid()
    return self._fd

  def __del__(self):
    if self._fd is not None and self._pid == os.getpid():
      try:
        os.close(self._fd)
      except OSError:
        pass

  def read(self, rows) -> np.ndarray:
    size = self.dtype.itemsize
    fd = self._handle()
    if isinstance(rows, slice):
      lo, hi, step = rows.indices(self.num_rows)
      if step == 1:
        buf = os.pread(fd, max(0, hi - lo) * size, lo * size)
        count = max(0, hi - lo)
      else:
        rows = np.arange(lo, hi, step)
    if not isinstance(rows, slice):
      rows = np.asarray(rows, np.int64)
      rows = np.where(rows < 0, rows + self.num_rows, rows)
      if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
        raise IndexError(f"mtjax: row index out of range for a stored dataset of {self.num_rows} rows.")
      count = rows.size
      if count and int(rows[-1]) - int(rows[0]) == count - 1 and np.all(np.diff(rows) == 1):
        buf = os.pread(fd, count * size, int(rows[0]) * size)
      else:
        buf = b"".join([os.pread(fd, size, r * size) for r in rows.tolist()])
    if len(buf) != count * size:
      raise StoreError(f"mtjax: store file {self.file!r} ended early (truncated after it was opened).")
    return np.frombuffer(buf, self.dtype, count=count)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class StoredDataset(MultiTaskDataset):
  """A :class:`MultiTaskDataset` whose arrays stay on disk (a store's records and columns).

  It is a ``MultiTaskDataset``: :func:`mtjax.training.fit`, :func:`mtjax.training.evaluate`,
  :class:`BatchIterator` and :meth:`batch` take it unchanged, and a batch of the same indices is
  bit-identical to the in-memory dataset's. :meth:`batch` reads only its samples' records (one
  ``pread`` each, through the OS page cache), so the resident memory stays bounded however large
  the files are. The array attributes (``features``, ``labels``, ...) are memory maps of the files,
  for slices and whole-column reads (splits, evaluation); their mapped pages are released every
  :data:`RELEASE_EVERY` batches.
  :meth:`subset` (and hence :meth:`split`) gives a view of the same files (the row indices and the
  ``[T, n]`` labels / masks / weights of the part in memory, not the features); :meth:`to_memory`
  loads everything.

  Open one with :func:`open_store`.
  """

  path: str = ""
  rows: Optional[np.ndarray] = None  # a view's rows of the files (None: all, in order)

  def __post_init__(self):  # the arrays come from a checked manifest: no pass over the data
    object.__setattr__(self, "_batches", [0])

  def __repr__(self) -> str:
    return f"StoredDataset({self.path!r}, num_samples={len(self)}, tasks={self.task_names})"

  def _mapped(self) -> list:
    feats = self.features.values() if isinstance(self.features, Mapping) else [self.features]
    arrays = [*feats, *self.extras.values()]
    if self.rows is None:
      arrays += [self.labels, self.masks, self.weights]
    return [a for a in arrays if isinstance(a, np.memmap)]

  def release(self) -> None:
    """Drops the mapped pages from this process's resident memory (the page cache keeps them)."""
    for a in self._mapped():
      m = getattr(a, "_mmap", None)
      if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)

  def _file_rows(self, indices):
    idx = indices if isinstance(indices, slice) else np.asarray(indices)
    if not isinstance(idx, slice) and idx.dtype == bool:
      idx = np.flatnonzero(idx)
    return idx if self.rows is None else self.rows[idx]

  def _reader(self) -> _RowReader:
    reader = self.__dict__.get("_row_reader")
    if reader is None:
      m = _read_manifest(self.path)
      reader = _RowReader(os.path.join(self.path, RECORDS), _record_dtype(m), int(m["num_samples"]))
      object.__setattr__(self, "_row_reader", reader)
    return reader

  def batch(self, indices, *, include_extras: bool = False) -> dict[str, Any]:
    """The batch dict of the samples at ``indices`` (only those rows are read); see :meth:`MultiTaskDataset.batch`.

    Features (and, unless replaced, labels / masks / weights) come from the rows' records, read with
    ``pread``; arrays replaced in memory (``dataclasses.replace``) are indexed as they are.
    """
    idx = indices if isinstance(indices, slice) else np.asarray(indices)
    rows = self._file_rows(idx)
    reader = self._reader()
    recs = reader.read(rows)
    records_file = reader.file

    def field(a, name):
      if isinstance(a, np.memmap) and a.filename == records_file:
        return np.ascontiguousarray(recs[name])
      return np.asarray(a[rows])

    def per_task(a, name):  # [T, n]: the records' copy while the array is the store's own column
      if self.rows is None and isinstance(a, np.memmap) and name in recs.dtype.names:
        return np.ascontiguousarray(recs[name].T)
      return np.asarray(a[:, idx])

    feats = self.features
    x = {k: field(v, f"x.{k}") for k, v in feats.items()} if isinstance(feats, Mapping) else field(feats, "x")
    out = {"x": x, "labels": per_task(self.labels, "labels")}
    if self.masks is not None:
      out["mask"] = per_task(self.masks, "masks")
    if self.weights is not None:
      out["weights"] = per_task(self.weights, "weights")
    if include_extras:
      out["extras"] = {k: np.asarray(v[rows]) for k, v in self.extras.items()}
    counter = self.__dict__["_batches"]
    counter[0] += 1
    if counter[0] % RELEASE_EVERY == 0:
      self.release()
    return out

  def subset(self, indices) -> StoredDataset:
    """A view of the samples at ``indices`` on the same files (labels / masks / weights of the part in memory)."""
    idx = indices if isinstance(indices, slice) else np.asarray(indices)
    if not isinstance(idx, slice) and idx.dtype == bool:
      if idx.shape != (len(self),):
        raise ValueError(f"mtjax: a boolean subset mask must have shape ({len(self)},), got {idx.shape}.")
      idx = np.flatnonzero(idx)
    rows = np.arange(len(self))[idx] if self.rows is None else self.rows[idx]
    part = lambda a: None if a is None else np.ascontiguousarray(a[:, idx])
    return dataclasses.replace(
      self,
      labels=part(self.labels),
      masks=part(self.masks),
      weights=part(self.weights),
      rows=np.asarray(
        rows, np.int32 if len(self) < 2**31 and (self.rows is None or self.rows.dtype == np.int32) else np.int64
      ),
    )

  def split(self, fractions, *, seed=None, stratify: bool = False) -> tuple:
    """:meth:`MultiTaskDataset.split` into views of the same files; the pages its label scan mapped are released."""
    try:
      return super().split(fractions, seed=seed, stratify=stratify)
    finally:
      self.release()

  def to_memory(self) -> MultiTaskDataset:
    """Every sample as an in-memory :class:`MultiTaskDataset` (reads the whole store)."""
    b = self.batch(slice(None) if self.rows is None else np.arange(len(self)), include_extras=True)
    return MultiTaskDataset(
      features=b["x"],
      labels=b["labels"],
      task_names=self.task_names,
      spec=self.spec,
      masks=b.get("mask"),
      task_types=self.task_types,
      extras=b.get("extras", {}),
      metadata=self.metadata,
      weights=b.get("weights"),
    )

  def __getstate__(self):  # pickled (grain worker processes) as its path and view, re-mapped when loaded
    return {"path": self.path, "rows": self.rows}

  def __setstate__(self, state):
    other = _open_split(state["path"], verify=False)
    if state["rows"] is not None:
      other = other.subset(state["rows"])
    self.__dict__.update(other.__dict__)


def _record_dtype(manifest: Mapping[str, Any]) -> np.dtype:
  return np.dtype([(name, np.dtype(dt), tuple(shape)) for name, dt, shape in manifest["records"]["fields"]])


def _open_split(path: str, verify: bool) -> StoredDataset:
  m = _read_manifest(path)
  n = int(m["num_samples"])
  dtype = _record_dtype(m)
  if dtype.itemsize != m["records"]["itemsize"]:
    raise StoreError(f"mtjax: store {path!r}: its manifest's record fields do not add up to its record size.")
  records = m["records"]
  column = {"dtype": np.dtype((np.void, dtype.itemsize)).str, "shape": [], "crc32": records["crc32"]}
  _map(path, records["file"], column, n, verify)  # the size (and checksum) of the record file
  rec = np.memmap(os.path.join(path, records["file"]), dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
  mapped = {file: _map(path, file, col, n, verify) for file, col in m["columns"].items()}
  if m["dense_features"]:
    features: Any = rec["x"]
  else:
    features = {name[2:]: rec[name] for name in dtype.names or () if name.startswith("x.")}
  extras = {f[6:-4]: a for f, a in mapped.items() if f.startswith("extra.")}
  labels = mapped["labels.bin"]
  names = tuple(m["task_names"])
  if labels.shape != (n, len(names)):
    raise StoreError(f"mtjax: store {path!r}: labels.bin is {labels.shape}, the manifest names {len(names)} tasks.")
  transpose = lambda a: None if a is None else a.T
  ds = object.__new__(StoredDataset)
  fields = {
    "features": features,
    "labels": labels.T,
    "task_names": names,
    "spec": spec_from_json(m.get("spec")),
    "masks": transpose(mapped.get("masks.bin")),
    "task_types": tuple(m["task_types"]),
    "extras": extras,
    "metadata": {**_from_jsonable(m.get("metadata") or {}, path), "store": path},
    "weights": transpose(mapped.get("weights.bin")),
    "path": path,
    "rows": None,
  }
  for k, v in fields.items():
    object.__setattr__(ds, k, v)
  ds.__post_init__()
  return ds


def open_store(path: PathLike, *, verify: bool = False) -> Union[StoredDataset, dict[str, StoredDataset]]:
  """Opens a store written by :func:`write_store`, :class:`StoreWriter` or a converter.

  Args:
    path: a split's folder (returns one :class:`StoredDataset`) or a folder of splits (returns
      ``{split: StoredDataset}``, e.g. ``{'train', 'test'}``).
    verify: also check every file's CRC32 checksum (reads every byte once); sizes are always checked.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isdir(path + ".partial"):
    return _open_split(path, verify)
  if not os.path.isdir(path):
    raise StoreError(f"mtjax: store {path!r} does not exist.")
  splits = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, MANIFEST)))
  unfinished = sorted(d[: -len(".partial")] for d in os.listdir(path) if d.endswith(".partial"))
  if unfinished:
    raise StoreError(
      f"mtjax: store {path!r} has unfinished split(s) {unfinished} (an interrupted conversion); run it again."
    )
  if not splits:
    raise StoreError(f"mtjax: {path!r} holds no mtjax store (no {MANIFEST} in it or its sub-folders).")
  return {s: _open_split(os.path.join(path, s), verify) for s in splits}
