"""On-disk stores (mtjax.data.write_store / open_store / StoredDataset) and grain's PrefetchIterator.

The contract: a stored dataset gives bit-identical batches to the in-memory one for the same seed
(so ``fit`` trains to bit-identical parameters and resumes exactly), damaged or unfinished stores
are refused with the file named, and the streaming iterator is BatchIterator's sequence.
"""

import dataclasses
import os
import pickle

import jax
import numpy as np
import optax
import pytest

import mtjax
from mtjax import data
from mtjax import models
from mtjax.training import fit


def _weighted_funnel(n=600):
  ds = data.funnel_synthetic(n, seed=0)
  rng = np.random.default_rng(1)
  return dataclasses.replace(
    ds,
    weights=rng.random(n).astype(np.float32),
    extras={**ds.extras, "day": rng.integers(0, 7, n).astype(np.int16)},
  )


def _same_batch(a, b):
  assert sorted(a) == sorted(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["dict", "dense"])
def test_store_batches_equal_the_in_memory_dataset(tmp_path, kind):
  ds = _weighted_funnel() if kind == "dict" else data.mmoe_synthetic(500, 0.5, dim=6, seed=0)
  path = data.write_store({"train": ds, "test": ds.subset(np.arange(50))}, tmp_path / "s", chunk_rows=128)
  splits = data.open_store(path, verify=True)
  assert sorted(splits) == ["test", "train"]
  st = splits["train"]
  assert isinstance(st, data.StoredDataset) and isinstance(st, data.MultiTaskDataset)
  assert len(st) == len(ds) and st.task_names == ds.task_names and st.task_types == ds.task_types
  assert st.spec == ds.spec
  for a, b in zip(data.batches(ds, 64, seed=3, include_extras=True), data.batches(st, 64, seed=3, include_extras=True)):
    _same_batch(a, b)
  np.testing.assert_array_equal(np.asarray(st.labels), ds.labels)
  _same_batch(st.to_memory().batch(np.arange(len(ds))), ds.batch(np.arange(len(ds))))
  # a split of a store is a view on the same files, with the in-memory split's samples
  for part, ref in zip(st.split((0.7, 0.3), seed=5, stratify=True), ds.split((0.7, 0.3), seed=5, stratify=True)):
    assert isinstance(part, data.StoredDataset) and part.rows is not None
    _same_batch(
      part.batch(np.arange(len(ref)), include_extras=True), ref.batch(np.arange(len(ref)), include_extras=True)
    )
    again = pickle.loads(pickle.dumps(part))  # what a grain worker process receives
    _same_batch(again.batch(np.arange(9)), ref.batch(np.arange(9)))


def test_metadata_arrays_survive_the_store(tmp_path):
  ds = dataclasses.replace(
    data.mmoe_synthetic(40, 0.5, dim=3, seed=0), metadata={"name": "x", "vocab": np.arange(5), "scale": np.float32(2.0)}
  )
  st = data.open_store(data.write_store(ds, tmp_path / "s"))
  assert st.metadata["name"] == "x" and st.metadata["scale"] == 2.0
  np.testing.assert_array_equal(st.metadata["vocab"], np.arange(5))


def test_damaged_and_unfinished_stores_are_refused(tmp_path):
  ds = _weighted_funnel(200)
  path = data.write_store(ds, tmp_path / "s")
  with pytest.raises(data.StoreError, match="exists; pass overwrite"):
    data.write_store(ds, path)
  file = os.path.join(path, "rows.bin")  # the records: features, labels, masks, weights of each sample
  raw = open(file, "rb").read()
  with open(file, "r+b") as f:  # one flipped byte: sizes agree, the checksum does not
    f.seek(17)
    f.write(bytes([raw[17] ^ 0xFF]))
  data.open_store(path)  # sizes only
  with pytest.raises(data.StoreError, match=r"rows\.bin.*CRC32"):
    data.open_store(path, verify=True)
  with open(file, "r+b") as f:
    f.truncate(len(raw) - 4)
  with pytest.raises(data.StoreError, match=rf"rows\.bin.*has {len(raw) - 4} bytes.*{len(raw)} bytes"):
    data.open_store(path)
  os.remove(os.path.join(path, "manifest.json"))
  with pytest.raises(data.StoreError, match="holds no mtjax store"):
    data.open_store(path)
  # a conversion killed mid-way leaves only a .partial folder, refused by name
  w = data.StoreWriter(tmp_path / "half" / "train", task_names=ds.task_names)
  w.append(ds.features, ds.labels)
  with pytest.raises(data.StoreError, match="unfinished split.*train"):
    data.open_store(tmp_path / "half")
  w.abort()
  assert not os.path.exists(tmp_path / "half" / "train.partial")


def test_store_writer_refuses_inconsistent_chunks(tmp_path):
  with data.StoreWriter(tmp_path / "a", task_names=("t",)) as w:
    w.append({"f": np.zeros(3, np.int32)}, np.zeros((1, 3)))
    with pytest.raises(data.StoreError, match="same keys, dtypes and shapes"):
      w.append({"f": np.zeros(3, np.int64)}, np.zeros((1, 3)))
    with pytest.raises(data.StoreError, match="same keys"):
      w.append({"f": np.zeros(3, np.int32), "g": np.zeros(3)}, np.zeros((1, 3)))
    with pytest.raises(data.StoreError, match=r"labels must be \[T=1, n\]"):
      w.append({"f": np.zeros(3, np.int32)}, np.zeros((2, 3)))
  assert len(data.open_store(tmp_path / "a")) == 3
  with pytest.raises(data.StoreError, match="no rows"), data.StoreWriter(tmp_path / "b", task_names=("t",)):
    pass
  assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("options", [{"num_threads": 0}, {"num_threads": 2, "prefetch": 3}])
def test_prefetch_iterator_is_batch_iterator(tmp_path, options):
  ds = _weighted_funnel(300)
  st = data.open_store(data.write_store(ds, tmp_path / "s"))
  for parts in (1, 2):
    for p in range(parts):
      kw = {"seed": 4, "process_index": p, "process_count": parts}
      ref = data.BatchIterator(ds, 64, **kw)
      expected = [next(ref) for _ in range(12)]  # 4 batches an epoch: three epochs
      it = data.PrefetchIterator(st, 64, **kw, **options)
      got = [next(it) for _ in range(5)]
      state = it.state()
      it.close()
      assert state == ref.state() | {"epoch": 1, "position": 1}
      resumed = data.PrefetchIterator(st, 64, **kw, **options).restore(state)
      got += [next(resumed) for _ in range(7)]
      resumed.close()
      for a, b in zip(expected, got):
        assert a["x"]["user"].shape == (64 // parts,)
        _same_batch(a, b)
  assert isinstance(data.batch_iterator(st, 8), data.PrefetchIterator)
  assert isinstance(data.batch_iterator(ds, 8, num_threads=3), data.BatchIterator)
  it = data.PrefetchIterator(st, 100, num_epochs=2)
  assert len(list(it)) == 6


def test_fit_on_a_store_trains_and_resumes_like_in_memory(tmp_path):
  ds = _weighted_funnel(800)
  st = data.open_store(data.write_store(ds, tmp_path / "s"))
  model = models.get("mmoe", num_tasks=2, features=ds.spec, num_experts=2, expert=(8,), tower=(4, 1))
  tx = lambda: optax.chain(mtjax.mgda(), optax.adam(1e-2))
  kw = dict(steps=14, batch_size=96, seed=0, progress=False, track_similarity=False)
  memory = fit(model, tx(), ds, **kw)
  stored = fit(model, tx(), st, **kw)
  out = str(tmp_path / "run")
  fit(model, tx(), st, **kw, out_dir=out, checkpoint_every=5, stop_after=8)  # killed after step 8
  resumed = fit(model, tx(), st, **kw, out_dir=out, checkpoint_every=5)  # from the checkpoint of step 5
  for other in (stored, resumed):
    jax.tree.map(np.testing.assert_array_equal, memory.state.params, other.state.params)


def test_a_config_trains_from_a_store_like_from_memory(tmp_path):
  from mtjax import experiment
  from mtjax.experiment import _runner

  full = data.funnel_synthetic(1500, seed=0)
  train, test = full.split((0.8, 0.2), seed=0)
  folder = data.write_store({"train": train, "test": test}, tmp_path / "funnel_store")
  raw = {
    "data": {"name": "store", "path": str(folder)},
    "model": {"name": "mmoe", "num_experts": 2, "expert": [8], "tower": [4, 1]},
    "method": {"name": "pcgrad"},
    "train": {"steps": 6, "batch_size": 64, "eval_every": 0},
  }
  cfg = experiment.from_dict(raw)
  splits = _runner.load_data(cfg)
  assert all(isinstance(s, data.StoredDataset) for s in splits)
  on_disk = _runner.run(cfg, progress=False, plots=False)
  in_memory = _runner.run(cfg, progress=False, plots=False, data=tuple(s.to_memory() for s in splits))
  assert on_disk.test == in_memory.test
  np.testing.assert_array_equal([r["losses"] for r in on_disk.history], [r["losses"] for r in in_memory.history])


def test_mtjax_convert_writes_the_runner_splits(tmp_path, capsys):
  from mtjax import cli
  from mtjax.experiment import _runner

  (tmp_path / "exp.toml").write_text('[data]\nname = "funnel"\nnum_samples = 900\n[model]\nname = "mmoe"\n')
  assert cli.main(["convert", str(tmp_path / "exp.toml"), str(tmp_path / "st")]) == 0
  assert 'name = "store"' in capsys.readouterr().out
  stored = _runner.load_splits({"name": "store", "path": str(tmp_path / "st")})
  for a, b in zip(stored, _runner.load_splits({"name": "funnel", "num_samples": 900})):
    _same_batch(a.batch(np.arange(len(b))), b.batch(np.arange(len(b))))
  assert cli.main(["convert", str(tmp_path / "exp.toml"), str(tmp_path / "st")]) == 2  # exists
  assert "--overwrite" in capsys.readouterr().err


WORKERS_SCRIPT = """
import gc, sys
import numpy as np
from mtjax import data

if __name__ == "__main__":
  ds = data.funnel_synthetic(2000, seed=0)
  stored = data.open_store(sys.argv[1])
  ref = data.BatchIterator(ds, 64, seed=2)
  it = data.PrefetchIterator(stored, 64, seed=2, workers=2)
  same = True
  for _ in range(40):  # more than an epoch (31 batches)
    a, b = next(it), next(ref)
    same &= all(np.array_equal(np.asarray(a["x"][k]), b["x"][k]) for k in b["x"])
    same &= np.array_equal(np.asarray(a["labels"]), b["labels"])
  del a
  it.close()
  gc.collect()
  print("same" if same else "DIFFERENT")
"""


def test_prefetch_worker_processes_give_the_same_batches(tmp_path):
  """grain worker processes (each re-opens the store from its pickled path) yield BatchIterator's sequence."""
  import subprocess
  import sys

  data.write_store(data.funnel_synthetic(2000, seed=0), tmp_path / "s")
  (tmp_path / "w.py").write_text(WORKERS_SCRIPT)
  out = subprocess.run(
    [sys.executable, str(tmp_path / "w.py"), str(tmp_path / "s")], capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "same"
  assert "leaked" not in out.stderr  # grain's shared memory is released


def _resident_mib() -> float:
  with open("/proc/self/status") as f:
    return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from /proc (Linux)")
def test_random_batches_do_not_grow_the_resident_set(tmp_path):
  """Shuffled batches over a 96 MiB store leave the process's resident memory where it was: records are
  copied with pread, not gathered through a memory map (which maps whole page-cache folios per touched
  row and grew the process by ~1.5 GiB for one 1,024-row batch of a 5 GiB file)."""
  n, dim = 400_000, 63
  path = tmp_path / "big"
  with data.StoreWriter(path, task_names=("a", "b")) as w:
    rng = np.random.default_rng(0)
    for _ in range(4):
      m = n // 4
      w.append(rng.random((m, dim), dtype=np.float32), rng.integers(0, 2, (2, m)).astype(np.float32))
  assert os.path.getsize(path / "rows.bin") == n * (dim + 2) * 4
  st = data.open_store(path)
  it = data.BatchIterator(st, 1024, seed=0)
  next(it)
  before = _resident_mib()
  for _ in range(60):  # 61,440 random rows: with a memory map, most of the file's pages
    batch = next(it)
  assert batch["x"].shape == (1024, dim)
  assert _resident_mib() - before < 32
