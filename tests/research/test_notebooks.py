"""Every notebook is committed clean and up to date with ``notebooks/_build.py``.

That every notebook executes (fast setting, MTJAX_FAST=1: a table printed, a figure displayed, no
error) is checked by ``tests/test_docs_site.py``, whose documentation build executes them once.
"""

import glob
import importlib.util
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def _builder():
  spec = importlib.util.spec_from_file_location("notebooks_build", os.path.join(NOTEBOOK_DIR, "_build.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_one_notebook_per_ablation():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == sorted(_builder().NOTEBOOKS)
  assert len(names) == 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_clean_and_built(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
  built = _builder().build()[os.path.basename(path)]
  assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in built.cells], (
    "the notebook differs from notebooks/_build.py: run `python notebooks/_build.py`"
  )
  assert any("MTJAX_FAST" in c.source for c in nb.cells if c.cell_type == "code")
