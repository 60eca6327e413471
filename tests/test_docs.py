"""Documentation that runs: every docstring example in the package, and the README's code blocks."""

import doctest
import importlib
import os
import pkgutil
import re
import tomllib

import pytest

import mtjax

MODULES = sorted(m.name for m in pkgutil.walk_packages(mtjax.__path__, "mtjax.") if not m.name.endswith("__main__"))
README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks(lang):
  text = open(README, encoding="utf-8").read()
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, report=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
  if name.startswith("mtjax.transforms._"):  # every method documents a runnable example
    assert result.attempted > 0, f"{name} has no docstring example"


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_blocks_run(index, capsys):
  code = _blocks("python")[index]
  exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
  capsys.readouterr()


def test_readme_config_is_valid():
  from mtjax import experiment

  (block,) = _blocks("toml")
  cfg = experiment.from_dict(tomllib.loads(block))  # validated up front, as `mtjax run` does
  assert cfg.model["name"] == "mmoe" and cfg.method["name"] == "pcgrad"


def test_readme_lists_every_method_and_model():
  text = open(README, encoding="utf-8").read()
  from mtjax.experiment import _registry

  for name in _registry.METHODS:
    assert f"mtjax.{name}(" in text, f"README's method table lacks {name}"
  for name in set(mtjax.models.available()) - {"my_linear"}:  # registered by a docstring example
    assert name.lower().replace("_", "") in text.lower().replace("-", "").replace("_", ""), name


def test_examples_oracles_prints_the_reference_values(capsys):
  import runpy

  runpy.run_path(os.path.join(os.path.dirname(__file__), os.pardir, "examples", "oracles.py"), run_name="__main__")
  out = capsys.readouterr().out
  for expected in (
    "[0.5848, 3.8012, 3.8012], [2.2222, 1.5789]",
    "[0.0, 1.0, 1.0], [0.6, 0.4]",
    "c=(0.7, 0.1) weights [0.7, 0.3]",
    "L=[1,2,4]: 3.5",
    "[0.2929, 1.9004, 1.9004]",
    "[0.5563, 1.1109, 1.1109]",
    "[0.1835, 1.2041, 1.2041]",
    "[0.0767, 1.0, 1.0]",
    "[0.2133, 0.9673, 0.9673]",
    "[0.1588, 2.0706, 2.0706]",
    "[0.0766, 0.9985, 0.9985]",
  ):
    assert expected in out, (expected, out)


DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")
DOC_PAGES = sorted(
  n
  for n in os.listdir(DOCS)
  if n.endswith(".md") and "```python" in open(os.path.join(DOCS, n), encoding="utf-8").read()
)


@pytest.mark.parametrize("name", DOC_PAGES)
def test_docs_python_blocks_run(name, capsys, tmp_path, monkeypatch):
  """Every ```python block of a documentation page runs, in order, in one namespace per page (as a reader
  would paste them), in an empty working folder (the pages may write figures next to them)."""
  text = open(os.path.join(DOCS, name), encoding="utf-8").read()
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__docs__"}
  for index, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
    exec(compile(code, f"docs/{name} python block {index}", "exec"), namespace)
  capsys.readouterr()
  if name == "analysis.md":
    assert (tmp_path / "over_steps.png").stat().st_size > 0
