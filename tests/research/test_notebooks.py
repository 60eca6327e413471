"""Every notebook executes (fast setting, MTJAX_FAST=1) and is committed clean and up to date.

The notebooks run in a python3 kernel of the current interpreter (jupyter_client maps the
kernelspec's ``python`` to ``sys.executable``) with ``notebooks/`` as working directory.
"""

import glob
import importlib.util
import os

import nbformat
import pytest
from nbclient import NotebookClient

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
  assert len(names) == 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_clean_and_built(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
  built = _builder().build()[os.path.basename(path)]
  assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in built.cells], (
      "the notebook differs from notebooks/_build.py: run `python notebooks/_build.py`")
  assert any("MTJAX_FAST" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("MTJAX_FAST", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "fast setting" in text  # the kernel saw MTJAX_FAST=1
  assert "| " in text  # a table was printed
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert images, "no figure was displayed"
