"""Shared figure helpers: one colour per method everywhere, panel grids, seed bands, outside legends.

Every figure mtjax and the research scripts draw takes its method colours from
:func:`method_colors`, so a method has the same colour in the learning curves, the Delta_m% bars,
the conflict curves and the weights grid of one run. matplotlib is imported lazily.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

# Method colours, by the method's position in the registry (mtjax.experiment._registry.METHODS).
PALETTE = (
  "#222222",
  "#1f77b4",
  "#ff7f0e",
  "#2ca02c",
  "#d62728",
  "#9467bd",
  "#8c564b",
  "#e377c2",
  "#17becf",
  "#bcbd22",
  "#7f7f7f",
  "#aec7e8",
  "#ffbb78",
  "#98df8a",
  "#ff9896",
  "#c5b0d5",
  "#c49c94",
  "#f7b6d2",
  "#9edae5",
  "#dbdb8d",
  "#393b79",
  "#637939",
  "#8c6d31",
  "#843c39",
  "#7b4173",
  "#3182bd",
  "#e6550d",
  "#31a354",
  "#756bb1",
  "#636363",
  "#de9ed6",
)
TASK_PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def _base(label: str) -> str:
  """The method name inside a label: ``"pcgrad"`` for ``"pcgrad"``, ``"pcgrad:every=4"``, ``"pcgrad-ema"``."""
  return re.split(r"[:\s@(\-]", str(label).strip(), maxsplit=1)[0].lower()


def method_colors(labels: Sequence[str]) -> dict:
  """``{label: colour}`` for the methods of one run: a method's own colour (stable across runs), or
  for a label that repeats a method (``pcgrad`` and ``pcgrad-every4``) the first unused colour.

  Call it with the same labels (in the same order) for every figure of a run and a method has one
  colour in all of them.
  """
  from mtjax.experiment._registry import METHODS  # the registry's order: the default comparison's methods first

  order = list(METHODS)  # linear, the usual baseline, first: near-black
  out: dict = {}
  used: set = set()
  pending = []
  for label in labels:
    name = str(label)
    key = name.lower() if name.lower() in order else _base(name)
    colour = PALETTE[order.index(key) % len(PALETTE)] if key in order else None
    if colour is None or colour in used:
      pending.append(label)
      continue
    out[label] = colour
    used.add(colour)
  free = [c for c in PALETTE if c not in used]
  for i, label in enumerate(pending):
    out[label] = free[i % len(free)] if free else PALETTE[i % len(PALETTE)]
  return {label: out[label] for label in labels}


def method_styles(labels: Sequence[str]) -> dict:
  """``{label: line style}``: solid, dashed, dash-dot, dotted in turn, so curves that lie on top of
  each other stay distinguishable (a method keeps its style when called with the same labels)."""
  styles = ("-", "--", "-.", ":")
  return {label: styles[i % len(styles)] for i, label in enumerate(labels)}


def task_colors(n: int) -> list:
  """Colours for ``n`` tasks (a palette unlike the method colours, so curves of tasks never read as methods)."""
  return [TASK_PALETTE[i % len(TASK_PALETTE)] for i in range(n)]


def pyplot():
  import matplotlib.pyplot as plt  # no backend switch: headless runs get Agg, notebooks keep inline

  return plt


def grid(n: int, *, ncols: int = 4, panel=(3.4, 2.8), **kwargs):
  """``(fig, axes)``: ``n`` panels in rows of at most ``ncols``; ``axes`` is a flat list of the used
  panels (the unused ones of the last row are hidden)."""
  plt = pyplot()
  cols = max(1, min(n, ncols))
  rows = int(np.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False, **kwargs)
  flat = list(axes.flat)
  for ax in flat[n:]:
    ax.set_visible(False)
  return fig, flat[:n]


def legend_outside(
  fig, axes=None, *, where: str = "right", title: Optional[str] = None, fontsize: float = 8, handles=None, labels=None
):
  """One figure legend outside the panels (``where``: ``"right"`` or ``"below"``), from the labelled
  artists of ``axes`` (each label once); call after ``tight_layout``. Saving with
  ``bbox_inches="tight"`` keeps it in the image."""
  if handles is None:
    seen: dict = {}
    for ax in axes if axes is not None else fig.axes:
      for h, lab in zip(*ax.get_legend_handles_labels()):
        if not lab.startswith("_") and lab not in seen:
          seen[lab] = h
    handles, labels = list(seen.values()), list(seen)
  if not handles:
    return None
  place = (
    {"loc": "upper center", "bbox_to_anchor": (0.5, 0.0), "ncol": min(len(handles), 6)}
    if where == "below"
    else {"loc": "center left", "bbox_to_anchor": (1.0, 0.5)}
  )
  return fig.legend(handles, labels, fontsize=fontsize, title=title, title_fontsize=fontsize, frameon=False, **place)


def smooth(y, window: int) -> np.ndarray:
  """Trailing moving average along axis -1 over ``window`` points, same length (the first points
  average what there is), so curves keep their first and last step."""
  y = np.asarray(y, np.float64)
  if window <= 1 or y.shape[-1] < 2:
    return y
  c = np.cumsum(y, axis=-1)
  out = np.empty_like(y)
  n = y.shape[-1]
  idx = np.arange(n)
  lo = idx - window
  out[..., :] = c
  out[..., window:] = c[..., window:] - c[..., lo[window:]]
  return out / np.minimum(idx + 1, window)


def band_alpha(num_curves: int) -> float:
  """The opacity of seed bands when ``num_curves`` of them share a panel (lighter with more, so they
  do not pile up into one dark area)."""
  return float(np.clip(0.3 / np.sqrt(max(1, num_curves)), 0.06, 0.2))


def band(ax, x, ys, *, color, label=None, lw: float = 1.5, alpha: float = 0.18, marker=None, ls="-"):
  """Mean over the rows of ``ys`` (``[S, n]``: seeds) as a line, with the min--max band when S > 1."""
  ys = np.atleast_2d(np.asarray(ys, np.float64))
  mean = np.nanmean(ys, 0)
  (line,) = ax.plot(x, mean, color=color, lw=lw, label=label, marker=marker, ms=3, ls=ls)
  if ys.shape[0] > 1:
    ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color, alpha=alpha, lw=0)
  return line


def short_label(name: str, width: int = 14, *, keep: str = "end") -> str:
  """A label of at most ``width`` characters: a long parameter path keeps its end (``keep="end"``),
  a task name its start (``keep="start"``), the cut marked with an ellipsis."""
  name = str(name)
  if len(name) <= width:
    return name
  return "…" + name[-(width - 1) :] if keep == "end" else name[: width - 1] + "…"


def robust_limit(values, *, ratio: float = 3.0, room: float = 1.5) -> Optional[float]:
  """An axis half-range that one outlier does not set: ``room`` x the second largest |value| when the
  largest |value| exceeds ``ratio`` x the second; else None (no clipping). Only with at least three
  other non-zero values: with one or two, the outlier's true height is the clearer picture."""
  v = np.asarray(values, np.float64)
  v = np.sort(np.abs(v[np.isfinite(v)]))[::-1]
  if (v > 0).sum() < 4 or not v[0] > ratio * v[1]:
    return None
  return float(room * v[1])


def annotated_bars(
  ax,
  labels,
  values,
  *,
  colors,
  fmt: str = "{:+.2f}",
  clip: bool = True,
  fontsize: float = 7.5,
  notes: Optional[dict] = None,
  spread: Optional[Sequence] = None,
):
  """Bars with their values written on them; with ``clip``, an outlier that would squash the others
  is cut at a robust axis limit (hatched, its true value written at the cut) instead. ``spread``:
  per bar, the single-seed values, drawn as dots (the value is written beyond them)."""
  values = np.asarray(values, np.float64)
  dots = [np.asarray(p, np.float64).ravel() for p in (spread or []) if p is not None]
  lim = robust_limit(np.concatenate([values, *dots])) if clip else None  # the dots count: none is cut unseen
  shown = np.clip(values, -lim, lim) if lim else values
  x = np.arange(len(labels))
  bars = ax.bar(
    x, np.nan_to_num(shown), color=[colors[lab] for lab in labels], width=0.7, edgecolor="black", linewidth=0.4
  )
  finite = shown[np.isfinite(shown)]
  ends = []  # per bar: the extent of bar and dots on the bar's side
  for i, s in enumerate(shown):
    pts = np.asarray(spread[i], np.float64) if spread is not None and spread[i] is not None else np.zeros(0)
    pts = pts[np.isfinite(pts)]
    xs = i + np.linspace(-0.12, 0.12, pts.size)
    out = np.abs(pts) > lim if lim else np.zeros(pts.size, bool)
    if lim:  # a dot beyond the cut: a triangle at the axis limit, pointing out
      pts = np.clip(pts, -lim, lim)
      for x, y in zip(xs[out], pts[out]):
        ax.plot(x, y, "^" if y > 0 else "v", color="white", mec="black", ms=4.5, mew=0.7, zorder=3)
    if (~out).any():
      ax.plot(xs[~out], pts[~out], "o", color="white", mec="black", ms=3.5, mew=0.7, zorder=3)
    s = s if np.isfinite(s) else 0.0
    ends.append(max([s, *pts]) if s >= 0 else min([s, *pts]))
  allv = np.asarray(ends + list(finite) + [0.0])
  lo, hi = float(allv.min()), float(allv.max())
  span = hi - lo or 1.0
  for i, (bar, v, s) in enumerate(zip(bars, values, shown)):
    cut = bool(lim) and np.isfinite(v) and abs(v) > lim
    if cut:
      bar.set_hatch("///")
    text = "n/a" if not np.isfinite(v) else fmt.format(v) + ("\n(axis cut)" if cut else "")
    if notes and labels[i] in notes:
      text = notes[labels[i]]
    up = not np.isfinite(s) or s >= 0
    ax.text(
      i, ends[i] + (0.03 if up else -0.03) * span, text, ha="center", va="bottom" if up else "top", fontsize=fontsize
    )
  ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
  pad = 0.2 * span  # room for the values written above / below the bars
  ax.set_ylim(lo - (pad if lo < 0 else 0.02 * span), hi + (pad if hi > 0 else 0.02 * span))
  ax.axhline(0, color="black", lw=0.8)
  return bars
