"""Shuffled mini-batches over a :class:`MultiTaskDataset`, with an exactly resumable position."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np

from mtjax.data._dataset import MultiTaskDataset


def _check(dataset: MultiTaskDataset, batch_size: int, seed: int, drop_remainder: bool) -> None:
  if not isinstance(dataset, MultiTaskDataset):
    raise ValueError(f"mtjax: batches() takes a MultiTaskDataset, got {type(dataset).__name__}.")
  if int(batch_size) < 1:
    raise ValueError(f"mtjax: batch_size must be >= 1, got {batch_size}.")
  if int(seed) < 0:
    raise ValueError(f"mtjax: seed must be a non-negative int, got {seed}.")
  if len(dataset) == 0 or (drop_remainder and batch_size > len(dataset)):
    raise ValueError(
      f"mtjax: a dataset of {len(dataset)} samples gives no batch of {batch_size}; "
      "use a smaller batch_size or drop_remainder=False."
    )


def _num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The sample order of one epoch: ``np.random.default_rng((seed, epoch)).permutation(N)``.

  Each epoch's order depends only on ``(seed, epoch)``, so any epoch can be regenerated
  without replaying the earlier ones. ``shuffle=False`` gives ``arange(N)``.
  """
  if not shuffle:
    return np.arange(num_samples)
  return np.random.default_rng((int(seed), int(epoch))).permutation(num_samples)


def batches(
  dataset: MultiTaskDataset,
  batch_size: int,
  *,
  seed: int = 0,
  epoch: int = 0,
  shuffle: bool = True,
  drop_remainder: bool = True,
  include_extras: bool = False,
) -> Iterator[dict[str, Any]]:
  """Iterates over the mini-batches of one epoch.

  The epoch's order is :func:`epoch_order` (a permutation seeded by ``(seed, epoch)``); each
  batch fancy-indexes only its own ``batch_size`` rows, so the dataset is never copied as a whole.

  Examples:
    >>> from mtjax import data
    >>> ds = data.mmoe_synthetic(100, 0.5, dim=4, seed=0)
    >>> [b['x'].shape for b in data.batches(ds, 40, seed=0, epoch=3)]
    [(40, 4), (40, 4)]
    >>> [b['labels'].shape[1] for b in data.batches(ds, 40, drop_remainder=False)]
    [40, 40, 20]

  Args:
    dataset: a :class:`MultiTaskDataset`.
    batch_size: samples per batch.
    seed: non-negative int seed of the shuffling.
    epoch: epoch number (a different permutation per epoch).
    shuffle: False keeps the stored order (batches are then views, not copies).
    drop_remainder: drop the last, smaller batch (default) or yield it.
    include_extras: also put ``dataset.extras`` rows under ``batch['extras']``.

  Returns:
    An iterator of batch dicts ``{'x', 'labels', ['mask'], ['extras']}`` (see
    :meth:`MultiTaskDataset.batch`).
  """
  _check(dataset, batch_size, seed, drop_remainder)
  n = len(dataset)
  order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
  for b in range(_num_batches(n, batch_size, drop_remainder)):
    lo, hi = b * batch_size, min((b + 1) * batch_size, n)
    idx = slice(lo, hi) if not shuffle else order[lo:hi]
    yield dataset.batch(idx, include_extras=include_extras)


class BatchIterator:
  """An endless (or ``num_epochs``-long) batch iterator whose position can be saved and restored.

  The position is ``(epoch, position)``: the epoch number and the number of batches already
  taken from it. Because an epoch's order depends only on ``(seed, epoch)``
  (:func:`epoch_order`), restoring a saved :meth:`state` and iterating yields exactly the
  batches an uninterrupted run would have yielded.

  Examples:
    >>> from mtjax import data
    >>> ds = data.mmoe_synthetic(100, 0.5, dim=4, seed=0)
    >>> it = data.BatchIterator(ds, 32, seed=1)
    >>> _ = next(it); _ = next(it)
    >>> state = it.state()
    >>> state['epoch'], state['position']
    (0, 2)
    >>> resumed = data.BatchIterator(ds, 32, seed=1).restore(state)
    >>> import numpy as np
    >>> bool(np.array_equal(next(it)['x'], next(resumed)['x']))
    True

  Args:
    dataset: a :class:`MultiTaskDataset`.
    batch_size: samples per batch.
    seed: non-negative int seed of the shuffling.
    shuffle, drop_remainder, include_extras: as in :func:`batches`.
    num_epochs: stop after this many epochs (None: never stop).
    epoch, position: where to start.
    process_index, process_count: multi-process (multi-host) reading: ``batch_size`` is the GLOBAL
      batch and this process takes only its contiguous part of it, rows
      ``[p * batch_size / P, (p + 1) * batch_size / P)`` of each global batch (``P = process_count``
      must divide ``batch_size``). The order, the position and :meth:`state` are those of the
      global batches, so every process walks the same sequence and a checkpoint's position is valid
      for any process. Defaults: one process reading whole batches.
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
  ):
    _check(dataset, batch_size, seed, drop_remainder)
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
        f"mtjax: BatchIterator: process_index={process_index} is not in [0, process_count={process_count})."
      )
    if int(batch_size) % process_count or (process_count > 1 and not drop_remainder):
      raise ValueError(
        f"mtjax: BatchIterator: the global batch_size={batch_size} must be a multiple of process_count="
        f"{process_count} (each process reads an equal part), with drop_remainder=True."
      )
    self.process_index, self.process_count = process_index, process_count
    self.dataset = dataset
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.include_extras = bool(include_extras)
    self.num_epochs = num_epochs
    self.steps_per_epoch = _num_batches(len(dataset), self.batch_size, self.drop_remainder)
    self._order_epoch = None
    self._order = None
    self._set_position(epoch, position)

  def _set_position(self, epoch: int, position: int) -> None:
    epoch, position = int(epoch), int(position)
    if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
      raise ValueError(
        f"mtjax: BatchIterator position ({epoch}, {position}) is out of range; "
        f"an epoch has {self.steps_per_epoch} batches."
      )
    if position == self.steps_per_epoch:  # normalize "end of epoch e" to "start of epoch e + 1"
      epoch, position = epoch + 1, 0
    self.epoch, self.position = epoch, position

  @property
  def step(self) -> int:
    """Batches taken since epoch 0, position 0."""
    return self.epoch * self.steps_per_epoch + self.position

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    if self._order_epoch != self.epoch:
      self._order = epoch_order(len(self.dataset), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
      self._order_epoch = self.epoch
    batch = self.dataset.batch(self._indices(self.position, self._order), include_extras=self.include_extras)
    self._set_position(self.epoch, self.position + 1)
    return batch

  def _indices(self, position: int, order: Optional[np.ndarray]):
    """The samples of batch ``position`` of an epoch whose order is ``order`` (this process's part)."""
    lo = position * self.batch_size
    hi = min(lo + self.batch_size, len(self.dataset))
    if self.process_count > 1:  # this process's contiguous part of the global batch
      part = self.batch_size // self.process_count
      lo, hi = lo + self.process_index * part, lo + (self.process_index + 1) * part
    return slice(lo, hi) if not self.shuffle else order[lo:hi]  # pyright: ignore[reportOptionalSubscript]

  def state(self) -> dict[str, int]:
    """The position as a dict of plain ints (JSON / checkpoint friendly).

    ``epoch`` and ``position`` locate the next batch; ``seed``, ``batch_size``, ``num_samples``,
    ``shuffle`` and ``drop_remainder`` are stored so that :meth:`restore` can refuse a
    position from a different configuration.
    """
    return {
      "epoch": self.epoch,
      "position": self.position,
      "seed": self.seed,
      "batch_size": self.batch_size,
      "num_samples": len(self.dataset),
      "shuffle": int(self.shuffle),
      "drop_remainder": int(self.drop_remainder),
    }

  def restore(self, state: Mapping[str, Any]) -> BatchIterator:
    """Moves to a position saved by :meth:`state` (values may be ints or 0-d arrays); returns self."""
    mine = self.state()
    for key in ("seed", "batch_size", "num_samples", "shuffle", "drop_remainder"):
      if key in state and int(state[key]) != mine[key]:
        raise ValueError(
          f"mtjax: cannot restore a BatchIterator saved with {key}={int(state[key])} into one with "
          f"{key}={mine[key]}; build the iterator with the saved configuration."
        )
    self._set_position(int(state["epoch"]), int(state["position"]))
    return self
