"""Plots for gradient analysis (matplotlib is imported lazily, only when a plot is drawn)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _plt():
  import matplotlib.pyplot as plt  # no backend switch: headless runs get Agg, notebooks keep inline

  return plt


def plot_similarity_heatmaps(
  cosines,
  names: Optional[Sequence[str]] = None,
  task_names: Optional[Sequence[str]] = None,
  *,
  max_cols: int = 4,
  path=None,
):
  """One heatmap per group of a ``[K, T, T]`` cosine stack; returns the figure (saved if ``path``).

  Colours span the full cosine range [-1, 1] (one colour bar for all panels); cells carry their
  values when there are at most 10 tasks; long task and group names are shortened from the front.
  """
  from mtjax._src import plotting

  plt = _plt()
  cos = np.asarray(cosines)
  if cos.ndim == 2:
    cos = cos[None]
  k, t = cos.shape[0], cos.shape[-1]
  cols = min(k, max_cols)
  rows = int(np.ceil(k / cols))
  side = max(2.4, 0.42 * t + 1.3)  # inches per panel: room for rotated labels and written values
  fig, axes = plt.subplots(
    rows, cols, figsize=(side * cols + 0.9, (side + 0.35) * rows), squeeze=False, layout="constrained"
  )
  labels = (
    [plotting.short_label(n, 12, keep="start") for n in task_names]
    if task_names is not None
    else [f"t{i}" for i in range(t)]
  )
  fontsize = 8 if t <= 6 else 6.5
  im = None
  for n, ax in enumerate(axes.flat):
    if n >= k:
      ax.axis("off")
      continue
    im = ax.imshow(cos[n], vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(t), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(range(t), labels if n % cols == 0 else [], fontsize=fontsize)
    ax.set_title(plotting.short_label(names[n], 30) if names else f"group {n}", fontsize=8.5)
    if t <= 10:
      for i in range(t):
        for j in range(t):
          v = cos[n, i, j]
          ax.text(
            j,
            i,
            "n/a" if not np.isfinite(v) else f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=fontsize - 0.5,
            color="white" if abs(v) > 0.6 else "black",
          )
  if im is not None:
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, aspect=25)
    cb.set_label("cosine similarity", fontsize=8)
    cb.ax.tick_params(labelsize=7)
  if path:
    fig.savefig(path, dpi=130, bbox_inches="tight")
  return fig


def plot_similarity_over_steps(steps, series, labels: Optional[Sequence[str]] = None, *, title="", path=None):
  """Curves of similarity over training: ``series`` is ``[S]`` or ``[S, C]`` (one curve per column).

  Up to 10 curves get distinct colours; more (e.g. one per layer) a sequential colour map in column
  order. The legend sits outside the axes.
  """
  from mtjax._src import plotting

  plt = _plt()
  y = np.asarray(series)
  if y.ndim == 1:
    y = y[:, None]
  c = y.shape[1]
  fig, ax = plt.subplots(figsize=(6.4, 3.5))
  cmap = plt.get_cmap("viridis")
  colours = plotting.task_colors(c) if c <= len(plotting.TASK_PALETTE) else [cmap(0.9 * i / (c - 1)) for i in range(c)]
  for i in range(c):
    ax.plot(steps, y[:, i], color=colours[i], lw=1.4, label=plotting.short_label(labels[i], 30) if labels else None)
  ax.axhline(0.0, color="gray", lw=0.8, ls="--")
  ax.grid(alpha=0.25)
  ax.set_xlabel("step")
  ax.set_ylabel("cosine similarity")
  ax.set_title(title, fontsize=9.5)
  if labels:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=130, bbox_inches="tight")
  return fig
