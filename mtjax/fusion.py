r"""Score fusion for serving: one ranking score from the per-task predictions, and a search of its weights.

A multi-task ranker predicts one score per task (click, like, watch time ...); the serving system
ranks by one fused score. The three rules of industrial practice:

.. math::
  \text{weighted\_sum}: \sum_t w_t s_t, \qquad
  \text{weighted\_product}: \prod_t s_t^{w_t}, \qquad
  \text{exponent\_product}: \prod_t (\alpha_t + s_t)^{w_t},

with non-negative weights :math:`w` (the ranking is invariant to their overall scale, so
:func:`search` samples them on the simplex) and, for the products, positive scores (probabilities;
the offsets :math:`\alpha_t > 0` of the exponent product keep a zero score from zeroing the
product; :math:`\alpha = 0` is the weighted product). The products are computed as sums of logs.

:func:`search` evaluates many weight vectors on a validation split -- each task's AUC (or GAUC
per user) of the *fused* score against that task's labels -- and returns the Pareto front of those
per-task metrics: the offline version of choosing a multi-objective ranking formula (Pareto-efficient
learning to rank, Lin et al. 2019; the Bayesian-optimization searches of production systems sample
the same space more cleverly, see the note in :func:`search`).

Examples:
  >>> import numpy as np
  >>> from mtjax import fusion
  >>> scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]])        # [T=2 tasks, N=3 items]
  >>> fusion.fuse(scores, [0.5, 0.5], rule="weighted_sum").round(3).tolist()
  [0.5, 0.5, 0.5]
  >>> fusion.fuse(scores, [1.0, 1.0], rule="weighted_product").round(3).tolist()
  [0.09, 0.16, 0.25]
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from mtjax import metrics as _metrics

RULES = ("weighted_sum", "weighted_product", "exponent_product")
__all__ = ("RULES", "FusionSearch", "fuse", "pareto_front", "search")


def _scores(scores) -> np.ndarray:
  s = np.asarray(scores, np.float64)
  if s.ndim != 2 or s.shape[0] < 1:
    raise ValueError(f"mtjax.fusion: scores must be [T, N] (one row per task), got shape {s.shape}.")
  if not np.all(np.isfinite(s)):
    raise ValueError("mtjax.fusion: scores must be finite.")
  return s


def fuse(scores, weights, *, rule: str = "weighted_sum", alpha: Optional[Sequence[float]] = None) -> np.ndarray:
  r"""The fused score ``[N]`` of per-task scores ``[T, N]`` under ``rule`` (see the module docstring).

  Args:
    scores: ``[T, N]`` per-task scores (probabilities for the product rules).
    weights: ``[T]`` non-negative weights (exponents for the product rules).
    rule: one of :data:`RULES`.
    alpha: ``[T]`` positive offsets of ``"exponent_product"`` (required there, rejected elsewhere).

  Returns:
    ``[N]`` float64 fused scores (the products as their logarithm's exponential; rank by them).
  """
  s = _scores(scores)
  w = np.asarray(weights, np.float64)
  if w.shape != (s.shape[0],):
    raise ValueError(f"mtjax.fusion: weights must be [T] = ({s.shape[0]},), got shape {w.shape}.")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"mtjax.fusion: weights must be finite and non-negative, got {w.tolist()}.")
  if rule not in RULES:
    raise ValueError(f"mtjax.fusion: unknown rule {rule!r}; one of {RULES}.")
  if rule != "exponent_product" and alpha is not None:
    raise ValueError(f"mtjax.fusion: alpha applies to 'exponent_product' only, not {rule!r}.")
  if rule == "weighted_sum":
    return w @ s
  if rule == "exponent_product":
    if alpha is None:
      raise ValueError("mtjax.fusion: 'exponent_product' needs alpha, [T] positive offsets.")
    a = np.asarray(alpha, np.float64)
    if a.shape != (s.shape[0],) or not np.all(np.isfinite(a)) or np.any(a <= 0):
      raise ValueError(f"mtjax.fusion: alpha must be [T] = ({s.shape[0]},) positive offsets, got {a.tolist()}.")
    s = s + a[:, None]
  if np.any(s <= 0):
    raise ValueError(
      f"mtjax.fusion: {rule!r} needs positive scores (probabilities, not logits); the smallest is {s.min():.3g}."
    )
  return np.exp(w @ np.log(s))


def pareto_front(values) -> np.ndarray:
  """Indices (ascending) of the rows of ``values [K, T]`` that no other row dominates (every entry
  ``>=`` and one ``>``: higher is better). Rows with a NaN are never on the front.

  Examples:
    >>> from mtjax import fusion
    >>> fusion.pareto_front([[0.7, 0.6], [0.6, 0.7], [0.6, 0.6], [0.7, 0.6]]).tolist()
    [0, 1, 3]
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 2:
    raise ValueError(f"mtjax.fusion: values must be [K, T], got shape {v.shape}.")
  ok = np.all(np.isfinite(v), axis=1)
  front = []
  for i in np.flatnonzero(ok):
    others = v[ok]
    dominated = np.any(np.all(others >= v[i], axis=1) & np.any(others > v[i], axis=1))
    if not dominated:
      front.append(int(i))
  return np.asarray(front, np.int64)


@dataclasses.dataclass(frozen=True)
class FusionSearch:
  """What :func:`search` returns.

  Attributes:
    rule: the fusion rule.
    task_names: ``T`` names.
    weights: ``[K, T]`` the evaluated weight vectors (each sums to one).
    metrics: ``[K, T]`` each task's metric of the fused score (NaN where undefined).
    pareto: indices of the non-dominated weight vectors, ascending.
    metric: ``"auc"`` or ``"gauc"``.
    alpha: the exponent product's offsets, or None.
    single_task: ``[T, T]`` the metrics of ranking by each task's own score alone (row ``t``:
      ranking by task ``t``), the trade-off's end points.
  """

  rule: str
  task_names: tuple
  weights: np.ndarray
  metrics: np.ndarray
  pareto: np.ndarray
  metric: str
  alpha: Optional[np.ndarray]
  single_task: np.ndarray

  def best(self, preference: Optional[Sequence[float]] = None) -> int:
    """The Pareto-front index that maximizes ``preference @ metrics`` (default: equal weights)."""
    p = np.ones(len(self.task_names)) if preference is None else np.asarray(preference, np.float64)
    if p.shape != (len(self.task_names),) or np.any(p < 0):
      raise ValueError(f"mtjax.fusion: preference must be [T] non-negative, got {p.tolist()}.")
    front = self.pareto
    return int(front[np.argmax(self.metrics[front] @ p)])

  def table(self, max_rows: int = 20) -> str:
    """A markdown table of the Pareto front (sorted by the first task's metric), the single-task rows first."""
    from mtjax.experiment._grid import markdown_table  # pylint: disable=import-outside-toplevel

    m = self.metric.upper()
    header = ["ranking by"] + [f"w {n}" for n in self.task_names] + [f"{m} {n}" for n in self.task_names]
    rows = []
    for t, n in enumerate(self.task_names):
      w = ["1" if i == t else "0" for i in range(len(self.task_names))]
      rows.append([f"{n} alone"] + w + [_fmt(x) for x in self.single_task[t]])
    order = self.pareto[np.argsort(-self.metrics[self.pareto, 0], kind="stable")][:max_rows]
    for k in order:
      rows.append([f"front #{k}"] + [f"{x:.3f}" for x in self.weights[k]] + [_fmt(x) for x in self.metrics[k]])
    return markdown_table(header, rows)

  def plot(self, tasks: Sequence[int] = (0, 1)):
    """A scatter of every candidate's metrics of two tasks, the Pareto front joined, the single-task ends marked."""
    from mtjax._src.plotting import pyplot  # pylint: disable=import-outside-toplevel

    plt = pyplot()
    i, j = tasks
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    ax.scatter(self.metrics[:, i], self.metrics[:, j], s=8, color="0.7", label="candidates")
    front = self.pareto[np.argsort(self.metrics[self.pareto, i])]
    ax.plot(self.metrics[front, i], self.metrics[front, j], "o-", color="C3", ms=3.5, label="Pareto front")
    for t, marker in ((i, "s"), (j, "^")):
      ax.scatter(self.single_task[t, i], self.single_task[t, j], marker=marker, color="black", s=30,
                 label=f"{self.task_names[t]} alone", zorder=3)  # fmt: skip
    m = self.metric.upper()
    ax.set_xlabel(f"{m} {self.task_names[i]} (higher is better)")
    ax.set_ylabel(f"{m} {self.task_names[j]} (higher is better)")
    ax.set_title(f"{self.rule}: {len(self.weights)} weight vectors on the validation split", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return fig


def _fmt(x: float) -> str:
  return "n/a" if not np.isfinite(x) else f"{x:.4f}"


def search(
  scores,
  labels,
  *,
  rule: str = "weighted_sum",
  num_samples: int = 256,
  seed: int = 0,
  metric: str = "auc",
  groups=None,
  masks=None,
  alpha: Optional[Sequence[float]] = None,
  task_names: Optional[Sequence[str]] = None,
  candidates=None,
) -> FusionSearch:
  r"""Evaluates fusion weights on a validation split and returns the Pareto front of per-task metrics.

  Each candidate weight vector :math:`w` (``num_samples`` draws from the flat Dirichlet on the
  simplex, seeded, plus the ``T`` one-hot vectors and the uniform one; or ``candidates``) fuses the
  ``[T, N]`` scores into one ranking score; task ``t``'s metric is the AUC (``metric="auc"``) or the
  per-group AUC (``"gauc"``, with ``groups``, e.g. user ids) of that score against task ``t``'s
  binary labels, over the samples where ``masks[t]`` holds. The front is the set of weight vectors
  no other dominates. Random search is the plain baseline; a Bayesian optimization of
  ``preference @ metrics`` (the production practice) samples fewer points, and can start from this
  front.

  Examples:
    >>> import numpy as np
    >>> from mtjax import fusion
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.random((2, 500)) < 0.3
    >>> scores = np.clip(0.5 * labels + rng.random((2, 500)), 0.01, None)   # each task's own signal
    >>> res = fusion.search(scores, labels, num_samples=64, task_names=["click", "like"])
    >>> res.metrics.shape, bool(len(res.pareto) >= 2)
    ((67, 2), True)

  Args:
    scores: ``[T, N]`` per-task predictions on the validation split (probabilities for products).
    labels: ``[T, N]`` binary labels.
    rule: one of :data:`RULES`.
    num_samples: random weight vectors to draw.
    seed: the draw's seed.
    metric: ``"auc"`` or ``"gauc"``.
    groups: ``[N]`` group ids for ``"gauc"``.
    masks: optional ``[T, N]`` bool: where task ``t``'s label is observed (e.g. a conversion label
      only on clicks).
    alpha: the exponent product's offsets.
    task_names: ``T`` names (default ``task_0 ...``).
    candidates: ``[K, T]`` weight vectors to evaluate instead of the random draw.

  Returns:
    A :class:`FusionSearch`.
  """
  s = _scores(scores)
  t, n = s.shape
  y = np.asarray(labels)
  if y.shape != (t, n):
    raise ValueError(f"mtjax.fusion: labels must be [T, N] = {(t, n)}, got shape {y.shape}.")
  m = np.ones((t, n), bool) if masks is None else np.asarray(masks, bool)
  if m.shape != (t, n):
    raise ValueError(f"mtjax.fusion: masks must be [T, N] = {(t, n)}, got shape {m.shape}.")
  if metric not in ("auc", "gauc"):
    raise ValueError(f"mtjax.fusion: metric must be 'auc' or 'gauc', got {metric!r}.")
  if metric == "gauc":
    if groups is None:
      raise ValueError("mtjax.fusion: metric='gauc' needs groups ([N] ids, e.g. users).")
    g = np.asarray(groups)
    if g.shape != (n,):
      raise ValueError(f"mtjax.fusion: groups must be [N] = ({n},), got shape {g.shape}.")
  names = tuple(task_names) if task_names is not None else tuple(f"task_{i}" for i in range(t))
  if len(names) != t:
    raise ValueError(f"mtjax.fusion: {len(names)} task names for {t} tasks.")
  if candidates is None:
    if num_samples < 0:
      raise ValueError(f"mtjax.fusion: num_samples must be >= 0, got {num_samples}.")
    draws = np.random.default_rng(seed).dirichlet(np.ones(t), size=num_samples) if num_samples else np.zeros((0, t))
    w = np.concatenate([np.eye(t), np.full((1, t), 1.0 / t), draws])
  else:
    w = np.asarray(candidates, np.float64)
    if w.ndim != 2 or w.shape[1] != t or np.any(w < 0) or not np.all(np.isfinite(w)):
      raise ValueError(f"mtjax.fusion: candidates must be [K, T={t}] finite non-negative weights.")
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)

  def evaluate(fused: np.ndarray) -> np.ndarray:
    out = np.empty(t)
    for k in range(t):
      sel = m[k]
      if metric == "auc":
        out[k] = _metrics.auc(y[k][sel], fused[sel])
      else:
        out[k] = _metrics.gauc(y[k][sel], fused[sel], np.asarray(groups)[sel])
    return out

  a = None if alpha is None else np.asarray(alpha, np.float64)
  values = np.stack([evaluate(fuse(s, wk, rule=rule, alpha=alpha)) for wk in w])
  single = np.stack([evaluate(s[k]) for k in range(t)])
  return FusionSearch(rule, names, w, values, pareto_front(values), metric, a, single)
