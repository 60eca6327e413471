"""A slice of the large fuzz (``fuzz_report.py``) in the slow tier: every method and option case at
T = 3 and 16, float32 and float64, every input family, with the per-update checks of that script (no
hang, no silent NaN/inf, clear errors, zero in -> zero out, non-conflict and optimality
certificates, permutation and scale equivariance). The full run is
``python tests/fuzz/fuzz_report.py --per-method 10000``."""

import fuzz_report  # tests/fuzz is on sys.path (pytest's rootdir-relative import of this file)
import pytest

import mtjax


@pytest.mark.slow
@pytest.mark.parametrize("case", fuzz_report.ALL_CASES)
def test_fuzz_slice(case):
  with mtjax.runtime_checks(True):
    # T = 3 and 16 (> P = 8), float32 and float64: every family once per combination.
    report = fuzz_report.fuzz_case(case, per_method=len(fuzz_report.FAMILIES) * 4, seed=1, shapes=(3, 16))
  assert report["hangs"] == 0 and report["silent_nonfinite"] == 0, report
  assert not report["violations"], (case, report["violations"][:10])
  assert report["updates"] >= report["matrices"]  # most inputs run through (errors are counted apart)
