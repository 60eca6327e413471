"""Model x method x seed grids (`compare_grid`) with paired per-seed statistics against a baseline.

Every (model, method, seed) run goes through :func:`mtjax.experiment.compare` (same data split and,
per seed, the same initialisation for every method of a model), so a method and the baseline are
compared *seed by seed*: the per-seed differences of each task's metric and the per-seed
Delta_m% (:func:`mtjax.metrics.delta_m` of the seed's run against the baseline's run of the same
seed, the runner's definition) are summarized by their mean, sample std, standard error, a
paired t-test, an exact two-sided sign-flip permutation test and the wins / losses across seeds.
Statistics that need two seeds or more are ``None`` (said "n/a") with one seed, never NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from mtjax import metrics as metrics_lib
from mtjax.experiment import _config

EXACT_MAX_SEEDS = 16  # the sign-flip test enumerates all 2^n flips up to here, samples them above
PERMUTATIONS = 20000  # sampled sign flips for more seeds (fixed generator: the p-value is reproducible)


# ------------------------------------------------------------------ statistics (no training needed)


@dataclasses.dataclass(frozen=True)
class PairedStats:
  """Summary of per-seed paired differences ``d_s`` (method - baseline on seed ``s``).

  ``wins`` / ``losses`` / ``ties`` count seeds where the method is better / worse / equal (for a
  lower-is-better metric a negative difference is a win). ``std`` (ddof=1), ``se``, ``t``,
  ``p_t`` (two-sided paired t-test, ``n - 1`` degrees of freedom) and ``p_sign_flip`` (exact
  two-sided sign-flip permutation test of ``|mean d|``, sampled above ``EXACT_MAX_SEEDS`` seeds)
  are ``None`` with fewer than 2 seeds. With ``n`` seeds the sign-flip p-value is at least
  ``2 / 2**n`` (0.5 with two seeds, 0.25 with three): few seeds cannot show significance.
  """

  n: int
  mean: Optional[float]
  std: Optional[float]
  se: Optional[float]
  t: Optional[float]
  p_t: Optional[float]
  p_sign_flip: Optional[float]
  wins: int
  losses: int
  ties: int
  lower_is_better: bool = False
  values: tuple = ()

  @property
  def p(self) -> Optional[float]:
    """The p-value used in tables and conclusions: the exact sign-flip test's."""
    return self.p_sign_flip

  def significant(self, alpha: float = 0.05) -> bool:
    return self.p is not None and self.n >= 2 and self.p < alpha

  def to_dict(self) -> dict:
    return {
      f.name: (list(getattr(self, f.name)) if f.name == "values" else getattr(self, f.name))
      for f in dataclasses.fields(self)
    }


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
  tiny = 1e-300
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 400):
    m2 = 2 * m
    even = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
    odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
    for num in (even, odd):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + num / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function ``I_x(a, b)`` (plain Python, no scipy)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_test_p(t: float, df: int) -> float:
  """Two-sided p-value of Student's t statistic ``t`` with ``df`` degrees of freedom."""
  if math.isinf(t):
    return 0.0
  return betainc(df / 2.0, 0.5, df / (df + t * t))


def sign_flip_p(diffs) -> Optional[float]:
  """Two-sided p-value of the sign-flip permutation test of ``mean(diffs) = 0``.

  Under the null the differences are symmetric about 0: every flip of their signs is as likely.
  The p-value is the share of the ``2**n`` flips whose ``|mean|`` is at least the observed one
  (exact up to ``EXACT_MAX_SEEDS`` values; above, ``PERMUTATIONS`` flips drawn with a fixed seed
  plus the observed one). ``None`` for an empty sample.
  """
  d = np.asarray(diffs, np.float64).ravel()
  n = d.size
  if n == 0:
    return None
  observed = abs(d.mean())
  tol = 1e-12 * max(1.0, float(np.abs(d).max()))
  if n <= EXACT_MAX_SEEDS:
    signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)  # [2^n, n]
    return float(np.mean(np.abs(signs @ d) / n >= observed - tol))
  signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(PERMUTATIONS, n))
  return float((1 + np.sum(np.abs(signs @ d) / n >= observed - tol)) / (PERMUTATIONS + 1))


def paired_stats(values, baseline, *, lower_is_better: bool = False) -> PairedStats:
  """:class:`PairedStats` of ``values - baseline`` over seeds (two ``[S]`` arrays, same seed order).

  Seeds where either value is undefined (NaN) are left out (``n`` counts the rest).

  Examples:
    >>> from mtjax.experiment import paired_stats
    >>> s = paired_stats([0.80, 0.82, 0.81], [0.78, 0.79, 0.80])
    >>> round(s.mean, 4), s.wins, s.losses, s.p_sign_flip
    (0.02, 3, 0, 0.25)
    >>> paired_stats([0.8], [0.7]).se is None  # one seed: no spread, no test
    True
  """
  v, b = np.asarray(values, np.float64).ravel(), np.asarray(baseline, np.float64).ravel()
  if v.shape != b.shape:
    raise ValueError(f"mtjax: paired_stats: {v.size} values against {b.size} baseline values; pair them by seed")
  d = (v - b)[np.isfinite(v) & np.isfinite(b)]
  return difference_stats(d, lower_is_better=lower_is_better)


def difference_stats(diffs, *, lower_is_better: bool = False) -> PairedStats:
  """:class:`PairedStats` of per-seed differences that are already paired (e.g. per-seed Delta_m%)."""
  d = np.asarray(diffs, np.float64).ravel()
  d = d[np.isfinite(d)]
  n = int(d.size)
  better = -d if lower_is_better else d
  wins, losses = int(np.sum(better > 0)), int(np.sum(better < 0))
  mean = float(d.mean()) if n else None
  std = se = t = p_t = None
  if n >= 2:
    std = float(d.std(ddof=1))
    se = std / math.sqrt(n)
    if se > 0:
      t = mean / se
    else:  # no spread: every seed moved by the same amount
      t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    p_t = t_test_p(t, n - 1)
  return PairedStats(
    n=n,
    mean=mean,
    std=std,
    se=se,
    t=t,
    p_t=p_t,
    p_sign_flip=sign_flip_p(d) if n >= 2 else None,
    wins=wins,
    losses=losses,
    ties=n - wins - losses,
    lower_is_better=lower_is_better,
    values=tuple(float(x) for x in d),
  )


def delta_m_per_seed(per_seed, baseline, lower_is_better: Sequence[bool]) -> np.ndarray:
  """``[S]`` Delta_m% of each seed's run against the baseline's run of the same seed.

  The runner's definition (:func:`mtjax.metrics.delta_m` over the tasks defined for both, as in
  ``compare``'s table), applied seed by seed; NaN for a seed with no task defined in both.
  """
  m, b = np.asarray(per_seed, np.float64), np.asarray(baseline, np.float64)  # [S, T]
  lower = np.asarray(lower_is_better, bool)
  out = np.full(m.shape[0], np.nan)
  for s in range(m.shape[0]):
    ok = np.isfinite(m[s]) & np.isfinite(b[s]) & (b[s] != 0)
    if ok.any():
      out[s] = metrics_lib.delta_m(m[s, ok], b[s, ok], lower_is_better=lower[ok])
  return out


@dataclasses.dataclass(frozen=True)
class MethodStats:
  """Paired statistics of one method against the baseline on one model: ``tasks`` (one
  :class:`PairedStats` of the metric difference per task) and ``delta_m`` (of the per-seed Delta_m%)."""

  tasks: tuple
  delta_m: PairedStats

  def to_dict(self) -> dict:
    return {"tasks": [s.to_dict() for s in self.tasks], "delta_m": self.delta_m.to_dict()}


def grid_statistics(
  per_seed: Mapping[str, Mapping[str, Any]], lower_is_better: Sequence[bool], *, baseline: str
) -> dict:
  """``{model: {method: MethodStats}}`` from ``{model: {method: [S, T] per-seed metrics}}``.

  Every method (the baseline included: all zeros) is paired with the baseline of the same model,
  seed by seed (row ``s`` of each array is the same seed).
  """
  lower = [bool(x) for x in lower_is_better]
  out = {}
  for model, methods in per_seed.items():
    if baseline not in methods:
      raise ValueError(f"mtjax: grid_statistics: model {model!r} has no baseline run {baseline!r}")
    base = np.asarray(methods[baseline], np.float64)
    out[model] = {}
    for label, values in methods.items():
      v = np.asarray(values, np.float64)
      if v.shape != base.shape:
        raise ValueError(f"mtjax: grid_statistics: {model}/{label} has shape {v.shape}, the baseline {base.shape}")
      tasks = tuple(paired_stats(v[:, t], base[:, t], lower_is_better=lower[t]) for t in range(v.shape[1]))
      out[model][label] = MethodStats(tasks=tasks, delta_m=difference_stats(delta_m_per_seed(v, base, lower)))
  return out


# ------------------------------------------------------------------ formatting


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A padded, valid markdown table from cells (converted with ``str``).

  Examples:
    >>> from mtjax.experiment import markdown_table
    >>> print(markdown_table(["method", "Δm%"], [["pcgrad", "+0.81"]]))
    | method | Δm%   |
    |--------|-------|
    | pcgrad | +0.81 |
  """
  rows = [[str(c).replace("|", "\\|") for c in r] for r in rows]
  header = [str(h).replace("|", "\\|") for h in header]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
  fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def _num(x: Optional[float], fmt: str) -> str:
  return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)


def _p(p: Optional[float]) -> str:
  return "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _mean_se(s: PairedStats, fmt: str) -> str:
  if s.mean is None:
    return "n/a"
  return format(s.mean, fmt) + ("" if s.se is None else f" ± {format(s.se, fmt.lstrip('+'))}")


def _finite(obj):
  """``obj`` with every NaN float replaced by ``None`` (strict JSON has no NaN)."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return None if math.isnan(obj) else float(obj)
  return obj


# ------------------------------------------------------------------ the grid


@dataclasses.dataclass
class GridResult:
  """What :func:`compare_grid` ran and computed.

  ``per_seed[model][method]``: ``[S, T]`` test metrics (the primary metric of each task, seeds in
  ``seeds`` order); ``stats[model][method]``: :class:`MethodStats` against ``baseline`` on the same
  model and seeds; ``tables[model]``: ``compare``'s table (means over seeds, Delta_m% of the means);
  ``runs[model][method]``: the :class:`RunResult` of every seed and ``texts[model]`` compare's
  printed table (both ``None`` after :meth:`load`).
  """

  models: list
  methods: list
  seeds: list
  baseline: str
  task_names: list
  metrics: list  # primary metric per task ("auc" / "mse")
  lower_is_better: list
  per_seed: dict
  stats: dict
  tables: dict
  runs: Optional[dict] = None
  out_dir: Optional[str] = None
  texts: Optional[dict] = None

  def table(self, kind: str = "paired", digits: int = 4) -> str:
    """A markdown table: ``"paired"`` (every method against the baseline: mean ± s.e. over seeds of
    the per-seed difference of each task's metric and of Delta_m%, wins / losses / ties across
    seeds, sign-flip and t-test p-values) or ``"metrics"`` (mean ± std of each task's metric and
    compare's Delta_m% of the means)."""
    f = f"+.{digits}f"
    if kind == "metrics":
      header = (
        ["model", "method"]
        + [f"{n} {m.upper()}" for n, m in zip(self.task_names, self.metrics)]
        + [f"Δm% vs {self.baseline}"]
      )
      rows = []
      for model in self.models:
        for method in self.methods:
          v = np.asarray(self.per_seed[model][method], np.float64)
          cells = [model, method]
          for t in range(v.shape[1]):
            col = v[:, t][np.isfinite(v[:, t])]
            cells.append(
              "n/a"
              if not col.size
              else f"{col.mean():.{digits}f}" + (f" ± {col.std():.{digits}f}" if col.size > 1 else "")
            )  # std as in compare's table
          cells.append(_num(self.tables[model][method]["delta_m"], "+.2f"))
          rows.append(cells)
      return markdown_table(header, rows)
    if kind != "paired":
      raise ValueError(f"mtjax: GridResult.table: kind must be 'paired' or 'metrics', got {kind!r}")
    header = (
      ["model", "method"]
      # the raw difference: for a lower-is-better metric (MSE) a positive one is a loss
      + [
        f"Δ {n} {m.upper()} ({'↓' if lo else '↑'} better)"
        for n, m, lo in zip(self.task_names, self.metrics, self.lower_is_better)
      ]
      + ["Δm% (paired)", "W/L/T", "p (sign-flip)", "p (t-test)"]
    )
    rows = []
    for model in self.models:
      for method in self.methods:
        if method == self.baseline:
          continue
        st = self.stats[model][method]
        d = st.delta_m
        rows.append(
          [model, method]
          + [_mean_se(s, f) for s in st.tasks]
          + [_mean_se(d, "+.2f"), f"{d.wins}/{d.losses}/{d.ties}", _p(d.p_sign_flip), _p(d.p_t)]
        )
    return markdown_table(header, rows)

  def conclusion(self, model: str, method: str, *, alpha: float = 0.05) -> str:
    """One sentence from the numbers, e.g. ``"mmoe: pcgrad beats linear on Δm in all 3 seeds
    (mean +0.81% ± 0.20 s.e.; sign-flip p = 0.250, not significant at 0.05)"``."""
    d = self.stats[model][method].delta_m
    head = f"{model}: {method}"
    if d.n == 0:
      return f"{head}: Δm against {self.baseline} is undefined on every seed"
    if d.wins == d.n:
      verb = f"beats {self.baseline} on Δm in {'the one seed' if d.n == 1 else f'all {d.n} seeds'}"
    elif d.losses == d.n:
      verb = f"loses to {self.baseline} on Δm in {'the one seed' if d.n == 1 else f'all {d.n} seeds'}"
    elif d.ties == d.n:
      verb = f"ties with {self.baseline} on Δm in {'the one seed' if d.n == 1 else f'all {d.n} seeds'}"
    else:
      verb = f"beats {self.baseline} on Δm in {d.wins} of {d.n} seeds (loses in {d.losses})"
    spread = f"Δm {d.mean:+.2f}%" if d.n == 1 else f"mean {d.mean:+.2f}% ± {d.se:.2f} s.e."
    if d.n < 2:
      test = "one seed: no test"
    else:
      test = (
        f"sign-flip p = {_p(d.p)}, " + ("significant" if d.significant(alpha) else "not significant") + f" at {alpha:g}"
      )
    return f"{head} {verb} ({spread}; {test})"

  def conclusions(self, *, alpha: float = 0.05) -> str:
    """Every method's :meth:`conclusion` against the baseline, one line each (markdown bullets)."""
    return "\n".join(
      f"- {self.conclusion(model, method, alpha=alpha)}"
      for model in self.models
      for method in self.methods
      if method != self.baseline
    )

  def best(self, model: str) -> str:
    """The method with the highest mean paired Delta_m% on ``model`` (the baseline when none is above 0)."""
    means = {m: self.stats[model][m].delta_m.mean for m in self.methods}
    return max(self.methods, key=lambda m: -math.inf if means[m] is None else means[m])

  def to_dict(self) -> dict:
    """JSON-ready: undefined values (NaN) become ``None``."""
    return _finite(
      {
        "models": self.models,
        "methods": self.methods,
        "seeds": self.seeds,
        "baseline": self.baseline,
        "task_names": self.task_names,
        "metrics": self.metrics,
        "lower_is_better": self.lower_is_better,
        "per_seed": {k: {m: np.asarray(v).tolist() for m, v in d.items()} for k, d in self.per_seed.items()},
        "stats": {k: {m: s.to_dict() for m, s in d.items()} for k, d in self.stats.items()},
        "tables": self.tables,
      }
    )

  @classmethod
  def load(cls, path: str) -> GridResult:
    """A :class:`GridResult` from a ``grid.json`` (or its folder); statistics recomputed, no runs."""
    if os.path.isdir(path):
      path = os.path.join(path, "grid.json")
    with open(path) as f:
      raw = json.load(f)
    per_seed = {k: {m: np.array(v, np.float64) for m, v in d.items()} for k, d in raw["per_seed"].items()}  # None: NaN
    return cls(
      models=raw["models"],
      methods=raw["methods"],
      seeds=raw["seeds"],
      baseline=raw["baseline"],
      task_names=raw["task_names"],
      metrics=raw["metrics"],
      lower_is_better=raw["lower_is_better"],
      per_seed=per_seed,
      stats=grid_statistics(per_seed, raw["lower_is_better"], baseline=raw["baseline"]),
      tables=raw["tables"],
      out_dir=os.path.dirname(os.path.abspath(path)),
    )

  def markdown(self) -> str:
    """The text of ``grid.md``: the paired table, the metrics table and the conclusions."""
    s = len(self.seeds)
    return (
      f"Paired against {self.baseline} on the same model and seeds ({s} seed{'s' if s != 1 else ''}: "
      f"{', '.join(map(str, self.seeds))}); mean ± s.e. over seeds of the per-seed differences:\n\n"
      f"{self.table('paired')}\n\nTest metrics (mean ± std over seeds; Δm% of the means):\n\n"
      f"{self.table('metrics')}\n\n{self.conclusions()}"
    )

  def plot(self, path: Optional[str] = None):
    """Per-seed Delta_m% against the baseline for every model x method (dots: seeds; bar: the mean;
    line: ± 1 s.e. when there are two seeds or more). Returns the figure (saved if ``path``)."""
    import matplotlib.pyplot as plt  # no backend switch: headless runs get Agg, notebooks keep inline

    methods = [m for m in self.methods if m != self.baseline]
    k = len(self.models)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(methods) * max(k, 1) ** 0.5 + 2), 3.4))
    for i, model in enumerate(self.models):
      color = f"C{i % 10}"
      for j, method in enumerate(methods):
        d = self.stats[model][method].delta_m
        x = j - 0.4 + width * (i + 0.5)
        if d.mean is None:
          continue
        ax.bar(x, d.mean, width * 0.9, color=color, alpha=0.35, label=model if j == 0 else None)
        if d.se is not None:
          ax.errorbar(x, d.mean, yerr=d.se, color=color, capsize=3, lw=1.2)
        jitter = np.linspace(-0.25, 0.25, len(d.values)) * width if len(d.values) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter), d.values, color=color, s=14, zorder=3)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 3 else 0)
    ax.set_ylabel(f"Δm% vs {self.baseline} (per seed)")
    ax.set_title(f"{len(self.seeds)} seed{'s' if len(self.seeds) != 1 else ''}, paired by seed", fontsize=9)
    fig.tight_layout()
    if k > 1:  # outside the bars and seed dots
      from mtjax._src import plotting  # pylint: disable=import-outside-toplevel

      plotting.legend_outside(fig, [ax], title="model")
    if path:
      fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig

  def save(self, out_dir: str, *, plots: bool = True) -> None:
    """Writes ``grid.md``, ``grid.json`` and (``plots``) ``grid_delta_m.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "grid.md"), "w") as f:
      f.write(self.markdown() + "\n")
    with open(os.path.join(out_dir, "grid.json"), "w") as f:
      json.dump(self.to_dict(), f, indent=1, default=float)
    if plots:
      import matplotlib.pyplot as plt

      plt.close(self.plot(os.path.join(out_dir, "grid_delta_m.png")))


ModelSpec = Union[str, Mapping[str, Any]]


def _folder(label: str) -> str:
  """A file-system-safe folder name for a label (``mmoe:expert=[8]`` -> ``mmoe_expert=_8_``)."""
  return re.sub(r"[^\w.=+-]", "_", label) or "model"


def model_table(base: Mapping[str, Any], spec: ModelSpec) -> tuple:
  """``(label, model table)`` of a model spec.

  A spec is a name (``"omoe"``), a ``name:key=value`` string (read like
  :func:`~mtjax.experiment.parse_method`), or a dict of ``[model]`` keys with an optional
  ``"label"``. Keys are laid over the base config's ``[model]`` table when the spec names the same
  model (or no model); a spec naming another model replaces the table.
  """
  if isinstance(spec, str):
    spec = _config.parse_method(spec)
  spec = dict(spec)
  label = spec.pop("label", None)
  name = spec.get("name", base["name"])
  table = {**base, **spec} if name == base["name"] else spec
  if label is None:
    extra = {k: v for k, v in spec.items() if k != "name"}
    label = name + (":" + ":".join(f"{k}={v}" for k, v in extra.items()) if extra else "")
  return str(label), table


def compare_grid(
  cfg,
  models: Sequence[ModelSpec],
  methods: Sequence[Union[str, Mapping[str, Any]]],
  *,
  seeds: Optional[Sequence[int]] = None,
  baseline: str = "linear",
  out_dir: Optional[str] = None,
  progress: bool = False,
  plots: bool = True,
  echo=print,
) -> GridResult:
  """Trains every (model, method, seed) and compares every method with ``baseline`` seed by seed.

  Args:
    cfg: the base :class:`ExperimentConfig` (or a raw dict for :func:`from_dict`): data, optimizer,
      training; its ``[model]`` table is the default of the model specs and its ``seeds`` the default
      of ``seeds``.
    models: model specs: ``"mmoe"``, ``"mmoe:num_experts=8"`` or ``{"name": ..., ..., "label": ...}``
      (see :func:`model_table`).
    methods: what ``compare`` takes: ``"pcgrad"``, ``"sdmgrad:num_batches=1"``
      (:func:`parse_method`) or method tables with an optional ``"label"``. ``baseline`` is added
      first when missing.
    seeds: the seeds every (model, method) runs with.
    baseline: the label of the method every other is paired with.
    out_dir: writes ``grid.md``, ``grid.json``, ``grid_delta_m.png`` there and each model's
      ``compare`` outputs in ``out_dir/<model label>/`` (with one model: in ``out_dir`` itself).
    progress, echo: passed to ``compare`` (``echo`` prints one line per run and each model's table).

  Returns:
    A :class:`GridResult`; ``.table()`` is the paired markdown table, ``.conclusions()`` the
    sentences it supports.

  Each model runs through :func:`mtjax.experiment.compare` (one data split for all, the same
  initialisation for every method of a seed); Delta_m% per seed is :func:`mtjax.metrics.delta_m`
  of the seed's run against the baseline's run of the same seed.
  """
  from mtjax.experiment import _runner  # jax-heavy: imported on first use

  if not isinstance(cfg, _config.ExperimentConfig):
    cfg = _config.from_dict(cfg)
  seeds = list(cfg.seeds if seeds is None else seeds)
  if not seeds:
    raise _config.ConfigError("compare_grid: no seeds")
  specs = [_config.parse_method(m) if isinstance(m, str) else dict(m) for m in methods]
  labels = [m.get("label", m["name"]) for m in specs]
  if baseline not in labels:
    specs.insert(0, _config.parse_method(baseline))
    labels.insert(0, baseline)
  if len(set(labels)) != len(labels):
    raise _config.ConfigError(f"compare_grid: method labels repeat: {labels}")
  if not models:
    raise _config.ConfigError("compare_grid: no models")
  raw = cfg.to_dict()
  tables, runs, per_seed, texts, built = {}, {}, {}, {}, []
  for spec in models:
    label, table = model_table(raw["model"], spec)
    if label in [m for m, _ in built]:
      raise _config.ConfigError(f"compare_grid: model label {label!r} repeats; give the specs a 'label'")
    mcfg = _config.from_dict({**raw, "model": table, "name": f"{cfg.name}-{label}"})  # validates the model table
    built.append((label, mcfg))
  names = prim = None
  for label, mcfg in built:
    echo(f"model {label}:")
    sub = None if not out_dir else out_dir if len(built) == 1 else os.path.join(out_dir, _folder(label))
    out = _runner.compare(mcfg, specs, seeds=seeds, out_dir=sub, progress=progress, baseline=baseline, echo=echo)
    if names is None:
      names, prim = list(out["task_names"]), list(out["primary"])
    tables[label], runs[label], texts[label] = out["table"], out["results"], out["text"]
    per_seed[label] = {m: np.asarray(out["table"][m]["per_seed"], np.float64) for m in labels}
  lower = [bool(p[1]) for p in prim]
  result = GridResult(
    models=[m for m, _ in built],
    methods=labels,
    seeds=seeds,
    baseline=baseline,
    task_names=names,
    metrics=[p[0] for p in prim],
    lower_is_better=lower,
    per_seed=per_seed,
    stats=grid_statistics(per_seed, lower, baseline=baseline),
    tables=tables,
    runs=runs,
    out_dir=out_dir,
    texts=texts,
  )
  if out_dir:
    result.save(out_dir, plots=plots)
  echo(result.markdown())
  return result
