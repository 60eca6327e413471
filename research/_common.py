"""Helpers shared by the research scripts: command line, output folders, tables and figures.

Every script in ``research/`` is runnable (``python research/<script>.py [--fast] [--out DIR]``)
and importable (its ``main(argv)`` returns the results; the notebooks call its ``run``). Scripts
put this folder on ``sys.path`` themselves, so ``import _common`` works in both cases.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

RESEARCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(RESEARCH_DIR)


def parser(name: str, description: str) -> argparse.ArgumentParser:
  """The common command line: ``--fast`` (a tiny setting for CI) and ``--out DIR``."""
  p = argparse.ArgumentParser(prog=f"research/{name}.py", description=description)
  p.add_argument(
    "--fast", action="store_true", help="tiny setting for CI and smoke tests (well under a minute on 2 CPU cores)"
  )
  p.add_argument("--out", default=None, help=f"output folder (default: research/outputs/{name}/)")
  return p


def out_dir(out: Optional[str], name: str) -> str:
  """``out`` or ``research/outputs/<name>/``, created."""
  path = out or os.path.join(RESEARCH_DIR, "outputs", name)
  os.makedirs(path, exist_ok=True)
  return path


def use_agg() -> None:
  """Selects the non-interactive Agg backend (scripts only; notebooks keep their inline backend)."""
  import matplotlib

  matplotlib.use("Agg")


def pyplot():
  import matplotlib.pyplot as plt

  return plt


def save(fig, path: str) -> str:
  """Saves and closes a figure; returns the path."""
  fig.savefig(path, dpi=120, bbox_inches="tight")
  pyplot().close(fig)
  return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A padded markdown table from string cells (the public :func:`mtjax.experiment.markdown_table`)."""
  from mtjax import experiment

  return experiment.markdown_table(header, rows)


def mean_std(values, digits: int = 4) -> str:
  """``"mean ± std"`` of a 1-D sample (just the mean for one value)."""
  v = np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f}" if v.size == 1 else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def write_json(path: str, obj) -> None:
  def default(o):
    if isinstance(o, np.ndarray):
      return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
      return o.item()
    return str(o)

  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=default)


def write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text + "\n")


def ema(values, rate: float) -> np.ndarray:
  """Exponential moving average along axis 0 (``rate`` = weight of the new value), for noisy curves."""
  y = np.asarray(values, np.float64)
  out = np.empty_like(y)
  acc = y[0]
  for i in range(len(y)):
    acc = (1.0 - rate) * acc + rate * y[i] if i else y[0]
    out[i] = acc
  return out


def jit_kwargs(fast: bool) -> dict:
  """``jax.jit`` keyword arguments: in fast (CI) settings, XLA's backend optimization level 0.

  Tiny runs are dominated by compilation; level 0 compiles about twice as fast on CPU and runs
  somewhat slower, the right trade for smoke runs. Full settings use the default level.
  """
  return {"compiler_options": {"xla_backend_optimization_level": 0}} if fast else {}


class Timer:
  """``with Timer() as t: ...; t.seconds``."""

  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
