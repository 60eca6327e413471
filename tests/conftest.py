"""Test configuration: strict rank promotion catches `w[T] * g[T, D]` broadcasting bugs, and each
test module's compiled programs are released when the module ends."""

import json
import os
import sys

# XLA:CPU compilation is most of this suite's time (thousands of small, distinct programs), and LLVM's
# optimization passes most of each compile: the tests run without them (XLA's own HLO passes, buffer
# assignment and float semantics -- no fast-math on CPU either way -- are unchanged), about 20% less
# time. MTJAX_TEST_OPTIMIZED=1 runs the suite fully optimized, as users' programs are. Set in the
# environment too, so subprocesses (the command line, notebook kernels) inherit it.
if os.environ.get("MTJAX_TEST_OPTIMIZED", "") not in ("1", "true"):
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_disable_most_optimizations", os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1")

QUICK_SECONDS = 0.4  # tests recorded slower than this are left out of the quick tier (-m "not slow")


def pytest_collection_modifyitems(config, items):
  """Marks ``slow`` every test whose time in ``tests/durations.json`` is above ``QUICK_SECONDS``, so
  that ``-m "not slow"`` is the quick tier (see ``tests/record_durations.py``)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  try:
    import record_durations  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  durations = record_durations.load()
  for item in items:
    if durations.get(item.nodeid, 0.0) > QUICK_SECONDS:
      item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
  """With ``MTJAX_RECORD_DURATIONS=FILE`` set, appends each test phase's time to FILE (JSON lines; the
  input of ``python tests/record_durations.py FILE``). Runs in the controlling process under xdist."""
  path = os.environ.get("MTJAX_RECORD_DURATIONS")
  if path and "PYTEST_XDIST_WORKER" not in os.environ:  # the workers' reports reach the controller too
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "seconds": report.duration}) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """``jax.clear_caches()`` after each module.

  Every XLA:CPU executable holds ~17 memory mappings of JIT-compiled code for as long as a jit
  cache keeps it, and a Linux process may hold at most ``vm.max_map_count`` (65530) mappings. One
  pytest-xdist worker running half of this suite compiles thousands of programs (the conformance
  module alone ~1500), crossed that limit and died with a segfault inside an XLA compile (CI,
  2026-11-30: ``test_conformance.py::test_one_and_many_tasks[8-pareto_ltr-bounds]``). Clearing
  the caches at module boundaries keeps the mappings of one module only; a module's own caches
  (``functools.cache`` bundles, trace counters) are unaffected within the module.
  """
  yield
  jax.clear_caches()
