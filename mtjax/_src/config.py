"""Global switch: runtime finiteness / validity checks under ``jit``.

Under ``jit`` every transform update (and a feature embedding with ``oov="error"``) tests its
checks on device in ONE ``lax.cond``; only the failing branch calls the host, through a pure
callback that raises the ``ValueError`` (see ``mtjax._src.numerics.enforce``). Measured in
``benchmarks/step_time.py`` on a 2-core CPU, the checks add about 2-3 ms (~4%) to an MMoE
training step of ~55 ms. (``jax.debug.callback`` would cost 4 ms per callback there, because any
side-effecting op makes XLA:CPU run the whole program in sequence; hence the pure callback.)

Loops that do not want even that can switch the in-graph checks off: the switch is read when a
function is *traced*, so set it before ``jit`` compiles the step. Checks on concrete (non-traced)
values always run. The environment variable ``MTJAX_RUNTIME_CHECKS=0`` turns them off for a whole
process. ``mtjax.training.fit`` keeps them on and also checks every step's losses on the host.
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
