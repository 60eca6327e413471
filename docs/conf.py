"""Sphinx configuration of the mtjax documentation (build: ``sphinx-build -W -b html docs docs/_build/html``).

The notebooks of ``notebooks/`` are copied into ``docs/notebooks/`` (not committed) when the
build starts and executed by myst-nb in the fast setting (``MTJAX_FAST=1`` unless the
environment sets it), with ``docs/notebooks/`` as working directory; they find ``research/`` by
walking up from there. Nothing is downloaded at build time.
"""

import os
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
sys.path.insert(0, REPO)

# The notebooks' kernels inherit this environment: the tiny CI setting, a CPU backend, inline figures.
os.environ.setdefault("MTJAX_FAST", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("MPLBACKEND", None)


def _copy_notebooks():
  """Copies ``notebooks/*.ipynb`` into ``docs/notebooks/``, rewriting only the changed ones."""
  src, dst = os.path.join(REPO, "notebooks"), os.path.join(DOCS, "notebooks")
  os.makedirs(dst, exist_ok=True)
  names = sorted(n for n in os.listdir(src) if n.endswith(".ipynb"))
  for name in os.listdir(dst):  # notebooks removed from notebooks/
    if name.endswith(".ipynb") and name not in names:
      os.remove(os.path.join(dst, name))
  for name in names:
    with open(os.path.join(src, name), "rb") as f:
      new = f.read()
    target = os.path.join(dst, name)
    if os.path.exists(target):
      with open(target, "rb") as f:
        if f.read() == new:
          continue
    shutil.copyfile(os.path.join(src, name), target)


_copy_notebooks()

import mtjax  # noqa: E402  (after sys.path)

project = "mtjax"
author = "the mtjax authors"
copyright = "the mtjax authors"  # noqa: A001
release = mtjax.__version__
version = release

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]

# MyST: $...$ and $$...$$ math, amsmath environments, ::: fences, {attribution} etc.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# myst-nb: execute the notebooks at build time; a failing cell fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = False  # cwd = docs/notebooks/
nb_merge_streams = True

# autodoc: Google-style docstrings with reST math; signatures keep the source's annotations.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autosummary_generate = False
add_module_names = False

html_theme = "sphinx_book_theme"
html_title = f"mtjax {release}"
html_theme_options = {
  "show_toc_level": 2,
  "home_page_in_toc": True,
  "use_download_button": True,
}
html_static_path = []
