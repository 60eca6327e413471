"""Out-of-core data: streaming throughput against the training step, and peak memory (issue #15).

One run, each measured phase in its own process (so that its peak RSS is its own):

1. ``generate``: an AliExpress-format ``train.csv`` of ``--rows`` rows (the real header and columns:
   ``search_id``, 16 categorical ids, 63 numerical values, ``click``, ``conversion``) and a small
   ``test.csv``, written by :func:`mtjax.data.write_aliexpress_csv`.
2. ``convert``: :func:`mtjax.data.aliexpress_to_store` (streaming, chunk by chunk) into a store:
   rows/s and peak RSS.
3. ``formats``: why row-major records read with ``pread``: the time to gather one shuffled batch of
   ``--batch`` random rows from the store, against the same rows from a Parquet file of the same
   data (``--parquet-rows`` rows, row groups of 65,536; pyarrow reads the row groups that hold the
   rows, then takes them), and against a gather through a memory map of the record file (its time
   and how much the process's resident set grows).
4. ``loader``: :class:`mtjax.data.PrefetchIterator` alone over the store (what ``fit`` uses):
   samples/s and peak RSS.
5. ``train``: :func:`mtjax.training.fit` on the store (MMoE, 8 experts [256, 128], towers [64, 1],
   the AliExpress features embedded 8-d, batch ``--batch``) with the summed loss (``linear``, the
   fastest step: the most demanding consumer) and with PCGrad, ``--steps`` steps each: the median
   step time (compute only), the median wall time from one step to the next including waiting for
   data and logging (the loader is the bottleneck only if this is well above the step time),
   samples/s consumed,
   and the process's peak RSS (``ru_maxrss``: includes the mapped pages of the store's files).
6. ``memory``: the in-memory path for comparison: peak RSS of ``mtjax.data.aliexpress`` loading the
   first ``--memory-rows`` rows, extrapolated per row to ``--rows``.

Usage:
  python benchmarks/data_throughput.py --rows 20000000 --dir /tmp/mtjax_throughput   # ~10 GB CSV, ~7 GB store
  python benchmarks/data_throughput.py --rows 200000 --steps 50                       # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import _host  # the benchmarks' folder: sys.path[0] when run as a script


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _country(root: str) -> str:
  return os.path.join(root, "AliExpress_XX")


def phase_generate(args) -> dict:
  from mtjax import data

  folder = _country(args.dir)
  os.makedirs(folder, exist_ok=True)
  t = time.perf_counter()
  data.write_aliexpress_csv(os.path.join(folder, "train.csv"), args.rows, seed=0)
  seconds = time.perf_counter() - t
  data.write_aliexpress_csv(os.path.join(folder, "test.csv"), max(10_000, args.rows // 100), seed=1)
  size = os.path.getsize(os.path.join(folder, "train.csv"))
  return {"rows": args.rows, "seconds": seconds, "rows_per_s": args.rows / seconds, "csv_gib": size / 2**30}


def phase_convert(args) -> dict:
  from mtjax import data

  store = os.path.join(args.dir, "store")
  t = time.perf_counter()
  data.aliexpress_to_store(_country(args.dir), store, overwrite=True)
  seconds = time.perf_counter() - t
  size = sum(
    os.path.getsize(os.path.join(dp, f)) for dp, _, files in os.walk(os.path.join(store, "train")) for f in files
  )
  return {
    "seconds": seconds,
    "rows_per_s": args.rows / seconds,
    "store_gib": size / 2**30,
    "peak_rss_mib": peak_rss_mib(),
  }


def phase_formats(args) -> dict:
  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq

  from mtjax import data

  st = data.open_store(os.path.join(args.dir, "store"))["train"]
  n = min(args.parquet_rows, len(st))
  rng = np.random.default_rng(0)
  part = st.batch(slice(0, n))
  cols = {k: v for k, v in part["x"].items() if v.ndim == 1}
  cols.update({f"numerical_{j + 1}": part["x"]["numerical"][:, j] for j in range(part["x"]["numerical"].shape[1])})
  cols.update({"click": part["labels"][0], "conversion": part["labels"][1]})
  file = os.path.join(args.dir, "sample.parquet")
  pq.write_table(pa.table(cols), file, row_group_size=65536)
  pf = pq.ParquetFile(file)
  starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
  times = {"store": [], "parquet": []}
  for _ in range(args.format_rounds):
    idx = np.sort(rng.choice(n, args.batch, replace=False))
    t = time.perf_counter()
    st.batch(idx)
    times["store"].append(time.perf_counter() - t)
    t = time.perf_counter()
    groups = np.unique(np.searchsorted(starts, idx, side="right") - 1)
    table = pf.read_row_groups(groups.tolist())
    offsets = np.concatenate([[0], np.cumsum([starts[g + 1] - starts[g] for g in groups])])
    local = np.concatenate(
      [idx[(idx >= starts[g]) & (idx < starts[g + 1])] - starts[g] + offsets[k] for k, g in enumerate(groups)]
    )
    table.take(pa.array(local))
    times["parquet"].append(time.perf_counter() - t)
  os.remove(file)
  # the same kind of gather through a memory map of the record file, over all rows: the resident set grows
  # by whole page-cache folios per touched row (why the store reads records with pread)
  reader = st._reader()  # pylint: disable=protected-access
  mapped = np.memmap(reader.file, dtype=reader.dtype, mode="r", shape=(len(st),))
  idx = np.sort(rng.choice(len(st), args.batch, replace=False))
  before = _vm_rss_mib()
  t = time.perf_counter()
  np.asarray(mapped[idx])
  mmap_ms = 1e3 * (time.perf_counter() - t)
  grown = _vm_rss_mib() - before
  return {k: 1e3 * statistics.median(v) for k, v in times.items()} | {
    "rows": n,
    "mmap_ms": mmap_ms,
    "mmap_rss_growth_mib": grown,
  }


def _vm_rss_mib() -> float:
  with open("/proc/self/status") as f:
    return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def phase_loader(args) -> dict:
  from mtjax import data

  st = data.open_store(os.path.join(args.dir, "store"))["train"]
  it = data.PrefetchIterator(st, args.batch, seed=0)
  next(it)
  times = []
  for _ in range(args.loader_batches):
    t = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - t)
  it.close()
  total = sum(times)
  return {
    "samples_per_s": args.batch * len(times) / total,
    "ms_per_batch": 1e3 * total / len(times),
    "peak_rss_mib": peak_rss_mib(),
  }


def phase_train(args) -> dict:
  import optax

  import mtjax
  from mtjax import data
  from mtjax import models
  from mtjax.training import fit

  st = data.open_store(os.path.join(args.dir, "store"))["train"]
  model = models.get("mmoe", num_tasks=2, features=st.spec, num_experts=8, expert=(256, 128), tower=(64, 1))
  method = {"linear": mtjax.linear, "pcgrad": mtjax.pcgrad}[args.method](num_tasks=2)
  stamps = []  # one per step, when fit logs it: the wall time between steps includes waiting for data
  res = fit(
    model,
    optax.chain(method, optax.adam(1e-3)),
    st,
    steps=args.steps,
    batch_size=args.batch,
    progress=False,
    track_similarity=False,
    log_every=1,
    writers=[lambda record: stamps.append(time.perf_counter())],
  )
  wall = statistics.median(list(map(lambda a, b: b - a, stamps[5:-1], stamps[6:])))
  return {
    "method": args.method,
    "ms_per_step": res.ms_per_step,
    "wall_ms_per_step": 1e3 * wall,
    "samples_per_s": args.batch / (res.ms_per_step / 1e3),
    "peak_rss_mib": peak_rss_mib(),
  }


def phase_memory(args) -> dict:
  from mtjax import data

  src = _country(args.dir)
  sub = os.path.join(args.dir, "memory", "AliExpress_XX")
  os.makedirs(sub, exist_ok=True)
  with open(os.path.join(src, "train.csv"), "rb") as f, open(os.path.join(sub, "train.csv"), "wb") as g:
    for i, line in enumerate(f):
      if i > args.memory_rows:
        break
      g.write(line)
  before = peak_rss_mib()
  splits = data.aliexpress(sub)
  n = len(splits["train"])
  per_row = (peak_rss_mib() - before) * 2**20 / n
  return {
    "rows": n,
    "peak_rss_mib": peak_rss_mib(),
    "bytes_per_row": per_row,
    "extrapolated_gib": per_row * args.rows / 2**30,
  }


PHASES = {
  "generate": phase_generate,
  "convert": phase_convert,
  "formats": phase_formats,
  "loader": phase_loader,
  "train": phase_train,
  "memory": phase_memory,
}


def _child(args, phase: str, extra=()) -> dict:
  cmd = [sys.executable, __file__, "--phase", phase, "--dir", args.dir, "--rows", str(args.rows)]
  cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--parquet-rows", str(args.parquet_rows)]
  cmd += ["--memory-rows", str(args.memory_rows), "--loader-batches", str(args.loader_batches), *extra]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=20_000_000)
  p.add_argument("--dir", default="/tmp/mtjax_throughput")
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--parquet-rows", type=int, default=1_000_000)
  p.add_argument("--format-rounds", type=int, default=30)
  p.add_argument("--memory-rows", type=int, default=500_000)
  p.add_argument("--loader-batches", type=int, default=300)
  p.add_argument("--method", default="linear")
  p.add_argument("--keep", action="store_true", help="keep the generated files")
  p.add_argument("--reuse", action="store_true", help="reuse a generated CSV and store in --dir")
  p.add_argument("--reuse-csv", action="store_true", help="reuse a generated CSV in --dir, convert it again")
  p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.phase:
    print(json.dumps(PHASES[args.phase](args)))
    return
  import jax

  print(f"# data_throughput: {args.rows:,} AliExpress-format rows, batch {args.batch}; jax {jax.__version__}")
  print(f"# {_host.describe()}")
  res = {}
  if not (args.reuse or args.reuse_csv):
    shutil.rmtree(args.dir, ignore_errors=True)
    res["generate"] = _child(args, "generate")
    print(f"generated: {res['generate']}", flush=True)
  if not args.reuse:
    res["convert"] = _child(args, "convert")
    print(f"converted: {res['convert']}", flush=True)
  res["formats"] = _child(args, "formats")
  print(f"formats: {res['formats']}", flush=True)
  res["loader"] = _child(args, "loader")
  print(f"loader: {res['loader']}", flush=True)
  for method in ("linear", "pcgrad"):
    res[f"train_{method}"] = _child(args, "train", ["--method", method])
    print(f"train {method}: {res[f'train_{method}']}", flush=True)
  res["memory"] = _child(args, "memory")
  print(f"memory: {res['memory']}", flush=True)

  g, c, f, lo, m = (res.get(k, {}) for k in ("generate", "convert", "formats", "loader", "memory"))
  print()
  print("| phase | figure |")
  print("|---|---|")
  if g:
    print(f"| generate the CSV | {g['csv_gib']:.1f} GiB, {g['rows_per_s']:,.0f} rows/s |")
  if c:
    print(
      f"| convert to a store (streaming) | {c['rows_per_s']:,.0f} rows/s, store {c['store_gib']:.1f} GiB, "
      f"peak RSS {c['peak_rss_mib']:,.0f} MiB |"
    )
  print(
    f"| gather {args.batch} random rows | store (records, pread) {f['store']:.2f} ms; "
    f"Parquet (row groups of 65,536) {f['parquet']:.1f} ms; the records through a memory map "
    f"{f['mmap_ms']:.1f} ms, resident set +{f['mmap_rss_growth_mib']:,.0f} MiB |"
  )
  print(
    f"| PrefetchIterator alone | {lo['samples_per_s']:,.0f} samples/s ({lo['ms_per_batch']:.2f} ms a batch), "
    f"peak RSS {lo['peak_rss_mib']:,.0f} MiB |"
  )
  for method in ("linear", "pcgrad"):
    t = res[f"train_{method}"]
    print(
      f"| fit, {method} | step {t['ms_per_step']:.1f} ms = {t['samples_per_s']:,.0f} samples/s consumed; wall "
      f"{t['wall_ms_per_step']:.1f} ms a step; peak RSS {t['peak_rss_mib']:,.0f} MiB |"
    )
  print(
    f"| in memory (mtjax.data.aliexpress) | {m['bytes_per_row']:,.0f} bytes a row ({m['rows']:,} rows, peak RSS "
    f"{m['peak_rss_mib']:,.0f} MiB): {m['extrapolated_gib']:.1f} GiB for {args.rows:,} rows |"
  )
  if not args.keep:
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
