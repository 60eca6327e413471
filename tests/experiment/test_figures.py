"""What a reader of the tables and figures relies on: valid markdown, no `nan` cells, one colour per
method in every figure, validation curves, outliers that do not squash the other bars, grids."""

import importlib
import math
import os
import re
import sys

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from mtjax import cli  # noqa: E402
from mtjax._src import plotting  # noqa: E402
from mtjax.experiment import _runner  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["click", "like", "watch_time"]
PRIM = [("auc", False), ("auc", False), ("mse", True)]


def _research(name):
  path = os.path.join(REPO, "research")
  if path not in sys.path:
    sys.path.insert(0, path)
  return importlib.import_module(name)


def _cells(line):
  assert line.startswith("|") and line.endswith("|"), line
  return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


def _check_markdown(text):
  """A GFM table: header, separator, rows -- all with one number of cells; returns the rows' cells."""
  lines = [ln for ln in text.splitlines() if ln.startswith("|")]
  assert len(lines) >= 3
  head, sep, rows = _cells(lines[0]), _cells(lines[1]), [_cells(ln) for ln in lines[2:]]
  assert all(re.fullmatch(r":?-{3,}:?", c) for c in sep), lines[1]
  assert {len(head), len(sep)} | {len(r) for r in rows} == {len(head)}
  # the table is a block of its own: no text line right before or after it
  all_lines = text.splitlines()
  first, last = all_lines.index(lines[0]), all_lines.index(lines[-1])
  assert first == 0 or not all_lines[first - 1].strip()
  assert last == len(all_lines) - 1 or not all_lines[last + 1].strip()
  return head, rows


def test_run_table_is_markdown_without_nan():
  test = {
    "click": {"auc": 0.81, "logloss": 0.45},
    "like": {"auc": float("nan"), "logloss": 0.5},
    "watch_time": {"mse": 28.1},
    "macro": {"auc": 0.81, "logloss": 0.47, "mse": 28.1},
  }
  text = cli._metrics_table(test)
  head, rows = _check_markdown(text)
  assert head == ["task", "AUC", "logloss", "MSE"]
  cells = [c for r in rows for c in r]
  assert not any(c.lower() == "nan" or c == "" for c in cells)
  watch = next(r for r in rows if r[0] == "watch_time")
  assert watch == ["watch_time", "—", "—", "28.1000"]  # the regression task: its MSE, AUC/logloss do not apply
  assert next(r for r in rows if r[0] == "like")[1] == "n/a"  # undefined, and said so below the table
  assert "—:" in text and "n/a:" in text


def test_compare_table_is_markdown_without_nan():
  run = lambda a, b, m: _runner.RunResult(
    config={},
    seed=0,
    method="",
    ms_per_step=1.0,
    history=[],
    valid=None,
    out_dir=None,
    test={"click": {"auc": a}, "like": {"auc": b}, "watch_time": {"mse": m}},
  )
  table = _runner.summarize(
    {"linear": [run(0.8, float("nan"), 20.0)], "mgda": [run(0.9, float("nan"), 30.0)]}, NAMES, PRIM, baseline="linear"
  )
  text = _runner.format_table(table, NAMES, PRIM, seeds=1, baseline="linear")
  head, rows = _check_markdown(text)
  assert not any(c.lower() == "nan" for r in rows for c in r)
  assert rows[1][head.index("watch_time MSE")] == "30.0000"
  assert "n/a:" in text


def _fake_results(methods=("linear", "pcgrad", "mgda"), seeds=2, steps=40, evals=True):
  rng = np.random.default_rng(0)
  out = {}
  for m_i, label in enumerate(methods):
    for s in range(seeds):
      hist = [
        {
          "step": k,
          "losses": list(rng.uniform(0.2, 1.0, 3)),
          "weights": list(rng.uniform(0, 1, 3)),
          "conflict": float(rng.uniform()),
        }
        for k in range(1, steps + 1)
      ]
      ev = (
        [
          {
            "step": k,
            "eval": {"click": {"auc": 0.7 + 0.01 * m_i}, "like": {"auc": 0.6}, "watch_time": {"mse": 20.0 - k / 10}},
          }
          for k in (10, 20, 30, 40)
        ]
        if evals
        else []
      )
      test = {
        "click": {"auc": 0.7 + 0.01 * m_i + 0.01 * s},
        "like": {"auc": 0.6 + 0.02 * s},
        "watch_time": {"mse": 20.0 + m_i},
      }
      out.setdefault(label, []).append(
        _runner.RunResult(
          config={},
          seed=s,
          method=label,
          test=test,
          valid=None,
          ms_per_step=1.0 + m_i,
          history=hist,
          out_dir=None,
          evals=ev,
        )
      )
  return out


def _legend_colours(fig):
  leg = fig.legends[0]
  return {t.get_text(): mcolors.to_hex(h.get_color()) for t, h in zip(leg.get_texts(), leg.legend_handles)}


@pytest.mark.slow
def test_learning_curves_have_validation_lines_and_one_legend_outside():
  res = _fake_results()
  fig = _runner.plot_learning_curves(res, NAMES, None)
  visible = [ax for ax in fig.axes if ax.get_visible()]
  assert len(visible) == 2 * len(NAMES)  # training loss and validation metric per task
  val_axes = [ax for ax in visible if ax.get_ylabel().startswith("validation")]
  assert len(val_axes) == len(NAMES)
  assert "AUC" in val_axes[0].get_ylabel() and "MSE" in val_axes[2].get_ylabel()
  assert all(len(ax.get_lines()) == len(res) for ax in val_axes)
  assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1  # one figure legend
  assert len(val_axes[0].collections) == len(res)  # a min-max band over the 2 seeds per method
  plt.close(fig)


@pytest.mark.slow
def test_a_method_has_one_colour_in_every_figure():
  res = _fake_results()
  mc = _research("method_comparison")
  table = _runner.summarize(res, NAMES, PRIM, baseline="linear")
  curves = _runner.plot_learning_curves(res, NAMES, None)
  from_curves = _legend_colours(curves)
  conflict = mc.plot_conflict({"results": res, "table": table, "task_names": NAMES})
  from_conflict = _legend_colours(conflict)
  summary = mc.plot_summary({"results": res, "table": table, "task_names": NAMES})
  bars = summary.axes[0].patches
  from_bars = {lab: mcolors.to_hex(b.get_facecolor()) for lab, b in zip(list(res), bars)}
  assert from_curves == from_conflict == from_bars
  assert len(set(from_curves.values())) == len(res)
  for fig in (curves, conflict, summary):
    plt.close(fig)


def test_method_colors_stable_and_distinct():
  a = plotting.method_colors(["pcgrad", "linear"])
  b = plotting.method_colors(["linear", "mgda", "pcgrad", "pcgrad-every4", "my_method"])
  assert a["pcgrad"] == b["pcgrad"] and a["linear"] == b["linear"]
  assert len(set(b.values())) == len(b)


def test_outlier_bar_does_not_squash_the_others():
  fig, ax = plt.subplots()
  values = [0.0, 1.2, -0.8, -85.0, 0.5]
  labels = ["linear", "pcgrad", "gradvac", "mgda", "dwa"]
  plotting.annotated_bars(ax, labels, values, colors=plotting.method_colors(labels))
  lo, hi = ax.get_ylim()
  assert hi - lo < 10  # the axis follows the others, not the -85
  texts = [t.get_text() for t in ax.texts]
  assert any("-85.00" in t and "cut" in t for t in texts) and "+1.20" in texts  # every value written
  plt.close(fig)


@pytest.mark.slow
def test_weights_figure_is_a_grid():
  res = _fake_results(
    methods=("linear", "pcgrad", "gradvac", "mgda", "pareto_ltr", "gradnorm", "dwa", "uncertainty"),
    seeds=1,
    evals=False,
  )
  fig = _research("method_comparison").plot_weights({"results": res, "task_names": NAMES})
  w, h = fig.get_size_inches()
  assert w / h < 3  # 2 rows of 4, not one strip of 8
  assert sum(ax.get_visible() for ax in fig.axes) == 8
  plt.close(fig)


def test_heatmap_range_is_fixed_and_values_written():
  from mtjax import analysis

  cos = np.array([[[1.0, -0.2], [-0.2, 1.0]], [[1.0, 0.1], [0.1, 1.0]]])
  fig = analysis.plot_similarity_heatmaps(cos, ["layer/a", "layer/b"], ["a_very_long_task_name", "b"])
  im = fig.axes[0].images[0]
  assert im.get_clim() == (-1, 1)
  assert "-0.20" in [t.get_text() for t in fig.axes[0].texts]
  assert all(len(t.get_text()) <= 12 for t in fig.axes[0].get_xticklabels())
  assert not math.isnan(cos.sum())
  plt.close(fig)


def test_robust_limit_cuts_only_an_outlier_among_several_bars():
  from mtjax._src.plotting import robust_limit

  assert robust_limit([0.0, 3.29, 21.81]) is None  # two bars: show the true heights
  assert robust_limit([0.0, 1.0, 1.2, 0.8, 30.0]) == pytest.approx(1.5 * 1.2)  # one outlier squashing three
  assert robust_limit([0.0, 1.0, 1.2, 0.8, 2.0]) is None  # no outlier
  assert robust_limit([np.nan, 1.0, -1.2, 0.8, -30.0]) == pytest.approx(1.8)  # |value|, NaN ignored
