"""Lint, format and type checks, as tests: CI (`.ci/run`) runs pytest only.

Configured in pyproject.toml ([tool.ruff], [tool.basedpyright]); the commands are in README.md,
"Development". basedpyright checks ``mtjax`` and the user-style ``tests/typecheck/public_api.py`` against
``.basedpyright/baseline.json``, the errors that predate the check (narrowing and JAX/optax/flax
annotation gaps inside the implementation): new code must type-check, and fixing a baselined error
then ``basedpyright --writebaseline`` shrinks the file.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd=ROOT, hint=""):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
  if proc.returncode != 0:
    pytest.fail(f"`{' '.join(args)}` exited with {proc.returncode}{hint}:\n{(proc.stdout + proc.stderr).strip()}")


def test_ruff_check():
  _run(["ruff", "check", "--no-cache", "."], hint=" (fix the code, or `ruff check --fix <file>`)")


def test_ruff_format():
  _run(["ruff", "format", "--check", "--no-cache", "."], hint=" (run `ruff format <file>`)")


@pytest.mark.slow
def test_basedpyright(tmp_path):
  # A copy of the baseline: the CLI may rewrite the file it reads when errors disappear.
  baseline = tmp_path / "baseline.json"
  shutil.copy(ROOT / ".basedpyright" / "baseline.json", baseline)
  _run(["basedpyright", "--baselinefile", str(baseline)], hint=" (new type errors in mtjax or tests/typecheck)")


@pytest.mark.slow
def test_public_api_as_an_installed_package(tmp_path):
  """tests/typecheck/public_api.py against mtjax installed as a py.typed library, as its users see it.

  Inside this repository mtjax is local code; from site-packages, a name the package imports but does not
  list in ``__all__`` is private to pyright (reportPrivateImportUsage), so a missing export fails here.
  """
  site = tmp_path / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
  shutil.copytree(ROOT / "mtjax", site / "mtjax", ignore=shutil.ignore_patterns("__pycache__"))
  (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  (tmp_path / "venv" / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\n")
  user = tmp_path / "user"
  user.mkdir()
  shutil.copy(ROOT / "tests" / "typecheck" / "public_api.py", user / "public_api.py")
  (user / "pyrightconfig.json").write_text(
    f'{{"venvPath": "{tmp_path}", "venv": "venv", "typeCheckingMode": "basic", '
    f'"pythonVersion": "{sys.version_info.major}.{sys.version_info.minor}"}}'
  )
  _run(["basedpyright", "public_api.py"], cwd=user, hint=" (is every public name in its package's __all__?)")
