"""The documentation site builds with warnings as errors, and its notebooks execute.

One Sphinx build (``sphinx-build -W --keep-going -b html docs <tmp>/html``) checks the pages, the
API reference generated from the docstrings, and the notebooks of ``notebooks/``, which myst-nb
executes in the fast setting (``MTJAX_FAST=1``) with ``docs/notebooks/`` (a copy made by
``docs/conf.py``) as working directory. The executed notebooks myst-nb leaves in
``<tmp>/jupyter_execute`` are checked here as well, so CI runs every notebook once; the checks
that they are committed clean and built from ``notebooks/_build.py`` are in
``tests/research/test_notebooks.py``.
"""

import glob
import importlib
import os
import subprocess
import sys

import pytest

import mtjax
from mtjax.experiment import _registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.basename(p)[: -len(".ipynb")] for p in glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
PAGES = [
  "index",
  "getting_started",
  "methods",
  "models",
  "scale",
  "analysis",
  "experiments",
  "optax",
  "notebooks",
  "api/index",
  "api/mtjax",
  "api/transforms",
  "api/models",
  "api/losses",
  "api/metrics",
  "api/fusion",
  "api/analysis",
  "api/training",
  "api/experiment",
  "api/data",
]


SUBPACKAGES = ("transforms", "models", "losses", "metrics", "fusion", "analysis", "training", "experiment", "data")


def _public_names(module):
  """The names a user imports from ``module``: its ``__all__``, or its public attributes defined in mtjax
  (plus constants), leaving out submodules and re-exported helpers such as ``typing.Optional``."""
  names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
  out = []
  for name in names:
    obj = getattr(module, name)
    if isinstance(obj, type(module)):
      continue
    if not str(getattr(obj, "__module__", "")).startswith("mtjax") and not isinstance(
      obj, (dict, tuple, list, str, int, float, frozenset)
    ):
      continue
    out.append(name)
  return out


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_every_method_has_a_catalogue_section_and_an_api_entry():
  catalogue = _read(os.path.join(REPO, "docs", "methods.md"))
  api = _read(os.path.join(REPO, "docs", "api", "transforms.md"))
  for name in sorted(_registry.METHODS):
    assert f"* **API:** {{func}}`mtjax.{name}`" in catalogue, f"docs/methods.md has no section on {name}"
    assert f"\n   {name}\n" in api and f".. autofunction:: {name}\n" in api, f"docs/api/transforms.md lacks {name}"


def _check_executed_notebook(path):
  """The checks of an executed notebook: fast setting, a table printed, a figure shown, no error."""
  import nbformat

  nb = nbformat.read(path, as_version=4)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"], path
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "fast setting" in text, path  # the kernel saw MTJAX_FAST=1
  assert "| " in text, path  # a table was printed
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert images, f"{path}: no figure was displayed"


@pytest.mark.slow
def test_docs_site_builds(tmp_path):
  for module in ("sphinx", "myst_nb", "sphinx_book_theme", "nbformat"):
    pytest.importorskip(module)
  env = dict(os.environ, MTJAX_FAST="1", JAX_PLATFORMS="cpu")
  env.pop("MPLBACKEND", None)
  html = tmp_path / "html"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-b",
      "html",
      "-d",
      str(tmp_path / "doctrees"),
      os.path.join(REPO, "docs"),
      str(html),
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]

  for page in PAGES + [f"notebooks/{name}" for name in NOTEBOOKS]:
    assert (html / f"{page}.html").is_file(), page

  # the catalogue has a section per method of the registry, linked to its API entry
  methods = _read(html / "methods.html")
  api = _read(html / "api" / "transforms.html")
  for name in sorted(_registry.METHODS):
    assert f'id="mtjax.{name}"' in api, name
    assert f"transforms.html#mtjax.{name}" in methods, name
  # every public name of the top level and of the public subpackages has an API entry
  reference = "".join(_read(p) for p in glob.glob(str(html / "api" / "*.html")))
  for module in (mtjax, *(importlib.import_module(f"mtjax.{m}") for m in SUBPACKAGES)):
    for name in _public_names(module):
      # the transforms are documented under their top-level names, mtjax.pcgrad
      qualified = f"mtjax.{name}" if module.__name__ == "mtjax.transforms" else f"{module.__name__}.{name}"
      assert f'id="{qualified}"' in reference, f"{module.__name__}.{name} has no entry in docs/api/"
  for name in ("run", "compare", "RunResult", "compare_grid", "GridResult", "paired_stats"):  # loaded lazily
    assert f'id="mtjax.experiment.{name}"' in reference, name

  # the notebooks were executed in the fast setting and rendered with their outputs
  executed = tmp_path / "jupyter_execute" / "notebooks"
  assert sorted(p.stem for p in executed.glob("*.ipynb")) == NOTEBOOKS
  for name in NOTEBOOKS:
    _check_executed_notebook(executed / f"{name}.ipynb")
    assert "<img" in _read(html / "notebooks" / f"{name}.html"), name
