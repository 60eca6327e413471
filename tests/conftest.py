"""Test configuration: strict rank promotion catches `w[T] * g[T, D]` broadcasting bugs, and each
test module's compiled programs are released when the module ends."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


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
