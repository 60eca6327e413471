"""The machine a benchmark ran on, printed with its figures.

Ratios between two frameworks (or two kernels) move with the CPU: the same FLOPs run through
different matrix-product libraries (XLA:CPU's against PyTorch's), and their relative speed is
not the same on every processor. Every benchmark prints this line so that a recorded table says
which processor it came from.
"""

from __future__ import annotations

import os
import platform
import time


def _cpuinfo(key: str) -> str:
  """The first ``key : value`` line of ``/proc/cpuinfo`` (its value), or ``""`` off Linux."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(key):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def cpu_model() -> str:
  """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
  return _cpuinfo("model name") or platform.processor() or "unknown processor"


def vector_isa() -> str:
  """The widest x86 vector extension the processor reports (``AVX-512``, ``AVX2``), or ``""``."""
  flags = set(_cpuinfo("flags").split())
  return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""


def describe() -> str:
  """``"host: <model> (<arch>, <n> CPUs, <ISA>), <date>"``."""
  parts = [platform.machine(), f"{os.cpu_count()} CPUs"]
  isa = vector_isa()
  if isa:
    parts.append(isa)
  return f"host: {cpu_model()} ({', '.join(parts)}), {time.strftime('%Y-%m-%d')}"


if __name__ == "__main__":
  print(describe())
