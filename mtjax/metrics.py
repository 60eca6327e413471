"""Evaluation metrics for multi-task recommendation (host-side NumPy, float64).

AUC, GAUC and logloss per task and macro-averaged, and the multi-task improvement Delta_m%.
All functions take NumPy or JAX arrays, compute in float64 on the host, are vectorized and
``O(n log n)`` (one sort), and return Python floats.

Undefined values: AUC is undefined when the labels are all one class (there is no
positive-negative pair to rank). :func:`auc` then returns ``nan`` rather than raising, so that
an evaluation loop over tasks and shards does not crash on a degenerate slice; :func:`per_task`
skips ``nan`` entries in its macro average, and :func:`delta_m` rejects them.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

DEFAULT_LOGLOSS_EPS = 1e-7


def _as_1d(x, name: str, where: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"mtjax: {where}: {name} must be a 1-D array [n], got shape {arr.shape}.")
  return arr


def _binary_labels(labels, where: str) -> np.ndarray:
  y = _as_1d(labels, "labels", where)
  yf = y.astype(np.float64)
  if not np.all((yf == 0) | (yf == 1)):
    bad = np.unique(yf[(yf != 0) & (yf != 1)])[:5]
    raise ValueError(f"mtjax: {where}: labels must be binary (0/1 or bool), found values {bad.tolist()}.")
  return yf


def _finite_scores(scores, n: int, where: str, name: str = "scores") -> np.ndarray:
  s = _as_1d(scores, name, where).astype(np.float64)
  if s.shape[0] != n:
    raise ValueError(f"mtjax: {where}: {name} has {s.shape[0]} entries but labels have {n}.")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"mtjax: {where}: {name} contain NaN or inf; the ranking is undefined.")
  return s


def _grouped_auc(y: np.ndarray, s: np.ndarray, codes: np.ndarray, num_groups: int):
  """Per-group Mann-Whitney AUC with average ranks for ties; one ``lexsort``.

  Returns ``(auc [G], n [G], n_pos [G])``; ``auc`` is ``nan`` for single-class groups.
  """
  order = np.lexsort((s, codes))  # by group, then score
  g, ss, yy = codes[order], s[order], y[order]
  n = y.shape[0]
  counts = np.bincount(codes, minlength=num_groups)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pos_in_group = np.arange(n) - starts[g]  # 0-based position inside the group
  # Runs of ties: same group and same score.
  new_run = np.ones(n, dtype=bool)
  new_run[1:] = (g[1:] != g[:-1]) | (ss[1:] != ss[:-1])
  run_id = np.cumsum(new_run) - 1
  run_first = pos_in_group[new_run]
  run_last = np.append(np.flatnonzero(new_run)[1:] - 1, n - 1)
  run_last = pos_in_group[run_last]
  avg_rank = (run_first + run_last) / 2.0 + 1.0  # 1-based average rank of each run
  ranks = avg_rank[run_id]
  n_pos = np.bincount(g, weights=yy, minlength=num_groups)
  rank_sum = np.bincount(g, weights=yy * ranks, minlength=num_groups)
  n_neg = counts - n_pos
  with np.errstate(invalid="ignore", divide="ignore"):
    aucs = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
  aucs = np.where((n_pos > 0) & (n_neg > 0), aucs, np.nan)
  return aucs, counts.astype(np.float64), n_pos


def auc(labels, scores) -> float:
  r"""Area under the ROC curve as the Mann-Whitney statistic (ties count 1/2).

  .. math::
    \mathrm{AUC} = \frac{1}{n_+ n_-} \sum_{i: y_i = 1} \sum_{j: y_j = 0}
      \Bigl([s_i > s_j] + \tfrac12 [s_i = s_j]\Bigr)
    = \frac{R_+ - n_+(n_+ + 1)/2}{n_+ n_-},

  where :math:`R_+` is the sum of the (average, 1-based) ranks of the positives among all
  scores. One sort, ``O(n log n)``, float64.

  Single-class labels (:math:`n_+ = 0` or :math:`n_- = 0`): the AUC is undefined and ``nan``
  is returned (no exception), see the module docstring.

  Examples:
    >>> from mtjax import metrics
    >>> metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> metrics.auc([0, 1], [0.5, 0.5])  # a tie counts 1/2
    0.5
    >>> metrics.auc([1, 1], [0.2, 0.3])
    nan

  Args:
    labels: ``[n]`` binary labels (0/1 or bool).
    scores: ``[n]`` finite scores (probabilities or logits: only the order matters).

  Returns:
    The AUC in ``[0, 1]``, or ``nan`` for single-class labels.

  References:
    Mann, Whitney, *On a Test of Whether one of Two Random Variables is Stochastically Larger
    than the Other*, Annals of Mathematical Statistics, 1947.
    Hanley, McNeil, *The Meaning and Use of the Area under a ROC Curve*, Radiology, 1982.
  """
  y = _binary_labels(labels, "auc")
  s = _finite_scores(scores, y.shape[0], "auc")
  if y.shape[0] == 0:
    return float("nan")
  aucs, _, _ = _grouped_auc(y, s, np.zeros(y.shape[0], dtype=np.int64), 1)
  return float(aucs[0])


def gauc(labels, scores, groups, *, weighting: str = "impressions") -> float:
  r"""Group AUC: the impression-weighted mean of per-group (per-user) AUCs.

  .. math::
    \mathrm{GAUC} = \frac{\sum_{u \in U} n_u \,\mathrm{AUC}_u}{\sum_{u \in U} n_u},

  with :math:`\mathrm{AUC}_u` the :func:`auc` of group u's samples, :math:`n_u` its number of
  impressions (samples), and U the groups that have both a positive and a negative label;
  groups whose labels are all one class are skipped (their AUC is undefined). ``nan`` when no
  group qualifies. All groups at once with one ``lexsort``, ``O(n log n)``.

  Examples:
    >>> from mtjax import metrics
    >>> labels = [1, 0, 0, 1, 0, 1, 1]
    >>> scores = [0.9, 0.2, 0.5, 0.1, 0.3, 0.7, 0.8]
    >>> groups = [0, 0, 0, 1, 1, 2, 2]  # group 2 is all positive: skipped
    >>> metrics.gauc(labels, scores, groups)  # (3 * 1.0 + 2 * 0.0) / 5
    0.6

  Args:
    labels: ``[n]`` binary labels.
    scores: ``[n]`` finite scores.
    groups: ``[n]`` group ids (user or session; any sortable dtype).
    weighting: ``"impressions"`` (default, the papers' :math:`n_u`) or ``"uniform"`` (plain mean
      of the per-group AUCs).

  Returns:
    The GAUC, or ``nan`` when no group has both classes.

  References:
    Zhu, Jin, Tan, Pan, Zeng, Li, Gai, *Optimized Cost per Click in Taobao Display Advertising*,
    KDD 2017.
    Zhou, Zhu, Song, Fan, Zhu, Ma, Yan, Jin, Li, Gai, *Deep Interest Network for Click-Through
    Rate Prediction*, KDD 2018.
  """
  if weighting not in ("impressions", "uniform"):
    raise ValueError(f"mtjax: gauc: weighting must be 'impressions' or 'uniform', got {weighting!r}.")
  y = _binary_labels(labels, "gauc")
  s = _finite_scores(scores, y.shape[0], "gauc")
  g = _as_1d(groups, "groups", "gauc")
  if g.shape[0] != y.shape[0]:
    raise ValueError(f"mtjax: gauc: groups has {g.shape[0]} entries but labels have {y.shape[0]}.")
  if y.shape[0] == 0:
    return float("nan")
  uniq, codes = np.unique(g, return_inverse=True)
  aucs, counts, _ = _grouped_auc(y, s, codes.reshape(-1).astype(np.int64), uniq.shape[0])
  valid = ~np.isnan(aucs)
  if not np.any(valid):
    return float("nan")
  w = counts[valid] if weighting == "impressions" else np.ones(int(valid.sum()))
  return float(np.sum(w * aucs[valid]) / np.sum(w))


def logloss(labels, probs, *, eps: float = DEFAULT_LOGLOSS_EPS, from_logits: bool = False) -> float:
  r"""Mean binary cross-entropy of probabilities (or logits), float64.

  .. math::
    \mathrm{logloss} = -\frac1n \sum_i \bigl[y_i \log \tilde p_i + (1 - y_i) \log(1 - \tilde p_i)\bigr],
    \qquad \tilde p_i = \mathrm{clip}(p_i, \epsilon, 1 - \epsilon).

  Clipping: probabilities are clipped to ``[eps, 1 - eps]`` (default ``eps = 1e-7``) so that a
  confident mistake costs at most :math:`-\log \epsilon \approx 16.1` instead of ``inf``;
  ``1e-7`` is about the resolution of float32 probabilities near 1 (a float32 sigmoid saturates
  at ``1 - 6e-8``). Pass ``eps=0`` for no clipping. With ``from_logits=True`` the scores are
  logits and the loss is computed exactly in float64 as
  :math:`y\,\mathrm{softplus}(-x) + (1 - y)\,\mathrm{softplus}(x)` (no clipping).

  Examples:
    >>> from mtjax import metrics
    >>> round(metrics.logloss([1, 0], [0.8, 0.4]), 6)  # -(log 0.8 + log 0.6) / 2
    0.366985
    >>> round(metrics.logloss([1, 0], [0.0, 0.0]), 4)  # clipped: -log(1e-7) / 2
    8.059

  Args:
    labels: ``[n]`` labels in ``[0, 1]``.
    probs: ``[n]`` predicted probabilities (or logits with ``from_logits=True``).
    eps: clipping constant, ``0 <= eps < 0.5``.
    from_logits: whether ``probs`` are logits.

  Returns:
    The mean logloss (``nan`` for empty input).
  """
  y = _as_1d(labels, "labels", "logloss").astype(np.float64)
  p = _as_1d(probs, "probs", "logloss").astype(np.float64)
  if p.shape != y.shape:
    raise ValueError(f"mtjax: logloss: probs has shape {p.shape} but labels have shape {y.shape}.")
  if np.any((y < 0) | (y > 1)):
    raise ValueError("mtjax: logloss: labels must lie in [0, 1].")
  if np.any(np.isnan(p)):
    raise ValueError("mtjax: logloss: probs contain NaN.")
  if y.shape[0] == 0:
    return float("nan")
  if from_logits:
    per = y * np.logaddexp(0.0, -p) + (1 - y) * np.logaddexp(0.0, p)
    return float(np.mean(per))
  if not 0 <= eps < 0.5:
    raise ValueError(f"mtjax: logloss: eps must be in [0, 0.5), got {eps}.")
  if np.any((p < 0) | (p > 1)):
    raise ValueError("mtjax: logloss: probs must lie in [0, 1]; pass from_logits=True for logits.")
  p = np.clip(p, eps, 1 - eps)
  with np.errstate(divide="ignore", invalid="ignore"):
    per = -(np.where(y > 0, y * np.log(p), 0.0) + np.where(y < 1, (1 - y) * np.log1p(-p), 0.0))
  return float(np.mean(per))


def per_task(
  metric: Callable[..., float],
  labels,
  scores,
  masks=None,
  *,
  groups=None,
  names: Optional[Sequence[str]] = None,
  macro: bool = True,
) -> dict:
  r"""Applies ``metric`` to each task's valid samples; adds the macro average.

  For each task t, ``metric(labels[t][m_t], scores[t][m_t])`` with ``m_t = masks[t]`` (all
  samples when ``masks`` is None), and with ``groups=groups[m_t]`` when ``groups`` is given (for
  :func:`gauc`). ``"macro"`` is the plain mean over tasks of the values that are not ``nan``
  (a task whose metric is undefined on this data, e.g. single-class AUC, is skipped); ``nan``
  if every task is ``nan``.

  Examples:
    >>> import numpy as np
    >>> from mtjax import metrics
    >>> labels = np.array([[0, 1, 1, 0], [1, 1, 0, 0]])
    >>> scores = np.array([[0.1, 0.9, 0.8, 0.3], [0.2, 0.6, 0.4, 0.1]])
    >>> masks = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=bool)
    >>> metrics.per_task(metrics.auc, labels, scores, masks, names=('ctr', 'cvr'))
    {'ctr': 1.0, 'cvr': 1.0, 'macro': 1.0}

  Args:
    metric: ``metric(labels [n], scores [n]) -> float`` (:func:`auc`, :func:`logloss`, ...), or
      one accepting ``groups=`` when ``groups`` is given (:func:`gauc`).
    labels: ``[T, B]`` array (or a sequence of T ``[B]`` arrays).
    scores: ``[T, B]``, same layout as ``labels``.
    masks: optional ``[T, B]`` boolean validity masks.
    groups: optional group ids, ``[B]`` (shared by the tasks) or ``[T, B]``.
    names: task names (default ``task_0``, ``task_1``, ...).
    macro: whether to add the ``"macro"`` entry.

  Returns:
    ``{name: value, ..., "macro": mean}`` as Python floats.
  """
  y = np.asarray(labels)
  s = np.asarray(scores)
  if y.ndim != 2 or s.shape != y.shape:
    raise ValueError(f"mtjax: per_task: labels and scores must both be [T, B], got shapes {y.shape} and {s.shape}.")
  num_tasks = y.shape[0]
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != y.shape:
      raise ValueError(f"mtjax: per_task: masks have shape {masks.shape}, expected {y.shape}.")
    if masks.dtype != bool:
      if not np.all((masks == 0) | (masks == 1)):
        raise ValueError("mtjax: per_task: masks must be boolean (or 0/1).")
      masks = masks.astype(bool)
  if groups is not None:
    groups = np.asarray(groups)
    if groups.shape not in (y.shape[1:], y.shape):
      raise ValueError(f"mtjax: per_task: groups must be [B] or [T, B] = {y.shape}, got {groups.shape}.")
  if names is None:
    names = [f"task_{t}" for t in range(num_tasks)]
  names = list(names)
  if len(names) != num_tasks or len(set(names)) != num_tasks:
    raise ValueError(f"mtjax: per_task: need {num_tasks} distinct task names, got {names}.")
  if macro and "macro" in names:
    raise ValueError("mtjax: per_task: 'macro' is reserved for the macro average; rename that task.")
  out = {}
  for t, name in enumerate(names):
    sel = slice(None) if masks is None else masks[t]
    kwargs = {}
    if groups is not None:
      kwargs["groups"] = (groups if groups.ndim == 1 else groups[t])[sel]
    out[name] = float(metric(y[t][sel], s[t][sel], **kwargs))
  if macro:
    vals = np.array([out[n] for n in names], dtype=np.float64)
    finite = vals[~np.isnan(vals)]
    out["macro"] = float(np.mean(finite)) if finite.size else float("nan")
  return out


def delta_m(
  metrics: Union[Mapping[str, float], Sequence[float], np.ndarray],
  baseline: Union[Mapping[str, float], Sequence[float], np.ndarray],
  lower_is_better: Union[bool, Mapping[str, bool], Sequence[bool], np.ndarray] = False,
) -> float:
  r"""Average relative improvement over a baseline, in percent (:math:`\Delta_m\%`).

  .. math::
    \Delta_m\% = \frac{100}{T} \sum_{t=1}^T (-1)^{l_t} \frac{M_t - M_t^{\mathrm{base}}}{M_t^{\mathrm{base}}},

  with :math:`l_t = 1` when lower is better for metric t (logloss, MSE) and 0 otherwise (AUC).
  Positive means better than the baseline (e.g. single-task models) on average.

  Examples:
    >>> from mtjax import metrics
    >>> mtl = {'ctr_auc': 0.77, 'cvr_auc': 0.66, 'ctr_logloss': 0.45}
    >>> base = {'ctr_auc': 0.70, 'cvr_auc': 0.60, 'ctr_logloss': 0.50}
    >>> lower = {'ctr_auc': False, 'cvr_auc': False, 'ctr_logloss': True}
    >>> round(metrics.delta_m(mtl, base, lower), 6)  # (10 + 10 + 10) / 3
    10.0

  Args:
    metrics: the T metric values, a dict ``name -> value`` or a sequence in task order.
    baseline: the baseline values, same keys (or length) as ``metrics``.
    lower_is_better: one bool for all metrics, a dict ``name -> bool`` (for dict inputs) or a
      sequence of T bools.

  Returns:
    :math:`\Delta_m` in percent.

  Raises:
    ValueError: mismatched names or lengths, a zero or non-finite baseline, a non-finite metric,
      or a ``"macro"`` entry (pass per-task values only).

  References:
    Maninis, Radosavovic, Kokkinos, *Attentive Single-Tasking of Multiple Tasks*, CVPR 2019.
  """
  if isinstance(metrics, Mapping) != isinstance(baseline, Mapping):
    raise ValueError("mtjax: delta_m: metrics and baseline must both be dicts or both be sequences.")
  if isinstance(metrics, Mapping):
    if "macro" in metrics or "macro" in baseline:
      raise ValueError(
        "mtjax: delta_m: got a 'macro' entry; Delta_m averages per-task metrics, so drop 'macro' "
        "(e.g. {k: v for k, v in d.items() if k != 'macro'})."
      )
    if set(metrics) != set(baseline):
      raise ValueError(
        f"mtjax: delta_m: metrics and baseline name different tasks: only in metrics "
        f"{sorted(set(metrics) - set(baseline))}, only in baseline {sorted(set(baseline) - set(metrics))}."
      )
    names = list(metrics)
    m = np.array([metrics[k] for k in names], dtype=np.float64)
    b = np.array([baseline[k] for k in names], dtype=np.float64)
    if isinstance(lower_is_better, Mapping):
      if set(lower_is_better) != set(names):
        raise ValueError(
          f"mtjax: delta_m: lower_is_better names {sorted(lower_is_better)} but the metrics are {sorted(names)}."
        )
      lower = np.array([bool(lower_is_better[k]) for k in names])
    elif isinstance(lower_is_better, (bool, np.bool_)):
      lower = np.full(len(names), bool(lower_is_better))
    else:
      raise ValueError("mtjax: delta_m: with dict metrics, lower_is_better must be a bool or a dict name -> bool.")
  else:
    names = [str(i) for i in range(len(metrics))]
    m = np.asarray(metrics, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if m.ndim != 1 or m.shape != b.shape:
      raise ValueError(f"mtjax: delta_m: metrics {m.shape} and baseline {b.shape} must be vectors of the same length.")
    if isinstance(lower_is_better, Mapping):
      raise ValueError("mtjax: delta_m: a dict lower_is_better needs dict metrics and baseline.")
    lower = np.asarray(lower_is_better, dtype=bool)
    if lower.ndim == 0:
      lower = np.full(m.shape, bool(lower))
    if lower.shape != m.shape:
      raise ValueError(
        f"mtjax: delta_m: lower_is_better has {lower.shape[0]} entries but there are {m.shape[0]} metrics."
      )
  if m.size == 0:
    raise ValueError("mtjax: delta_m: no metrics given.")
  bad_base = [names[i] for i in np.flatnonzero(~np.isfinite(b) | (b == 0))]
  if bad_base:
    raise ValueError(
      f"mtjax: delta_m: the baseline is zero or non-finite for {bad_base}; the relative change is "
      "undefined. Use a metric with a nonzero baseline or leave that task out."
    )
  bad = [names[i] for i in np.flatnonzero(~np.isfinite(m))]
  if bad:
    raise ValueError(f"mtjax: delta_m: non-finite metric values for {bad}.")
  sign = np.where(lower, -1.0, 1.0)
  return float(np.mean(sign * (m - b) / b) * 100.0)
