"""`mtjax.experiment.compare_grid`: paired per-seed statistics against plain-Python references, the
table and conclusions they produce (1 seed: n/a, never NaN), and one tiny model x method x seed grid."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from mtjax import experiment
from mtjax.experiment import _grid


def _t_p_reference(t, df, n=20000):
  """Two-sided p of Student's t by Simpson integration of the density over [0, |t|] (plain Python)."""
  c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
  f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
  a, h = abs(t), abs(t) / n
  s = f(0) + f(a) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
  return 1.0 - 2.0 * s * h / 3.0


def _flip_reference(d):
  """Sign-flip p by enumerating every sign vector with itertools (plain Python)."""
  obs = abs(sum(d) / len(d))
  hits = sum(
    abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= obs - 1e-12
    for signs in itertools.product((1, -1), repeat=len(d))
  )
  return hits / 2 ** len(d)


def test_paired_stats_match_plain_python():
  method = [0.861, 0.874, 0.853, 0.869, 0.858]
  base = [0.850, 0.866, 0.855, 0.860, 0.851]
  d = [m - b for m, b in zip(method, base)]
  n = len(d)
  mean = sum(d) / n
  std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
  s = experiment.paired_stats(method, base)
  assert s.n == n and s.mean == pytest.approx(mean) and s.std == pytest.approx(std)
  assert s.se == pytest.approx(std / math.sqrt(n)) and s.t == pytest.approx(mean / (std / math.sqrt(n)))
  assert s.p_t == pytest.approx(_t_p_reference(s.t, n - 1), abs=1e-6)
  assert s.p_sign_flip == pytest.approx(_flip_reference(d)) and s.p == s.p_sign_flip
  assert (s.wins, s.losses, s.ties) == (4, 1, 0)
  # a lower-is-better metric: a negative difference is the win, the test is the same
  low = experiment.paired_stats(method, base, lower_is_better=True)
  assert (low.wins, low.losses) == (1, 4) and low.p_sign_flip == s.p_sign_flip and low.mean == s.mean
  # a seed where either run is undefined (NaN AUC) is left out of the pairing
  nan = experiment.paired_stats(method + [float("nan")], base + [0.9])
  assert nan.n == n and nan.mean == pytest.approx(mean)


@pytest.mark.parametrize("t,df", [(2.776445, 4), (12.7062, 1), (1.0, 30), (0.3, 2), (-4.0, 7), (25.0, 3)])
def test_t_test_p_values(t, df):
  assert _grid.t_test_p(t, df) == pytest.approx(_t_p_reference(t, df), abs=1e-6)
  assert _grid.t_test_p(0.0, df) == pytest.approx(1.0) and _grid.t_test_p(math.inf, df) == 0.0


def test_sign_flip_exact_and_sampled():
  rng = np.random.default_rng(0)
  for n in (1, 2, 3, 6, 9):
    d = rng.normal(0.3, 1.0, n).tolist()
    assert _grid.sign_flip_p(d) == pytest.approx(_flip_reference(d))
  assert _grid.sign_flip_p([1.0, 2.0]) == 0.5  # two seeds can never reach p < 0.5
  assert _grid.sign_flip_p([]) is None
  big = rng.normal(1.0, 1.0, 24)  # above EXACT_MAX_SEEDS: sampled, reproducible, near the normal tail
  p = _grid.sign_flip_p(big)
  assert p == _grid.sign_flip_p(big) and 0 < p < 0.01


def test_one_seed_and_no_spread_are_said_not_nan():
  one = experiment.paired_stats([0.8], [0.7])
  assert one.n == 1 and one.mean == pytest.approx(0.1)
  assert one.std is None and one.se is None and one.t is None and one.p_t is None
  assert one.p_sign_flip is None and not one.significant()
  same = _grid.difference_stats([0.5, 0.5, 0.5])
  assert same.se == 0.0 and same.t == math.inf and same.p_t == 0.0 and same.p_sign_flip == 0.25
  zero = _grid.difference_stats([0.0, 0.0])
  assert zero.t == 0.0 and zero.p_t == 1.0 and zero.ties == 2


def _hand_grid(seeds):
  """Per-seed metrics of 2 models x 3 methods on (AUC, AUC, MSE), seeds in rows."""
  rng = np.random.default_rng(1)
  per_seed = {}
  for k, model in enumerate(("mmoe", "sb")):
    base = np.column_stack(
      [0.85 + 0.01 * rng.normal(size=seeds), 0.84 + 0.01 * rng.normal(size=seeds), 28 + rng.normal(size=seeds)]
    )
    per_seed[model] = {
      "linear": base,
      "pcgrad": base + [0.02, 0.01, -0.5 * k],
      "mgda": base * [1.01, 1.0, 1.2] + 0.001 * rng.normal(size=(seeds, 3)),
    }
  return per_seed


def test_grid_statistics_against_numpy():
  per_seed = _hand_grid(4)
  lower = [False, False, True]
  stats = experiment.grid_statistics(per_seed, lower, baseline="linear")
  for model, methods in per_seed.items():
    base = methods["linear"]
    for label, v in methods.items():
      st = stats[model][label]
      for t in range(3):
        assert st.tasks[t].mean == pytest.approx(np.mean(v[:, t] - base[:, t]))
      # per-seed Delta_m%: each seed against the same seed's baseline, AUC up / MSE down is better
      sign = np.array([1.0, 1.0, -1.0])
      ref = [100.0 * np.mean(sign * (v[s] - base[s]) / base[s]) for s in range(4)]
      np.testing.assert_allclose(st.delta_m.values, ref, rtol=1e-12, atol=1e-12)
      assert st.delta_m.mean == pytest.approx(np.mean(ref))
      if label != "linear":
        assert st.delta_m.se == pytest.approx(np.std(ref, ddof=1) / 2)
        assert st.delta_m.wins == sum(r > 0 for r in ref) and st.delta_m.p == pytest.approx(_flip_reference(ref))
  assert stats["mmoe"]["linear"].delta_m.ties == 4
  # the MSE of mgda is 20% worse in every seed: a loss on that task in every seed
  assert stats["mmoe"]["mgda"].tasks[2].losses == 4
  with pytest.raises(ValueError, match="no baseline run"):
    experiment.grid_statistics(per_seed, lower, baseline="famo")


def _result(seeds):
  per_seed = _hand_grid(seeds)
  lower = [False, False, True]
  names = ["task_0", "task_1", "task_2"]
  tables = {m: {k: {"delta_m": 0.0} for k in per_seed[m]} for m in per_seed}
  return _grid.GridResult(
    models=list(per_seed),
    methods=["linear", "pcgrad", "mgda"],
    seeds=list(range(seeds)),
    baseline="linear",
    task_names=names,
    metrics=["auc", "auc", "mse"],
    lower_is_better=lower,
    per_seed=per_seed,
    stats=experiment.grid_statistics(per_seed, lower, baseline="linear"),
    tables=tables,
  )


def _is_markdown_table(text):
  lines = text.splitlines()
  cols = lines[0].count("|")
  return (
    len(lines) >= 3
    and all(l.startswith("|") and l.endswith("|") and l.count("|") == cols for l in lines)
    and re.fullmatch(r"\|(-+\|)+", lines[1]) is not None
  )


def test_table_and_conclusions_follow_the_numbers(tmp_path):
  res = _result(3)
  text = res.table()
  assert _is_markdown_table(text) and _is_markdown_table(res.table("metrics"))
  assert "| mmoe  | pcgrad |" in text and "| linear" not in text  # the baseline is not paired with itself
  assert "nan" not in text.lower() and "n/a" not in text
  st = res.stats["mmoe"]["pcgrad"].delta_m
  line = res.conclusion("mmoe", "pcgrad")
  assert "in all 3 seeds" in line and f"{st.mean:+.2f}%" in line and "p = 0.250" in line and "not significant" in line
  mgda = res.stats["sb"]["mgda"].delta_m  # the MSE rises 20%: loses in every seed
  assert mgda.losses == 3 and "sb: mgda loses to linear on Δm in all 3 seeds" in res.conclusions()
  assert res.best("mmoe") == "pcgrad"
  res.save(str(tmp_path))
  saved = json.loads((tmp_path / "grid.json").read_text())
  assert saved["stats"]["mmoe"]["pcgrad"]["delta_m"]["p_sign_flip"] == pytest.approx(0.25)
  back = _grid.GridResult.load(str(tmp_path))
  assert back.table() == text and back.conclusions() == res.conclusions()
  assert (tmp_path / "grid.md").read_text().startswith("Paired against linear")
  assert (tmp_path / "grid_delta_m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_table_says_not_available():
  res = _result(1)
  text = res.table()
  assert _is_markdown_table(text) and "nan" not in text.lower()
  row = next(l for l in text.splitlines() if l.startswith("| mmoe  | pcgrad"))
  assert row.count("n/a") == 2 and "±" not in row  # both tests need two seeds; no s.e. is shown
  assert "one seed: no test" in res.conclusion("mmoe", "pcgrad")
  assert json.dumps(res.to_dict()).count("NaN") == 0


def test_a_method_equal_to_the_baseline_ties():
  per_seed = {"mmoe": {"linear": np.full((2, 1), 0.8), "dwa": np.full((2, 1), 0.8)}}
  res = _grid.GridResult(
    models=["mmoe"],
    methods=["linear", "dwa"],
    seeds=[0, 1],
    baseline="linear",
    task_names=["ctr"],
    metrics=["auc"],
    lower_is_better=[False],
    per_seed=per_seed,
    stats=experiment.grid_statistics(per_seed, [False], baseline="linear"),
    tables={"mmoe": {"linear": {"delta_m": 0.0}, "dwa": {"delta_m": 0.0}}},
  )
  assert res.conclusion("mmoe", "dwa").startswith("mmoe: dwa ties with linear on Δm in all 2 seeds")
  assert "| 0/0/2 | 1.000         | 1.000      |" in res.table()


def test_undefined_metric_is_left_out_and_saved_as_null(tmp_path):
  res = _result(3)
  res.per_seed["sb"]["mgda"][1, 0] = np.nan  # an AUC undefined on seed 1 (one-class test split)
  res.stats = experiment.grid_statistics(res.per_seed, res.lower_is_better, baseline="linear")
  st = res.stats["sb"]["mgda"]
  assert st.tasks[0].n == 2 and st.tasks[1].n == 3 and st.delta_m.n == 3  # Δm of seed 1 over the other tasks
  res.tables["sb"]["mgda"]["delta_m"] = float("nan")
  res.save(str(tmp_path), plots=False)
  raw = (tmp_path / "grid.json").read_text()
  assert "NaN" not in raw and json.loads(raw)["per_seed"]["sb"]["mgda"][1][0] is None
  back = _grid.GridResult.load(str(tmp_path))
  assert back.table() == res.table() and back.table("metrics") == res.table("metrics")
  assert "nan" not in res.table("metrics").lower() and "n/a" in res.table("metrics")


def test_model_specs():
  base = {"name": "mmoe", "num_experts": 4, "expert": [64, 32], "tower": [16, 1]}
  assert _grid.model_table(base, "mmoe") == ("mmoe", base)
  assert _grid.model_table(base, "mmoe:num_experts=8") == ("mmoe:num_experts=8", {**base, "num_experts": 8})
  assert _grid.model_table(base, {"num_experts": 2}) == ("mmoe:num_experts=2", {**base, "num_experts": 2})
  assert _grid.model_table(base, {"name": "shared_bottom", "bottom": [8], "label": "sb"}) == (
    "sb",
    {"name": "shared_bottom", "bottom": [8]},
  )
  assert _grid.model_table(base, "shared_bottom") == ("shared_bottom", {"name": "shared_bottom"})
  assert _grid._folder("mmoe:expert=[8, 4]") == "mmoe_expert=_8__4_"


RAW = {
  "name": "grid",
  "data": {
    "name": "conflicting",
    "num_samples": 400,
    "num_tasks": 2,
    "seed": 0,
    "vocab_sizes": [],
    "task_types": ["binary", "regression"],
  },  # dense features only: ~1/3 less to compile per run
  "model": {"name": "mmoe", "num_experts": 2, "expert": [4], "tower": [2, 1]},
  "method": {"name": "linear"},
  "optimizer": {"name": "adam", "learning_rate": 0.01},
  "train": {"steps": 2, "batch_size": 64, "log_every": 1, "track_similarity": False},
}


def test_config_errors_before_training():
  with pytest.raises(experiment.ConfigError, match="unknown model"):
    experiment.compare_grid(RAW, ["mmoe", "no_such_model"], ["pcgrad"], seeds=[0], echo=lambda *a: None)
  with pytest.raises(experiment.ConfigError, match="model label 'mmoe' repeats"):
    experiment.compare_grid(RAW, ["mmoe", {"name": "mmoe"}], ["pcgrad"], seeds=[0], echo=lambda *a: None)
  with pytest.raises(experiment.ConfigError, match="no models"):
    experiment.compare_grid(RAW, [], ["pcgrad"], seeds=[0], echo=lambda *a: None)


@pytest.mark.slow
def test_compare_grid_end_to_end(tmp_path):
  """2 models x 2 methods x 2 seeds through compare; the statistics are recomputed from the runs."""
  lines = []
  res = experiment.compare_grid(
    RAW,
    ["mmoe", {"name": "shared_bottom", "bottom": [4], "tower": [2, 1], "label": "sb"}],
    ["pcgrad"],
    seeds=[0, 1],
    out_dir=str(tmp_path),
    echo=lines.append,
  )
  assert res.models == ["mmoe", "sb"] and res.methods == ["linear", "pcgrad"] and res.seeds == [0, 1]
  assert res.task_names == ["task_0", "task_1"] and res.lower_is_better == [False, True]
  for model in res.models:
    for method in res.methods:
      runs = res.runs[model][method]
      assert [r.seed for r in runs] == [0, 1]
      ref = np.array([[r.test[n][m] for n, m in zip(res.task_names, res.metrics)] for r in runs])
      np.testing.assert_array_equal(res.per_seed[model][method], ref)
    base, v = res.per_seed[model]["linear"], res.per_seed[model]["pcgrad"]
    dm = [_grid.metrics_lib.delta_m(v[s], base[s], lower_is_better=[False, True]) for s in range(2)]
    assert res.stats[model]["pcgrad"].delta_m.mean == pytest.approx(np.mean(dm))
    assert (tmp_path / model / "table.md").exists()
  text = res.table()
  assert _is_markdown_table(text) and len(text.splitlines()) == 2 + 2 and "nan" not in text.lower()
  assert (tmp_path / "grid.md").read_text().strip() == res.markdown() and res.markdown() in lines
  assert json.loads((tmp_path / "grid.json").read_text())["models"] == ["mmoe", "sb"]
  assert (tmp_path / "grid_delta_m.png").stat().st_size > 2000
