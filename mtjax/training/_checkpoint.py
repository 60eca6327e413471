"""Checkpoints with orbax: the whole training state plus the data position, resumed exactly.

A checkpoint folder ``<dir>/step_<N>/`` holds an orbax ``state/`` (every array leaf of the
:class:`TrainState` -- params, optimizer state including the gradient method's state such as
weights, EMA targets, PRNG keys and loss history -- and the model's extra collections and RNG)
and ``meta.json`` (step, data-iterator position, the tree structure and leaf shapes, a CRC32
checksum of every leaf's bytes, and the experiment config). Restoring checks the structure and
shapes against a freshly initialised state, so a checkpoint from another model, method or task
count is a clear error, and verifies every restored leaf against its checksum, so a flipped bit
in the array files is caught instead of silently changing the state (:func:`restore_latest`
then falls back to the previous valid checkpoint, with a warning).

Saving is all-or-nothing: a checkpoint is written into ``step_<N>.partial/``, ``meta.json``
last and fsynced, checked, and only then renamed to ``step_<N>/``; older checkpoints are pruned
(to the newest ``keep``) only after that. A failed write (disk full, read-only or unwritable
folder) removes the partial folder, keeps every complete checkpoint and raises
:class:`CheckpointSaveError` with one ``mtjax:`` line. Paths are made absolute (orbax needs it),
so relative output folders resume like absolute ones.

In a multi-controller run (``jax.distributed``, :func:`mtjax.training.fit` on a global mesh) every
process takes part in orbax's writing and reading of ``state/``; process 0 alone writes
``meta.json``, renames the partial folder, prunes and deletes, while the others wait at barriers,
and every process restores the same step (all of them must see the folder: a shared file system).
A failure on one process raises on all of them.
"""

from __future__ import annotations

import errno as errno_lib
import json
import os
import re
import shutil
import warnings
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.training import _distributed

META = "meta.json"
CHECKSUM = "crc32"  # over each leaf's C-order bytes; catches every single-bit and burst (<= 32 bits) error
_STEP = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+\.(partial|old)$")


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into this experiment (or written); messages start with ``mtjax:``."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint whose files are missing, unreadable, or fail their checksums."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint or output file that could not be written (``errno`` holds the OS error number, if any)."""

  def __init__(self, message: str, errno: Optional[int] = None):
    super().__init__(message)
    self.errno = errno


def _leaf_specs(tree) -> list:
  return [
    [list(np.shape(x)), str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)] for x in jax.tree.leaves(tree)
  ]


def _with_data(leaves) -> dict:
  """The leaves orbax writes, by index: every one except empty arrays (orbax refuses to save those)."""
  return {str(i): x for i, x in enumerate(leaves) if np.size(x)}


def _checksum(x) -> int:
  return zlib.crc32(np.ascontiguousarray(np.asarray(x)).tobytes()) & 0xFFFFFFFF


def _os_error(e: BaseException) -> Optional[OSError]:
  """The first ``OSError`` in ``e``'s cause/context chain (orbax and tensorstore wrap them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def write_error(what: str, e: BaseException, hint: str = "") -> CheckpointSaveError:
  """A one-line :class:`CheckpointSaveError` for a failed write of ``what`` (the OS reason if there is one)."""
  os_err = _os_error(e)
  if os_err is not None and os_err.errno is not None:
    name = errno_lib.errorcode.get(os_err.errno, str(os_err.errno))
    reason = f"{os_err.strerror or os.strerror(os_err.errno)} ({name})"
    if os_err.filename:
      reason += f": {os_err.filename}"
  else:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    reason = f"{type(e).__name__}: {first}"
  return CheckpointSaveError(
    f"mtjax: could not write {what}: {reason}.{' ' + hint if hint else ''}",
    errno=os_err.errno if os_err is not None else None,
  )


def step_dirs(directory: str) -> list[tuple[int, str]]:
  """``(step, path)`` of the complete checkpoints in ``directory``, oldest first (absolute paths)."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    m = _STEP.match(name)
    path = os.path.join(directory, name)
    if m and os.path.exists(os.path.join(path, META)):
      out.append((int(m.group(1)), path))
  return sorted(out)


def latest(directory: str) -> Optional[str]:
  """Path of the newest complete checkpoint, or None."""
  dirs = step_dirs(directory)
  return dirs[-1][1] if dirs else None


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=str)
    f.flush()
    os.fsync(f.fileno())


def save(
  directory: str, state: Any, *, step: int, data_state: dict, config: Optional[dict] = None, keep: int = 2
) -> str:
  """Writes ``state`` and ``meta.json`` to ``directory/step_<step>``; keeps the newest ``keep`` checkpoints.

  The checkpoint is written whole into ``step_<step>.partial`` (arrays, then ``meta.json`` with
  the leaves' checksums, fsynced), checked, renamed into place, and only then are older
  checkpoints pruned. Returns the checkpoint's absolute path.

  Raises:
    CheckpointSaveError: the folder is not writable or the disk is full (``errno`` is set); the
      partial folder is removed and every complete checkpoint is kept.
  """
  import orbax.checkpoint as ocp

  if keep < 1:
    raise ValueError(f"mtjax: checkpoints: keep={keep} must be >= 1.")
  if _distributed.is_multihost():
    return _save_multihost(directory, state, step=step, data_state=data_state, config=config, keep=keep)
  directory = os.path.abspath(directory)
  path = os.path.join(directory, f"step_{step}")
  tmp, old = path + ".partial", path + ".old"
  moved = False
  try:
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    os.makedirs(tmp)
    leaves = jax.tree.leaves(state)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "state"), _with_data(leaves))
      ckptr.wait_until_finished()
    sums = {"algorithm": CHECKSUM, "leaves": [_checksum(x) for x in leaves]}
    meta = {
      "step": int(step),
      "data_state": data_state,
      "treedef": str(jax.tree.structure(state)),
      "leaves": _leaf_specs(state),
      "checksums": sums,
      "config": config,
    }
    _write_json(os.path.join(tmp, META), meta)
    with open(os.path.join(tmp, META)) as f:  # verify before anything older is touched
      back = json.load(f)
    if back.get("checksums") != meta["checksums"] or not os.listdir(os.path.join(tmp, "state")):
      raise OSError(errno_lib.EIO, "the checkpoint read back differs from what was written", tmp)
    _fsync_dir(tmp)
    if os.path.exists(path):  # the same step again (e.g. after a fallback): swap, then drop the old one
      if os.path.exists(old):
        shutil.rmtree(old)
      os.rename(path, old)
      moved = True
    os.rename(tmp, path)
    _fsync_dir(directory)
  except Exception as e:  # OSError (ENOSPC, EACCES, EROFS) or orbax / tensorstore wrapping one
    shutil.rmtree(tmp, ignore_errors=True)
    if moved and not os.path.exists(path):
      try:
        os.rename(old, path)
      except OSError:
        pass
    raise write_error(
      f"the checkpoint of step {step} to {directory}",
      e,
      "The older checkpoints are kept; free disk space or make the folder writable, then run again to resume.",
    ) from e
  shutil.rmtree(old, ignore_errors=True)
  for _, stale in step_dirs(directory)[:-keep]:
    shutil.rmtree(stale, ignore_errors=True)
  for name in os.listdir(directory):  # partial folders of saves killed midway
    if _LEFTOVER.match(name):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return path


def _save_multihost(
  directory: str, state: Any, *, step: int, data_state: dict, config: Optional[dict], keep: int
) -> str:
  """:func:`save` in a multi-controller run: every process writes its part of the orbax ``state/``
  (orbax coordinates them); process 0 alone prepares the partial folder, writes ``meta.json``,
  renames it into place and prunes, with every process waiting for each of these steps and
  raising if one failed. Needs a folder every process sees (a shared file system)."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  path = os.path.join(directory, f"step_{step}")
  tmp, old = path + ".partial", path + ".old"
  where = f"the checkpoint of step {step} to {directory}"
  hint = "The older checkpoints are kept; free disk space or make the folder writable, then run again to resume."
  elsewhere = lambda: CheckpointSaveError(f"mtjax: could not write {where}: process 0 failed (see its error). {hint}")
  leaves = jax.tree.leaves(state)
  sums = {"algorithm": CHECKSUM, "leaves": [_checksum(_distributed.host_value(x)) for x in leaves]}  # every process

  def prepare() -> None:
    try:
      os.makedirs(directory, exist_ok=True)
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
      os.makedirs(tmp)
    except Exception as e:
      raise write_error(where, e, hint) from e

  _distributed.on_primary(prepare, elsewhere)
  error = None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "state"), _with_data(leaves))
      ckptr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if not _distributed.all_true(error is None):
    if _distributed.is_primary():
      shutil.rmtree(tmp, ignore_errors=True)
    _distributed.barrier(f"mtjax_checkpoint_failed_{step}")
    if error is not None:
      raise write_error(where, error, hint) from error
    raise CheckpointSaveError(f"mtjax: could not write {where}: another process failed (see its error). {hint}")

  def commit() -> None:
    meta = {
      "step": int(step),
      "data_state": data_state,
      "treedef": str(jax.tree.structure(state)),
      "leaves": _leaf_specs(state),
      "checksums": sums,
      "config": config,
    }
    moved = False
    try:
      _write_json(os.path.join(tmp, META), meta)
      with open(os.path.join(tmp, META)) as f:
        back = json.load(f)
      if back.get("checksums") != meta["checksums"] or not os.listdir(os.path.join(tmp, "state")):
        raise OSError(errno_lib.EIO, "the checkpoint read back differs from what was written", tmp)
      _fsync_dir(tmp)
      if os.path.exists(path):
        if os.path.exists(old):
          shutil.rmtree(old)
        os.rename(path, old)
        moved = True
      os.rename(tmp, path)
      _fsync_dir(directory)
    except Exception as e:
      shutil.rmtree(tmp, ignore_errors=True)
      if moved and not os.path.exists(path):
        try:
          os.rename(old, path)
        except OSError:
          pass
      raise write_error(where, e, hint) from e
    shutil.rmtree(old, ignore_errors=True)
    for _, stale in step_dirs(directory)[:-keep]:
      shutil.rmtree(stale, ignore_errors=True)
    for name in os.listdir(directory):
      if _LEFTOVER.match(name):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

  _distributed.on_primary(commit, elsewhere)
  return path


def restore(path: str, like: Any, *, sharding: Optional[jax.sharding.Sharding] = None) -> tuple[Any, dict]:
  """Restores the state saved at ``path`` into the structure of ``like``; returns ``(state, meta)``.

  Every leaf is checked against the checksum in ``meta.json`` (checkpoints written before
  checksums existed are restored unchecked). ``sharding``: where the restored leaves are placed
  (a multi-controller run restores onto its global mesh, every process taking part); default:
  orbax's choice, as saved.

  Raises:
    CheckpointCorruptError: missing, unreadable or corrupt files, or a leaf that fails its checksum.
    CheckpointError: a structure/shape/dtype mismatch with ``like``.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  meta_path = os.path.join(path, META)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise CheckpointCorruptError(f"mtjax: {path} is not a complete checkpoint (no {META}).") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointCorruptError(f"mtjax: {meta_path} is corrupt: {e}") from None
  if not isinstance(meta, dict):
    raise CheckpointCorruptError(f"mtjax: {meta_path} is corrupt: not a JSON object.")
  want_def, want_specs = str(jax.tree.structure(like)), _leaf_specs(like)
  if meta.get("treedef") != want_def or len(meta.get("leaves", [])) != len(want_specs):
    raise CheckpointError(
      f"mtjax: checkpoint {path} was written by a different experiment (model, method, optimizer or "
      "number of tasks differ): its state tree does not match this one. Use another output folder or "
      "the matching config."
    )
  for i, (got, want) in enumerate(zip(meta["leaves"], want_specs)):
    if list(got[0]) != list(want[0]) or got[1] != want[1]:
      raise CheckpointError(f"mtjax: checkpoint {path}: state leaf {i} is {got}, this experiment expects {want}.")
  leaves_like = jax.tree.leaves(like)
  if sharding is None:
    target = {str(i): jax.ShapeDtypeStruct(np.shape(x), x.dtype) for i, x in _with_data(leaves_like).items()}
  else:
    target = {
      str(i): jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding) for i, x in _with_data(leaves_like).items()
    }
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(os.path.join(path, "state"), target)
  except Exception as e:  # orbax raises many types for truncated / corrupt files
    raise CheckpointCorruptError(
      f"mtjax: checkpoint {path} is corrupt or incomplete: {type(e).__name__}: "
      f"{(str(e).strip().splitlines() or [''])[0][:300]}"
    ) from None
  # an empty leaf (e.g. a method's weights before it knows the task count) holds no data: rebuilt from its shape
  leaves = [restored.get(str(i), jnp.zeros(np.shape(x), x.dtype)) for i, x in enumerate(leaves_like)]
  sums = meta.get("checksums")
  if sums is not None:
    if not isinstance(sums, dict) or sums.get("algorithm") != CHECKSUM or len(sums.get("leaves", [])) != len(leaves):
      raise CheckpointCorruptError(f"mtjax: checkpoint {path} is corrupt: unreadable checksums in {META}.")
    bad = [i for i, (x, s) in enumerate(zip(leaves, sums["leaves"])) if _checksum(_distributed.host_value(x)) != s]
    if bad:
      raise CheckpointCorruptError(
        f"mtjax: checkpoint {path} is corrupt: state leaves {bad[:8]} fail their "
        f"{CHECKSUM} checksums (changed bits in the array files)."
      )
  return jax.tree.unflatten(jax.tree.structure(like), leaves), meta


def _shared_steps(directory: str) -> list[tuple[int, str]]:
  """:func:`step_dirs`, checked to be the same on every process of a multi-controller run."""
  _distributed.barrier("mtjax_checkpoint_list")  # nothing is being written or renamed while the processes look
  dirs = step_dirs(directory)
  if not _distributed.same_everywhere([s for s, _ in dirs]):
    raise CheckpointError(
      f"mtjax: the processes of this multi-host run see different checkpoints in {os.path.abspath(directory)}: "
      "the output folder must be on a file system that every process shares."
    )
  return dirs


def _set_aside(failures: list, path: str, *, stacklevel: int) -> None:
  """Warns that ``path`` is resumed instead of the newer corrupt checkpoints ``failures`` ``[(path, reason)]``
  and renames those to ``corrupt_<name>`` (kept for inspection, no longer resumed from)."""
  names = ", ".join(p for p, _ in failures)
  reason = failures[0][1].removeprefix("mtjax: ")
  warnings.warn(
    f"mtjax: resuming from the previous valid checkpoint {path}, because the newer {names} is "
    f"corrupt ({reason}); it is renamed to corrupt_<name>.",
    stacklevel=stacklevel,
  )
  for bad, _ in failures:
    try:
      target = os.path.join(os.path.dirname(bad), "corrupt_" + os.path.basename(bad))
      if os.path.exists(target):
        shutil.rmtree(target)
      os.rename(bad, target)
    except OSError:  # a read-only folder: it stays, and is skipped again next time
      pass


def _restore_latest_multihost(directory: str, like: Any, sharding) -> Optional[tuple[Any, dict, str]]:
  """:func:`restore_latest` in a multi-controller run: every process restores the same checkpoint
  (one that restores and passes its checksums on every process); process 0 renames corrupt ones."""
  dirs = _shared_steps(directory)
  if not dirs:
    return None
  failures = []
  for _, path in reversed(dirs):
    found, error = None, None
    try:
      found = restore(path, like, sharding=sharding)
    except CheckpointCorruptError as e:
      error = e
    if not _distributed.all_true(error is None):
      failures.append(
        (path, str(error) if error is not None else f"mtjax: checkpoint {path} failed on another process.")
      )
      continue
    assert found is not None
    if failures and _distributed.is_primary():
      _set_aside(failures, path, stacklevel=5)
    _distributed.barrier("mtjax_checkpoint_restored")
    return found[0], found[1], path
  raise CheckpointCorruptError(
    f"mtjax: no valid checkpoint in {os.path.abspath(directory)}: "
    + " | ".join(msg for _, msg in failures)
    + " Delete the folder (or run with --fresh) to start over."
  )


def restore_latest(
  directory: str, like: Any, *, sharding: Optional[jax.sharding.Sharding] = None
) -> Optional[tuple[Any, dict, str]]:
  """Restores the newest valid checkpoint in ``directory``: ``(state, meta, path)``, or None if there is none.

  A corrupt newest checkpoint (see :func:`restore`) is skipped with a ``warnings.warn`` naming it
  and the older checkpoint used instead, and renamed to ``corrupt_step_<N>`` (kept for
  inspection, no longer resumed from or counted among the kept checkpoints).

  Raises:
    CheckpointError: every checkpoint is corrupt (the message lists why), or the newest valid
      one belongs to a different experiment.

  In a multi-controller run every process calls it (with ``sharding``, see :func:`restore`) and
  they all restore the same step.
  """
  if _distributed.is_multihost():
    return _restore_latest_multihost(directory, like, sharding)
  dirs = step_dirs(directory)
  if not dirs:
    return None
  failures = []
  for _, path in reversed(dirs):
    try:
      state, meta = restore(path, like, sharding=sharding)
    except CheckpointCorruptError as e:
      failures.append((path, str(e)))
      continue
    if failures:
      _set_aside(failures, path, stacklevel=4)
    return state, meta, path
  raise CheckpointCorruptError(
    f"mtjax: no valid checkpoint in {os.path.abspath(directory)}: "
    + " | ".join(msg for _, msg in failures)
    + " Delete the folder (or run with --fresh) to start over."
  )


def restore_step(
  directory: str, step: int, like: Any, *, sharding: Optional[jax.sharding.Sharding] = None
) -> tuple[Any, dict, str]:
  """Restores the checkpoint of ``step`` in ``directory``: ``(state, meta, path)``.

  Raises:
    CheckpointError: there is no checkpoint of that step (the message lists the available ones),
      or it is corrupt or from a different experiment.
  """
  dirs = dict(_shared_steps(directory) if _distributed.is_multihost() else step_dirs(directory))
  if step not in dirs:
    avail = ", ".join(map(str, sorted(dirs))) or "none"
    raise CheckpointError(
      f"mtjax: no checkpoint of step {step} in {os.path.abspath(directory)}; available steps: {avail}."
    )
  state, meta = restore(dirs[step], like, sharding=sharding)
  return state, meta, dirs[step]


def discard_after(directory: str, step: int) -> None:
  """Deletes the checkpoints of steps after ``step`` (restarting from an earlier one); in a
  multi-controller run process 0 deletes them while the others wait."""

  def discard() -> None:
    for s, path in step_dirs(directory):
      if s > step:
        try:
          shutil.rmtree(path)
        except OSError as e:
          raise write_error(f"(delete) the later checkpoint {path}", e) from e

  _distributed.on_primary(
    discard, lambda: CheckpointSaveError(f"mtjax: process 0 could not delete the checkpoints after step {step}.")
  )


def trim_log(log_path: str, last_step: int) -> list:
  """Keeps only the records of ``log_path`` with ``step <= last_step`` (a resume replays the rest);
  drops a torn (partly written) line. Rewrites the file atomically only when something is dropped.
  Returns the kept records."""
  if not os.path.exists(log_path):
    return []
  with open(log_path, "rb") as f:
    lines = f.read().split(b"\n")
  kept, raw, changed = [], [], False
  for line in lines:
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      step = int(rec["step"])
    except (ValueError, KeyError, TypeError):  # a torn last line from a kill mid-write
      changed = True
      continue
    if step <= last_step:
      kept.append(rec)
      raw.append(line)
    else:
      changed = True
  if changed or (lines and lines[-1].strip()):  # also when the last line lacks its newline
    tmp = log_path + ".tmp"
    try:
      with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in raw))
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, log_path)
    except OSError as e:
      raise write_error(log_path, e, "Make the output folder writable.") from e
  return kept
