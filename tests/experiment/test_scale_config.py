"""Experiment configs and the CLI for the scaling options: train.strategy rep/shared/subset, chunk_size,
rep_gram, method.every/ema (amortized) and gram_leaves: validation, a few training steps, errors."""

import json
import os
import textwrap

import numpy as np
import pytest

from mtjax import cli
from mtjax import experiment
from mtjax.experiment import _runner


def _raw(method, **train):
  return {
    "name": "scale",
    "data": {"name": "conflicting", "num_samples": 400, "seed": 0},
    "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
    "method": method,
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "train": {"steps": STEPS, "batch_size": 32, "log_every": 1, "eval_batch_size": 256, **train},
  }


STEPS = 2  # a refresh step and a reuse step of the amortized methods (compilation dominates)
# Strategy "rep" (with rep_gram, chunk_size, every and ema) trains in the CLI test below.
CASES = {
  "shared-chunk2-cr_mogm": ({"name": "mgda", "ema": 0.5}, {"strategy": "shared", "chunk_size": 2}),
  "subset-gram_leaves-amortized": (
    {"name": "upgrad", "gram_leaves": "experts/", "every": 2},
    {"strategy": "subset", "rep_gram": "stack"},
  ),
}


def _check_config_trains(method, train):
  cfg = experiment.from_dict(_raw(method, **train))
  for k, v in train.items():
    assert getattr(cfg.train, k) == v
  assert cfg.method == method  # every / ema / gram_leaves are kept on the method table
  amortized = "every" in method or "ema" in method
  tx = _runner.build_tx(cfg, num_tasks=3, seed=0, steps_per_epoch=4)
  assert (type(tx.init({"w": np.zeros(2, np.float32)})[0]).__name__ == "AmortizedState") == amortized
  # No similarity tracking where it would cost the rows that amortized weights / subset avoid.
  assert _runner.track_similarity(cfg) == (method.get("every", 1) == 1 and train["strategy"] != "subset")
  res = experiment.run(cfg, progress=False, plots=False)
  assert len(res.history) == STEPS
  for rec in res.history:
    assert np.all(np.isfinite(rec["losses"])), rec
  assert set(res.test) == {"task_0", "task_1", "task_2", "macro"}
  assert all(np.isfinite(v) for t in res.test.values() for v in t.values())


def test_scale_configs_train_and_compare(tmp_path, capsys):
  """One test, so that one worker pays the model's (eager) initialization for all the runs."""
  for case, (method, train) in CASES.items():
    try:
      _check_config_trains(method, train)
    except Exception as e:
      raise AssertionError(f"config case {case}") from e
  capsys.readouterr()
  _check_cli_compare(tmp_path, capsys)


@pytest.mark.parametrize(
  "method, train, message",
  [
    ({"name": "mgda"}, {"strategy": "bogus"}, r"train.strategy must be one of .*'rep', 'shared', 'subset'.*'bogus'"),
    ({"name": "mgda", "every": 0}, {}, r"method.every must be an int >= 1 .*got 0"),
    ({"name": "mgda", "every": 2.5}, {}, r"method.every must be an int >= 1 .*got 2.5"),
    ({"name": "mgda", "ema": 1.5}, {}, r"method.ema must be a number in \[0, 1\), got 1.5"),
    ({"name": "mgda", "ema": True}, {}, r"method.ema must be a number in \[0, 1\), got True"),
    ({"name": "mgda"}, {"rep_gram": "x"}, r"train.rep_gram must be one of \('sum', 'stack'\), got 'x'"),
    ({"name": "mgda"}, {"chunk_size": -1}, r"train.chunk_size must be >= 0 .*got -1"),
    ({"name": "mgda"}, {"chunk_size": 1.5}, r"train.chunk_size must be int"),
    ({"name": "mgda", "gram_leaves_typo": "x"}, {}, r"method has unknown key 'gram_leaves_typo'"),
  ],
)
def test_scale_config_errors(method, train, message):
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.from_dict(_raw(method, **train))


def test_amortizing_a_method_without_weights_is_a_config_error():
  cfg = experiment.from_dict(_raw({"name": "graddrop", "every": 2}))
  with pytest.raises(experiment.ConfigError, match="method 'graddrop': .*amortized wraps a Gram-based"):
    _runner.build_tx(cfg, num_tasks=3, seed=0, steps_per_epoch=4)


TINY = """
name = "tiny"
[data]
name = "conflicting"
num_samples = 800
[model]
name = "mmoe"
num_experts = 2
expert = [8]
tower = [4, 1]
[method]
name = "linear"
[train]
steps = 20
batch_size = 32
eval_batch_size = 256
rep_gram = "stack"
"""


def _check_cli_compare(tmp_path, capsys):
  cfg = tmp_path / "tiny.toml"
  cfg.write_text(textwrap.dedent(TINY))
  out = str(tmp_path / "cmp")
  argv = [
    "compare",
    str(cfg),
    "--strategy",
    "rep",
    "--methods",
    "linear,mgda",
    "--steps",
    "2",
    "--samples",
    "400",
    "--seeds",
    "0",
    "--every",
    "2",
    "--ema",
    "0.5",
    "--chunk-size",
    "2",
    "--out",
    out,
    "--no-progress",
  ]
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  header = text.splitlines()[0]
  assert "strategy rep," in header and header.endswith(", weights every 2 steps")
  saved = json.load(open(os.path.join(out, "results.json")))
  assert {k: saved["config"]["train"][k] for k in ("strategy", "chunk_size", "rep_gram", "steps")} == {
    "strategy": "rep",
    "chunk_size": 2,
    "rep_gram": "stack",
    "steps": 2,
  }
  assert [m["every"] for m in saved["methods"]] == [2, 2] and [m["ema"] for m in saved["methods"]] == [0.5, 0.5]
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[0].startswith("| method") and "Δm% vs linear" in rows[0]
  assert [r.split("|")[1].strip() for r in rows[1:]] == ["linear", "mgda"]


def test_cli_bad_scale_flags_are_config_errors(capsys):
  assert cli.main(["compare", "--strategy", "bogus", "--methods", "linear", "--steps", "1"]) == 2
  assert "train.strategy must be one of" in capsys.readouterr().err
  assert cli.main(["compare", "--every", "0", "--methods", "linear", "--steps", "1"]) == 2
  assert "method.every must be an int >= 1" in capsys.readouterr().err
  assert cli.main(["compare", "--ema", "1.5", "--methods", "linear", "--steps", "1"]) == 2
  assert "method.ema must be a number in [0, 1)" in capsys.readouterr().err
