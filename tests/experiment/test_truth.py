"""Experiments that tell the truth (issue #10): the shared/task-specific partition reaches every
method and the logged similarity, splits are stratified and never empty, undefined metrics are
said and left out, configs are type-checked up front, seeds and relative data paths are honoured."""

import json
import os
import shutil
import textwrap

import numpy as np
import optax
import pytest

import mtjax
from mtjax import cli
from mtjax import data
from mtjax import experiment
from mtjax import models
from mtjax import training
from mtjax.experiment import _registry as reg
from mtjax.experiment import _runner

FIX = os.path.join(os.path.dirname(__file__), os.pardir, "data", "fixtures")

RAW = {
  "name": "truth",
  "data": {"name": "conflicting", "num_samples": 900, "seed": 0, "task_types": ["binary", "binary", "regression"]},
  "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
  "method": {"name": "gradnorm"},
  "optimizer": {"name": "adam", "learning_rate": 0.01},
  "train": {"steps": 12, "batch_size": 64, "log_every": 4},
}


def _cfg(**tables):
  raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RAW.items()}
  for k, v in tables.items():
    raw[k] = {**raw.get(k, {}), **v}
  return experiment.from_dict(raw)


def test_run_passes_the_model_partition_and_states_it(tmp_path):
  """GradNorm's default layer is the last *shared* layer: with the partition every task keeps
  training (before, it picked task 2's output layer and drove its weight to ~0)."""
  res = experiment.run(_cfg(), out_dir=str(tmp_path / "run"), progress=False, plots=False)
  split = json.load(open(tmp_path / "run" / "results.json"))["partition"]
  assert split == res.partition
  assert split["task_specific_layers"] and all(l.startswith(("tower_", "gate_")) for l in split["task_specific_layers"])
  assert any(l.startswith("experts/") for l in split["shared_layers"])
  assert split["shared_params"] > 0 and split["task_specific_params"] > 0
  weights = np.array([r["weights"] for r in res.history])
  assert np.all(weights[-1] > 0.5), weights[-1]  # no task is switched off


def test_shared_all_makes_gradnorm_a_clear_error_naming_the_layer():
  with pytest.raises(
    ValueError,
    match=r"gradnorm: the layer tower_2/Dense_1 receives a gradient from only one "
    r"task.*\[at training step 1\]",
  ):
    experiment.run(_cfg(method={"shared": "all"}), progress=False, plots=False)


def test_config_shared_patterns_override_the_declaration(tmp_path):
  res = experiment.run(_cfg(method={"name": "pcgrad", "shared": {"exclude": ["tower_"]}}), progress=False, plots=False)
  assert any(l.startswith("gate_") for l in res.partition["shared_layers"])
  assert all(l.startswith("tower_") for l in res.partition["task_specific_layers"])
  with pytest.raises(experiment.ConfigError, match="method.shared must be"):
    _cfg(method={"shared": "towers"})


def test_compare_table_states_the_partition(tmp_path):
  out = experiment.compare(
    _cfg(method={"name": "linear"}),
    [{"name": "linear"}, {"name": "pcgrad"}],
    seeds=[0],
    out_dir=str(tmp_path / "cmp"),
    progress=False,
    echo=lambda *_: None,
  )
  assert "Task gradients compared on the" in out["text"]
  assert "task-specific: gate_*/logits, tower_*/Dense_*" in out["text"]
  saved = json.load(open(tmp_path / "cmp" / "results.json"))
  assert saved["partition"]["task_specific_params"] > 0
  assert (tmp_path / "cmp" / "table.md").read_text().strip().endswith("tower_*/Dense_*.")


def test_fit_logs_layer_similarity_over_shared_parameters_only(tmp_path):
  ds = data.conflicting_tasks(num_samples=400, seed=0)
  model = models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
  tx = optax.chain(mtjax.pcgrad(num_tasks=3, shared=models.partition(model)), optax.adam(1e-2))
  res = training.fit(
    model,
    tx,
    ds,
    steps=4,
    batch_size=64,
    log_every=2,
    out_dir=str(tmp_path),
    progress=False,
    similarity_granularity="layer",
  )
  rec = res.history[-1]
  assert rec["layers"] and not any(n.startswith(("tower_", "gate_")) for n in rec["layers"])
  assert np.asarray(rec["cosine_layers"]).shape == (len(rec["layers"]), 3, 3)
  assert len(rec["conflict_layers"]) == len(rec["layers"])
  logged = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
  assert "cosine_layers" in logged[0]
  # The mask matters: cosines over every parameter (towers included) differ from the shared ones.
  loss_fn = mtjax.losses.make_loss_fn(model, ("bce", "bce", "mse"), has_aux=False)
  batch = ds.batch(np.arange(64))
  _, grads = mtjax.task_grads(loss_fn)(res.state.params, batch)
  everything = mtjax.analysis.cosine_similarity(grads)[0]
  shared = mtjax.analysis.cosine_similarity(grads, shared=models.partition(model))[0]
  assert not np.allclose(everything, shared, atol=1e-3)  # the towers change the answer: the mask matters
  with pytest.raises(ValueError, match="similarity_granularity"):
    training.fit(model, tx, ds, steps=1, batch_size=64, progress=False, similarity_granularity="leaves")


def test_splits_are_stratified_and_keep_rare_positives():
  """The one-piece split is seeded and stratified: every split gets its share of a rare task's positives."""
  ds = data.funnel_synthetic(num_samples=3000, seed=0)
  cfg = experiment.from_dict(
    {
      **RAW,
      "data": {"name": "funnel", "num_samples": 3000, "seed": 0},
      "model": {"name": "esmm", "tower": [8, 1]},
      "method": {"name": "linear"},
    }
  )
  train, valid, test = _runner.load_data(cfg)
  assert (len(train), len(valid), len(test)) == (2100, 450, 450)
  for t in range(ds.num_tasks):
    rate = ds.labels[t].mean()
    for part in (train, valid, test):
      assert abs(part.labels[t].mean() - rate) <= 2 / len(part) + 1e-12, (t, part.labels[t].mean(), rate)


def test_train_test_loader_takes_validation_from_train_not_half_of_test(monkeypatch):
  full = data.conflicting_tasks(num_samples=1000, seed=0)
  train_part, test_part = full.subset(np.arange(800)), full.subset(np.arange(800, 1000))
  monkeypatch.setitem(reg.DATASETS, "conflicting", lambda **_: {"train": train_part, "test": test_part})
  train, valid, test = _runner.load_data(_cfg())
  assert len(test) == 200 and np.array_equal(test.labels, test_part.labels)  # the official test split, whole
  assert (len(train), len(valid)) == (720, 80)


def test_empty_split_is_a_config_error_before_training(monkeypatch):
  full = data.conflicting_tasks(num_samples=300, seed=0)
  monkeypatch.setitem(reg.DATASETS, "conflicting", lambda **_: {"train": full, "test": full.subset(np.arange(0))})
  with pytest.raises(experiment.ConfigError, match="the test split is empty"):
    _runner.load_data(_cfg())


def test_split_without_positives_warns_and_the_table_is_still_written(monkeypatch, tmp_path):
  full = data.conflicting_tasks(num_samples=1000, seed=0)
  test_part = full.subset(np.flatnonzero(full.labels[1] < 0.5)[:150])  # task_1 has no positive in test
  monkeypatch.setitem(
    reg.DATASETS, "conflicting", lambda **_: {"train": full.subset(np.arange(800)), "test": test_part}
  )
  with pytest.warns(
    UserWarning,
    match=r"task 'task_1' has no positive label among the 150 labelled samples of the "
    r"test split",
  ):
    out = experiment.compare(
      _cfg(method={"name": "linear"}),
      [{"name": "linear"}, {"name": "pcgrad"}],
      seeds=[0],
      out_dir=str(tmp_path / "cmp"),
      progress=False,
      echo=lambda *_: None,
    )
  row = out["table"]["pcgrad"]
  assert np.isnan(row["mean"][1]) and row["delta_m_tasks"] == ["task_0", "task_2"] and np.isfinite(row["delta_m"])
  assert "| n/a" in out["text"]
  assert os.path.getsize(tmp_path / "cmp" / "table.md") > 0 and os.path.getsize(tmp_path / "cmp" / "results.json") > 0


@pytest.mark.parametrize(
  "table, entry, message",
  [
    ("model", {"num_experts": "2"}, "model.num_experts must be an integer, got str '2'"),
    ("model", {"expert": 8}, "model.expert must be a list, got int 8"),
    ("method", {"name": "gradvac", "beta": "high"}, "method.beta must be a number or a list, got str 'high'"),
    ("data", {"num_samples": 1.5}, "data.num_samples must be an integer, got float 1.5"),
    ("method", {"name": "pcgrad", "reduction": 1}, "method.reduction must be a string, got int 1"),
    ("optimizer", {"name": "adam", "nesterov": "yes"}, "optimizer.nesterov must be a boolean"),
    ("train", {"keep_checkpoints": 0}, "train.keep_checkpoints must be >= 1"),
    ("train", {"similarity": "leaf"}, "train.similarity must be 'model' or 'layer'"),
  ],
)
def test_config_types_are_checked_before_any_work(table, entry, message):
  with pytest.raises(experiment.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _cfg(**{table: entry})


def test_cli_run_honours_every_seed(tmp_path, capsys):
  cfg = tmp_path / "cfg.toml"
  cfg.write_text(
    textwrap.dedent("""
      seeds = [0, 1]
      [data]
      name = "conflicting"
      num_samples = 600
      task_types = ["binary", "binary", "regression"]
      [model]
      name = "mmoe"
      num_experts = 2
      expert = [8]
      tower = [4, 1]
      [method]
      name = "linear"
      [train]
      steps = 3
      batch_size = 64
      """)
  )
  out = tmp_path / "out"
  assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
  text = capsys.readouterr().out
  assert "seed 0" in text and "seed 1" in text
  seeds = [json.load(open(out / f"seed_{s}" / "results.json"))["seed"] for s in (0, 1)]
  assert seeds == [0, 1]
  assert os.path.getsize(out / "seed_0" / "similarity.png") > 0  # the logged cosines, plotted
  cells = [
    [c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
  ]
  assert ["task", "AUC", "logloss", "MSE"] in cells  # a markdown table per seed ...
  task_2 = next(r for r in cells if r[0] == "task_2")
  assert task_2[1:3] == ["—", "—"] and float(task_2[3]) > 0  # ... without nan for the regression task's AUC/logloss
  assert "nan" not in text.lower()
  assert cli.main(["run", str(cfg), "--out", str(tmp_path / "one"), "--no-progress", "--seed", "1"]) == 0
  assert json.load(open(tmp_path / "one" / "results.json"))["seed"] == 1


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
  folder = tmp_path / "study"
  shutil.copytree(os.path.join(FIX, "census"), folder / "census")
  cfg = folder / "census.toml"
  cfg.write_text(
    textwrap.dedent("""
      [data]
      name = "census"
      data_path = "census/census-income.data"
      test_path = "census/census-income.test"
      [model]
      name = "mmoe"
      num_experts = 2
      expert = [8]
      tower = [4, 1]
      [method]
      name = "linear"
      """)
  )
  monkeypatch.chdir(tmp_path)  # not the config's folder
  loaded = experiment.load(str(cfg))
  assert loaded.data["data_path"] == str(folder / "census" / "census-income.data")
  train, valid, test = _runner.load_data(loaded)
  assert len(train) and len(valid) and len(test)


def test_cli_names_the_extra_when_its_modules_are_missing(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(cli, "_missing", lambda m: m == "matplotlib")
  assert cli.main(["compare", "--steps", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "mtjax: the compare command needs matplotlib: pip install 'mtjax[cli]'"


def test_entire_space_models_train_and_are_scored_on_every_impression(monkeypatch):
  """ESMM on funnel data: the data's mask of the conversion task is the clicks (its post-click sample
  space), but ESMM's CTCVR loss and its pCTCVR AUC cover every impression. Before, the run passed that
  mask to esmm_loss (CTCVR averaged over clicks only) and scored pCTCVR on clicked samples only."""
  cfg = experiment.from_dict(
    {
      **RAW,
      "data": {"name": "funnel", "num_samples": 3000, "seed": 0},
      "model": {"name": "esmm", "tower": [8, 1]},
      "method": {"name": "linear"},
      "train": {"steps": 8, "batch_size": 64, "log_every": 4},
    }
  )
  train, valid, test = _runner.load_data(cfg)
  assert 0.05 < test.masks[1].mean() < 0.5  # the funnel's post-click mask
  seen = {}
  fit = training.fit

  def spy(model, tx, train_ds, **kw):
    seen["masks"] = train_ds.masks
    res = fit(model, tx, train_ds, **kw)
    seen["state"] = res.state
    return res

  monkeypatch.setattr(_runner.training, "fit", spy)
  res = experiment.run(cfg, data=(train, valid, test), progress=False, plots=False)
  assert np.array_equal(seen["masks"], np.broadcast_to(train.masks[0], train.masks.shape))  # every impression
  # The reported conversion AUC is pCTCVR's against click & conversion over all test impressions.
  model = _runner.build_model(cfg, train)
  state = seen["state"]
  x = test.batch(np.arange(len(test)))["x"]
  _, aux = model.apply({"params": state.params, **state.variables}, x)
  ctcvr = np.asarray(aux["task_log_probs"][1], np.float64)
  assert res.test["conversion"]["auc"] == pytest.approx(mtjax.metrics.auc(test.labels[1], ctcvr), abs=1e-9)
  assert _runner.entire_space(data.conflicting_tasks(num_samples=50, seed=0)).masks is None
