"""Multi-controller (multi-host) helpers: starting ``jax.distributed``, agreeing across processes,
and work done by process 0 only.

Every function here is a no-op shortcut in a single-process run; in a multi-process run the
functions that agree or gather are collectives: every process must call them in the same order.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Optional, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def initialize_distributed(
  coordinator: Optional[str] = None,
  *,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  cpu_collectives: str = "gloo",
) -> tuple[int, int]:
  """Starts multi-controller JAX (``jax.distributed.initialize``); returns ``(process_index, process_count)``.

  Call it once per process, before anything else uses JAX. Without arguments JAX detects the
  cluster itself (SLURM, Open MPI, Cloud TPU pods, or the ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment variables); otherwise give all three of
  ``coordinator`` (``"host:port"`` of process 0), ``num_processes`` and ``process_id``.
  ``cpu_collectives``: the implementation of the collectives between CPU hosts (``"gloo"``, or
  ``"mpi"``), set before JAX starts; it has no effect on GPU or TPU devices. ``mtjax run
  CONFIG --distributed`` (or ``--coordinator HOST:PORT --num-processes N --process-id I``) calls it.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError(
      "mtjax: initialize_distributed: give all of coordinator ('host:port'), num_processes and process_id, "
      f"or none of them (auto-detection); got coordinator={coordinator!r}, num_processes={num_processes!r}, "
      f"process_id={process_id!r}."
    )
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"mtjax: initialize_distributed: process_id={process_id} is not in [0, {num_processes}).")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  try:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  except RuntimeError as e:
    if "only be called once" in str(e) or "already" in str(e):
      raise RuntimeError(
        "mtjax: initialize_distributed: jax.distributed is already initialized in this process."
      ) from e
    raise
  return jax.process_index(), jax.process_count()


def is_multihost() -> bool:
  """Whether this is a multi-controller run (``jax.process_count() > 1``)."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def host_value(x) -> np.ndarray:
  """``x`` as a numpy array on every process: a replicated or local array directly, a sharded
  global array gathered from every process (a collective)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def host_tree(tree: Any) -> Any:
  """:func:`host_value` of every leaf (numpy arrays, the same on every process)."""
  return jax.tree.map(host_value, tree)


def gather(value) -> np.ndarray:
  """Every process's ``value`` (same shape everywhere), stacked: ``[process_count, ...]``."""
  if not is_multihost():
    return np.asarray(value)[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def all_true(flag: bool) -> bool:
  """Whether ``flag`` is true on every process (also a barrier)."""
  return bool(np.all(gather(np.int32(bool(flag)))))


def same_everywhere(value: Any) -> bool:
  """Whether every process passed the same JSON-like ``value`` (compared by a CRC32 of its ``repr``)."""
  mine = np.uint32(zlib.crc32(repr(value).encode()) & 0xFFFFFFFF)
  return bool(np.all(gather(mine) == mine))


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier ``name``."""
  if is_multihost():
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)


def on_primary(fn: Callable[[], T], failed: Callable[[], BaseException]) -> Optional[T]:
  """Runs ``fn`` on process 0 only, then lets every process know how it went: process 0 re-raises
  its error, the others raise ``failed()``; returns ``fn``'s result on process 0 (``None`` elsewhere).
  A barrier: no process continues before process 0 is done."""
  if not is_multihost():
    return fn()
  error, out = None, None
  if is_primary():
    try:
      out = fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  ok = all_true(error is None)
  if error is not None:
    raise error
  if not ok:
    raise failed()
  return out
