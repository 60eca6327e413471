"""Plots for gradient analysis (matplotlib is imported lazily, only when a plot is drawn)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _plt():
  import matplotlib.pyplot as plt  # no backend switch: headless runs get Agg, notebooks keep inline

  return plt


def plot_similarity_heatmaps(cosines, names: Optional[Sequence[str]] = None,
                             task_names: Optional[Sequence[str]] = None, *, max_cols: int = 4, path=None):
  """One heatmap per group of a ``[K, T, T]`` cosine stack; returns the figure (saved if ``path``)."""
  plt = _plt()
  cos = np.asarray(cosines)
  if cos.ndim == 2:
    cos = cos[None]
  k, t = cos.shape[0], cos.shape[-1]
  cols = min(k, max_cols)
  rows = int(np.ceil(k / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
  labels = list(task_names) if task_names is not None else [f"t{i}" for i in range(t)]
  for n, ax in enumerate(axes.flat):
    if n >= k:
      ax.axis("off")
      continue
    im = ax.imshow(cos[n], vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(t), labels, rotation=45, fontsize=7)
    ax.set_yticks(range(t), labels, fontsize=7)
    ax.set_title((names[n] if names else f"group {n}")[-28:], fontsize=8)
    for i in range(t):
      for j in range(t):
        ax.text(j, i, f"{cos[n, i, j]:.2f}", ha="center", va="center", fontsize=6)
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
  if path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
  return fig


def plot_similarity_over_steps(steps, series, labels: Optional[Sequence[str]] = None, *, title="", path=None):
  """Curves of similarity over training: ``series`` is ``[S]`` or ``[S, C]`` (one curve per column)."""
  plt = _plt()
  y = np.asarray(series)
  if y.ndim == 1:
    y = y[:, None]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for c in range(y.shape[1]):
    ax.plot(steps, y[:, c], label=labels[c] if labels else None)
  ax.axhline(0.0, color="gray", lw=0.8, ls="--")
  ax.set_xlabel("step")
  ax.set_ylabel("cosine similarity")
  ax.set_title(title)
  if labels:
    ax.legend(fontsize=7)
  if path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
  return fig
