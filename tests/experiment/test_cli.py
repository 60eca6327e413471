"""The `mtjax` command and experiment configs: end to end in a temporary folder, and config errors."""

import json
import os
import textwrap

import pytest

from mtjax import cli
from mtjax import experiment

TINY = """
name = "tiny"
seeds = [0]
[data]
name = "conflicting"
num_samples = 800
[model]
name = "mmoe"
num_experts = 2
expert = [8]
tower = [4, 1]
[method]
name = "{method}"
[optimizer]
name = "adam"
learning_rate = 0.01
[train]
steps = {steps}
batch_size = 64
log_every = 2
checkpoint_every = {ckpt}
"""


def _write(tmp_path, text, name="cfg.toml"):
  p = tmp_path / name
  p.write_text(textwrap.dedent(text))
  return str(p)


def test_run_end_to_end(tmp_path, capsys):
  cfg = _write(tmp_path, TINY.format(method="mgda", steps=8, ckpt=4))
  out = str(tmp_path / "out")
  assert cli.main(["run", cfg, "--out", out, "--no-progress"]) == 0
  text = capsys.readouterr().out
  assert "| mean " in text and "ms/step" in text  # the mean over tasks of each metric
  for f in ("results.json", "log.jsonl", "learning_curves.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  res = json.load(open(os.path.join(out, "results.json")))
  assert set(res["test"]) == {"task_0", "task_1", "task_2", "macro"}
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_4", "step_8"]
  # Running again on a finished folder resumes at the end: nothing is retrained.
  assert cli.main(["run", cfg, "--out", out, "--no-progress"]) == 0


def test_compare_tiny(tmp_path, capsys):
  cfg = _write(tmp_path, TINY.format(method="linear", steps=6, ckpt=0))
  out = str(tmp_path / "cmp")
  assert (
    cli.main(
      ["compare", cfg, "--methods", "linear,pcgrad,uncertainty", "--seeds", "0", "1", "--out", out, "--no-progress"]
    )
    == 0
  )
  text = capsys.readouterr().out
  rows = [l for l in text.splitlines() if l.startswith("| ")]
  assert rows[0].startswith("| method") and "Δm% vs linear" in rows[0]
  assert [r.split("|")[1].strip() for r in rows[1:]] == ["linear", "pcgrad", "uncertainty"]
  assert "+0.00" in rows[1]  # the baseline against itself
  assert os.path.getsize(os.path.join(out, "learning_curves.png")) > 0
  table = json.load(open(os.path.join(out, "results.json")))["table"]
  assert len(table["pcgrad"]["per_seed"]) == 2


@pytest.mark.parametrize(
  "patch, message",
  [
    ({"model": {"name": "mmoee"}}, "unknown model 'mmoee'"),
    ({"method": {"name": "pcgrad", "lr": 1}}, "method has unknown key 'lr'"),
    ({"train": {"steps": "ten"}}, "train.steps must be int"),
    ({"train": {"steps": 0}}, "train.steps must be >= 1"),
    ({"train": {"strategy": "fast"}}, "train.strategy must be one of"),
    ({"optimizer": {"name": "adam", "learning_rate": -1.0}}, "learning_rate must be a positive"),
    ({"optimizer": {"name": "lion2"}}, "unknown optimizer"),
    ({"extra": 1}, "unknown top-level key 'extra'"),
    ({"model": {"name": "mmoe", "num_tasks": 3}}, "set by the experiment"),
    ({"data": {"name": "conflicting", "rows": 5}}, "data has unknown key 'rows'"),
  ],
)
def test_config_errors(patch, message):
  raw = {"data": {"name": "conflicting"}, "model": {"name": "mmoe"}, "method": {"name": "pcgrad"}}
  raw.update(patch)
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.from_dict(raw)


def test_cli_config_error_is_one_line(tmp_path, capsys):
  cfg = _write(tmp_path, TINY.format(method="nash", steps=2, ckpt=0))
  assert cli.main(["run", cfg, "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "unknown method 'nash'" in err
  bad = _write(tmp_path, "[data\nname=1", "bad.toml")
  assert cli.main(["compare", bad]) == 2
  assert cli.main(["compare", str(tmp_path / "missing.toml")]) == 2
  assert cli.main(["compare", "--methods", "linear,bogus"]) == 2


def test_list(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  assert "mmoe" in out and "pcgrad" in out and "conflicting" in out


def test_compare_table_macro_leaves_out_other_metrics():
  from types import SimpleNamespace

  from mtjax.experiment import _runner

  names = ["click", "like", "watch_time"]
  prim = [("auc", False), ("auc", False), ("mse", True)]
  run = lambda a, b, m: SimpleNamespace(
    test={"click": {"auc": a}, "like": {"auc": b}, "watch_time": {"mse": m}}, ms_per_step=1.0
  )
  table = _runner.summarize(
    {"linear": [run(0.8, 0.7, 20.0)], "mgda": [run(0.9, 0.8, 30.0)]}, names, prim, baseline="linear"
  )
  assert table["mgda"]["macro_metric"] == "auc"
  assert table["mgda"]["macro"] == pytest.approx(0.85)  # the MSE is not averaged with AUCs
  # Delta_m% covers every task, with the sign of each metric: (+12.5 + 14.29 - 50) / 3.
  assert table["mgda"]["delta_m"] == pytest.approx((12.5 + 100 / 7 - 50) / 3)
  text = _runner.format_table(table, names, prim, seeds=1, baseline="linear")
  assert "macro AUC" in text.splitlines()[0]
  assert _runner.macro_metric([("mse", True), ("mse", True), ("auc", False)]) == "mse"
  assert _runner.macro_metric([("mse", True), ("auc", False)]) == "auc"


def test_every_registered_method_builds_from_a_config():
  """Configs can name every method (with options); the runner builds a working optax chain."""
  import jax
  import jax.numpy as jnp

  from mtjax.experiment import _registry
  from mtjax.experiment import _runner

  options = {
    "cagrad": {"c": 0.5, "rescale": "1/(1+c)"},
    "aligned_mtl": {"scale": "median"},
    "upgrad": {"regularization": 0.0},
    "fairgrad": {"alpha": 2.0},
    "nash_mtl": {"normalization": "frobenius"},
    "rlw": {"sum_to": "num_tasks"},
    "graddrop": {"leak": 0.1},
  }
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
  for name in _registry.METHODS:
    raw = {
      "data": {"name": "conflicting"},
      "model": {"name": "mmoe"},
      "method": {"name": name, **options.get(name, {})},
    }
    cfg = experiment.from_dict(raw)
    meta = None
    if _runner.needs_meta_loss(cfg):  # Auto-Lambda: the runner passes the model's validation losses
      meta = lambda p, batch: jnp.stack([jnp.sum((p["w"] - batch) ** 2), jnp.sum((p["w"] + batch) ** 2)])  # noqa: E731
      with pytest.raises(experiment.ConfigError, match="needs the model's loss on a validation batch"):
        _runner.build_tx(cfg, num_tasks=2, seed=0, steps_per_epoch=3)
    tx = _runner.build_tx(cfg, num_tasks=2, seed=0, steps_per_epoch=3, meta_loss_fn=meta)
    state = tx.init(params)
    if meta is not None:
      updates, _ = jax.jit(tx.update)(grads, state, params, task_losses=jnp.ones(2), validation_batch=jnp.ones(3))
      assert bool(jnp.all(jnp.isfinite(updates["w"]))), name
    if name in options:  # the new methods' options reach the factory: one step runs
      updates, _ = jax.jit(tx.update)(grads, state, params, task_losses=jnp.ones(2))
      assert bool(jnp.all(jnp.isfinite(updates["w"]))), name
  with pytest.raises(experiment.ConfigError, match="method has unknown key 'radius'"):
    experiment.from_dict(
      {"data": {"name": "conflicting"}, "model": {"name": "mmoe"}, "method": {"name": "cagrad", "radius": 1.0}}
    )
