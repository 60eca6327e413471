"""Records the suite's per-test durations into ``tests/durations.json``, which sets the quick tier.

The quick tier (``python -m pytest -n 2 -m "not slow"``) leaves out every test marked ``slow``:
those marked in their file, and those whose recorded time (setup + call + teardown) is above
``QUICK_SECONDS`` in ``tests/durations.json`` (``conftest.py`` adds the marker at collection). A
test that is not in the file (a new one) is in the quick tier until the file is recorded again.

Record it from a full run, either with the times the test configuration writes::

    MTJAX_RECORD_DURATIONS=/tmp/durations.jsonl python -m pytest -n 2 -q
    python tests/record_durations.py /tmp/durations.jsonl

or from a ``--durations=0`` report (``python -m pytest -n 2 -q --durations=0 > /tmp/durations.log``).

Times depend on the machine and its load; what matters is their order: re-record after adding
slow tests, then check the quick tier's wall time (target: under 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import sys

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(tests/\S+)\s*$")


def parse(text: str) -> dict[str, float]:
  """``{node id: seconds}`` summed over setup, call and teardown, from a ``--durations=0`` report or
  the JSON lines that ``MTJAX_RECORD_DURATIONS=FILE`` makes ``conftest.py`` write."""
  out: dict[str, float] = {}
  for line in text.splitlines():
    if line.startswith("{"):
      rec = json.loads(line)
      out[rec["nodeid"]] = out.get(rec["nodeid"], 0.0) + float(rec["seconds"])
      continue
    m = LINE.match(line)
    if m:
      out[m.group(3)] = out.get(m.group(3), 0.0) + float(m.group(1))
  return out


def load(path: str = PATH) -> dict[str, float]:
  """The recorded durations, ``{}`` without a file."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)["tests"]


def main(argv) -> int:
  if len(argv) != 2:
    print(__doc__)
    return 2
  with open(argv[1], encoding="utf-8") as f:
    durations = parse(f.read())
  if not durations:
    print(f"no '--durations=0' lines in {argv[1]}")
    return 1
  # A run of one tier (CI leaves out the extended tests) keeps the other tests' earlier times.
  merged = {**load(), **durations}
  with open(PATH, "w", encoding="utf-8") as f:
    json.dump(
      {"source": os.path.basename(argv[1]), "tests": {k: round(v, 2) for k, v in sorted(merged.items())}},
      f,
      indent=0,
    )
    f.write("\n")
  print(f"{len(durations)} tests, {sum(durations.values()):.0f} s in all ({len(merged)} recorded) -> {PATH}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
