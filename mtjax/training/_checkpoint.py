"""Checkpoints with orbax: the whole training state plus the data position, resumed exactly.

A checkpoint folder ``<dir>/step_<N>/`` holds an orbax ``state/`` (every array leaf of the
:class:`TrainState` -- params, optimizer state including the gradient method's state such as
weights, EMA targets, PRNG keys and loss history -- and the model's extra collections and RNG)
and ``meta.json`` (step, data-iterator position, the tree structure and leaf shapes, and the
experiment config). Restoring checks the structure and shapes against a freshly initialised
state, so a checkpoint from another model, method or task count is a clear error, and so is a
corrupt or incomplete folder.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np

META = "meta.json"


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into this experiment."""


def _leaf_specs(tree) -> list:
  return [[list(np.shape(x)), str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)]
          for x in jax.tree.leaves(tree)]


def step_dirs(directory: str) -> list[tuple[int, str]]:
  """``(step, path)`` of the complete checkpoints in ``directory``, oldest first."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if name.startswith("step_") and name[5:].isdigit() and os.path.exists(os.path.join(path, META)):
      out.append((int(name[5:]), path))
  return sorted(out)


def latest(directory: str) -> Optional[str]:
  """Path of the newest complete checkpoint, or None."""
  dirs = step_dirs(directory)
  return dirs[-1][1] if dirs else None


def save(directory: str, state: Any, *, step: int, data_state: dict, config: Optional[dict] = None,
         keep: int = 2) -> str:
  """Writes ``state`` and ``meta.json`` to ``directory/step_<step>`` (meta last, so a folder
  without meta is incomplete and ignored); keeps the newest ``keep`` checkpoints."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.join(directory, f"step_{step}"))
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  leaves = jax.tree.leaves(state)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "state"), {str(i): x for i, x in enumerate(leaves)})
  ckptr.wait_until_finished()
  meta = {"step": int(step), "data_state": data_state, "treedef": str(jax.tree.structure(state)),
          "leaves": _leaf_specs(state), "config": config}
  with open(os.path.join(path, META), "w") as f:
    json.dump(meta, f, indent=1, default=str)
  for _, old in step_dirs(directory)[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return path


def restore(path: str, like: Any) -> tuple[Any, dict]:
  """Restores the state saved at ``path`` into the structure of ``like``; returns ``(state, meta)``.

  Raises:
    CheckpointError: missing/corrupt files, or a structure/shape/dtype mismatch with ``like``.
  """
  import orbax.checkpoint as ocp

  meta_path = os.path.join(path, META)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"mtjax: {path} is not a complete checkpoint (no {META}).") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"mtjax: {meta_path} is corrupt: {e}") from None
  want_def, want_specs = str(jax.tree.structure(like)), _leaf_specs(like)
  if meta.get("treedef") != want_def or len(meta.get("leaves", [])) != len(want_specs):
    raise CheckpointError(
        f"mtjax: checkpoint {path} was written by a different experiment (model, method, optimizer or "
        "number of tasks differ): its state tree does not match this one. Use another output folder or "
        "the matching config.")
  for i, (got, want) in enumerate(zip(meta["leaves"], want_specs)):
    if list(got[0]) != list(want[0]) or got[1] != want[1]:
      raise CheckpointError(f"mtjax: checkpoint {path}: state leaf {i} is {got}, this experiment expects {want}.")
  leaves_like = jax.tree.leaves(like)
  target = {str(i): jax.ShapeDtypeStruct(np.shape(x), x.dtype) for i, x in enumerate(leaves_like)}
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)
  except Exception as e:  # orbax raises many types for truncated / corrupt files
    raise CheckpointError(f"mtjax: checkpoint {path} is corrupt or incomplete: {type(e).__name__}: "
                          f"{str(e)[:300]}") from None
  leaves = [restored[str(i)] for i in range(len(leaves_like))]
  return jax.tree.unflatten(jax.tree.structure(like), leaves), meta
