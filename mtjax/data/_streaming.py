"""Batches of a stored (on-disk) dataset, read ahead in background threads or processes by grain."""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional

import numpy as np

from mtjax.data._batching import BatchIterator
from mtjax.data._batching import epoch_order
from mtjax.data._dataset import MultiTaskDataset


class _ReadBatch:
  """grain's map function: global step -> this process's batch (picklable for worker processes)."""

  def __init__(self, plan: BatchIterator):
    self.plan = plan
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"plan": self.plan}

  def __setstate__(self, state):
    self.__init__(state["plan"])

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:  # reader threads share one permutation per epoch (N int64s), the last two are kept
      order = self._orders.get(epoch)
      if order is None:
        p = self.plan
        order = epoch_order(len(p.dataset), seed=p.seed, epoch=epoch, shuffle=p.shuffle)
        self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
        self._orders[epoch] = order
      return order

  def __call__(self, step) -> dict[str, Any]:
    p = self.plan
    epoch, position = divmod(int(step), p.steps_per_epoch)
    idx = p._indices(position, self._order(epoch) if p.shuffle else None)  # pylint: disable=protected-access
    return p.dataset.batch(idx, include_extras=p.include_extras)


class PrefetchIterator:
  """:class:`BatchIterator`'s batches, read ahead by `grain <https://github.com/google/grain>`_.

  The batches, their order (:func:`epoch_order` of ``(seed, epoch)``), the per-process parts
  (``process_index`` / ``process_count``) and :meth:`state` / :meth:`restore` are exactly those
  of :class:`BatchIterator` with the same arguments, so the same seed gives the same batches
  whether a dataset is in memory or on disk (:class:`StoredDataset`), and a checkpointed position
  resumes bit-identically. What grain adds: ``num_threads`` threads gather the next
  ``prefetch`` batches while the training step runs (a batch of a stored dataset is a gather of
  random records from the store's file), or ``workers`` worker processes do
  (``grain.MultiprocessingOptions``; each re-opens the store's files). The pipeline is a
  ``grain.MapDataset`` over global step numbers (from the current one) mapped to batches, so the
  position alone restores it. ``fit`` uses this iterator for a :class:`StoredDataset`.

  Examples:
    >>> import numpy as np
    >>> from mtjax import data
    >>> ds = data.mmoe_synthetic(100, 0.5, dim=4, seed=0)
    >>> fast = data.PrefetchIterator(ds, 32, seed=1)
    >>> plain = data.BatchIterator(ds, 32, seed=1)
    >>> bool(np.array_equal(next(fast)['x'], next(plain)['x']))
    True
    >>> fast.state()['position']
    1

  Args:
    dataset: a :class:`MultiTaskDataset` (typically a :class:`StoredDataset`).
    batch_size: samples per (global) batch.
    seed, shuffle, drop_remainder, include_extras, num_epochs: as in :class:`BatchIterator`.
    epoch, position, process_index, process_count: as in :class:`BatchIterator`.
    num_threads: reader threads (``grain.ReadOptions.num_threads``); 0 reads in the caller's thread.
    prefetch: batches read ahead (``grain.ReadOptions.prefetch_buffer_size``).
    workers: worker processes (``grain.MultiprocessingOptions.num_workers``); 0 = none.
  """

  def __init__(
    self,
    dataset: MultiTaskDataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    include_extras: bool = False,
    num_epochs: Optional[int] = None,
    epoch: int = 0,
    position: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
    prefetch: int = 4,
    workers: int = 0,
  ):
    self._plan = BatchIterator(
      dataset,
      batch_size,
      seed=seed,
      shuffle=shuffle,
      drop_remainder=drop_remainder,
      include_extras=include_extras,
      num_epochs=num_epochs,
      epoch=epoch,
      position=position,
      process_index=process_index,
      process_count=process_count,
    )
    if int(num_threads) < 0 or int(prefetch) < 0 or int(workers) < 0:
      raise ValueError(
        "mtjax: PrefetchIterator: num_threads, prefetch and workers must be >= 0, "
        f"got {num_threads}, {prefetch}, {workers}."
      )
    self.num_threads, self.prefetch, self.workers = int(num_threads), int(prefetch), int(workers)
    self.dataset = dataset
    self.batch_size = self._plan.batch_size
    self.steps_per_epoch = self._plan.steps_per_epoch
    self._iter = None

  @property
  def epoch(self) -> int:
    return self._plan.epoch

  @property
  def position(self) -> int:
    return self._plan.position

  @property
  def step(self) -> int:
    """Batches taken since epoch 0, position 0."""
    return self._plan.step

  def _build(self):
    try:
      import grain  # pylint: disable=import-outside-toplevel  # only a streaming run needs it
    except ImportError as e:
      raise ImportError(
        "mtjax: reading a stored dataset ahead needs grain: pip install 'mtjax[stream]' (or grain)"
      ) from e

    p = self._plan
    stop = p.num_epochs * p.steps_per_epoch if p.num_epochs is not None else 1 << 62
    ds = grain.MapDataset.range(p.step, stop).map(_ReadBatch(p))  # restarts at the position
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
    if self.workers:
      from absl import flags  # pylint: disable=import-outside-toplevel  # grain's worker options are absl flags

      if not flags.FLAGS.is_parsed():  # a library caller has no absl main: take the flags' defaults
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    it = iter(it_ds)
    return it

  def __iter__(self) -> PrefetchIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    p = self._plan
    if p.num_epochs is not None and p.epoch >= p.num_epochs:
      raise StopIteration
    if self._iter is None:
      self._iter = self._build()
    batch = next(self._iter)
    p._set_position(p.epoch, p.position + 1)  # pylint: disable=protected-access
    return batch

  def state(self) -> dict[str, int]:
    """The position, as :meth:`BatchIterator.state` (the same dict: either iterator restores it)."""
    return self._plan.state()

  def restore(self, state: Mapping[str, Any]) -> PrefetchIterator:
    """Moves to a saved position (the grain pipeline restarts there); returns self."""
    self._plan.restore(state)
    self.close()
    return self

  def close(self) -> None:
    """Stops the reader threads / processes (a later ``next`` restarts them at the position)."""
    it, self._iter = self._iter, None
    closer = getattr(it, "close", None)
    if callable(closer):
      closer()


def batch_iterator(dataset: MultiTaskDataset, batch_size: int, **kwargs) -> Any:
  """The iterator ``fit`` uses: :class:`PrefetchIterator` for a stored dataset, :class:`BatchIterator` otherwise.

  Both give the same batches for the same arguments; ``num_threads`` / ``prefetch`` / ``workers``
  apply to a stored dataset only.
  """
  from mtjax.data._store import StoredDataset  # pylint: disable=import-outside-toplevel

  stream = {k: kwargs.pop(k) for k in ("num_threads", "prefetch", "workers") if k in kwargs}
  if isinstance(dataset, StoredDataset):
    return PrefetchIterator(dataset, batch_size, **kwargs, **stream)
  return BatchIterator(dataset, batch_size, **kwargs)
