"""Global switches: runtime finiteness / validity checks under ``jit``.

Under ``jit`` a failed check reaches the host through a ``jax.debug.callback`` in the failing
branch of a ``lax.cond``. Any host callback in a compiled step has a fixed cost on CPU (measured
in ``benchmarks/step_time.py``: about 6-10 ms on a 68 ms MMoE step on 2 cores), so loops that
check on the host anyway can switch the in-graph checks off. ``mtjax.training.fit`` does: it
checks the task losses of every step on the host (a NaN gradient shows up as a NaN loss one step
later) and gives the same clear error.

The switch is read when a function is *traced*: set it before ``jit`` compiles the step.
Checks on concrete (non-traced) values always run. The environment variable
``MTJAX_RUNTIME_CHECKS=0`` turns them off for a whole process.
"""

from __future__ import annotations

import contextlib
import os

_enabled = os.environ.get("MTJAX_RUNTIME_CHECKS", "1").lower() not in ("0", "false", "no", "off")


def runtime_checks_enabled() -> bool:
  """Whether traced code includes the jit-safe NaN/inf and validity checks (default True)."""
  return _enabled


def set_runtime_checks(enabled: bool) -> None:
  """Turns the in-graph checks of traced code on or off (see the module docstring)."""
  global _enabled
  _enabled = bool(enabled)


@contextlib.contextmanager
def runtime_checks(enabled: bool):
  """Context manager form of :func:`set_runtime_checks` (restores the previous value).

  Example:
    >>> import mtjax
    >>> with mtjax.runtime_checks(False):
    ...   mtjax.runtime_checks_enabled()
    False
  """
  global _enabled
  previous = _enabled
  _enabled = bool(enabled)
  try:
    yield
  finally:
    _enabled = previous
