"""MultiTaskDataset and batching: validation, subsets/splits, epoch permutations, resumption."""

import json
import tracemalloc

import numpy as np
import pytest

from mtjax import data
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec


def _toy(n=23, with_masks=True):
  rng = np.random.default_rng(0)
  feats = {"c": rng.integers(0, 5, n).astype(np.int32), "d": rng.standard_normal((n, 3)).astype(np.float32)}
  spec = FeatureSpec(categorical=(Categorical("c", 5),), dense=(Dense("d", 3),))
  labels = rng.integers(0, 2, (2, n)).astype(np.float32)
  masks = np.stack([np.ones(n, bool), labels[0] > 0]) if with_masks else None
  return data.MultiTaskDataset(
    features=feats, labels=labels, task_names=("a", "b"), spec=spec, masks=masks, extras={"row": np.arange(n)}
  )


def test_validation_errors():
  ok = dict(features=np.zeros((4, 2)), labels=np.zeros((2, 4)), task_names=("a", "b"))
  data.MultiTaskDataset(**ok)
  with pytest.raises(ValueError, match="labels must be"):
    data.MultiTaskDataset(**{**ok, "labels": np.zeros(4)})
  with pytest.raises(ValueError, match="task_names"):
    data.MultiTaskDataset(**{**ok, "task_names": ("a",)})
  with pytest.raises(ValueError, match="masks"):
    data.MultiTaskDataset(**ok, masks=np.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    data.MultiTaskDataset(**{**ok, "features": np.zeros((5, 2))})
  with pytest.raises(ValueError, match="leading axis"):
    data.MultiTaskDataset(**ok, extras={"g": np.zeros(3)})
  with pytest.raises(ValueError, match="task_types"):
    data.MultiTaskDataset(**ok, task_types=("binary", "ranking"))
  spec = FeatureSpec(categorical=(Categorical("c", 3),))
  with pytest.raises(ValueError, match="not in features"):
    data.MultiTaskDataset(**{**ok, "features": {"x": np.zeros(4, np.int32)}}, spec=spec)
  with pytest.raises(ValueError, match="integer ids"):
    data.MultiTaskDataset(**{**ok, "features": {"c": np.zeros(4)}}, spec=spec)


def test_dtypes_subset_and_split():
  ds = _toy()
  assert ds.labels.dtype == np.float32 and ds.masks.dtype == bool and len(ds) == 23 and ds.num_tasks == 2
  idx = np.array([5, 0, 7])
  sub = ds.subset(idx)
  np.testing.assert_array_equal(sub.labels, ds.labels[:, idx])
  np.testing.assert_array_equal(sub.masks, ds.masks[:, idx])
  np.testing.assert_array_equal(sub.features["d"], ds.features["d"][idx])
  np.testing.assert_array_equal(sub.extras["row"], idx)
  assert sub.spec == ds.spec and sub.task_names == ds.task_names
  mask = np.zeros(23, bool)
  mask[[3, 4]] = True
  np.testing.assert_array_equal(ds.subset(mask).extras["row"], [3, 4])
  np.testing.assert_array_equal(ds.subset(slice(2, 5)).extras["row"], [2, 3, 4])

  parts = ds.split((0.6, 0.2, 0.2), seed=3)
  assert [len(p) for p in parts] == [14, 4, 5]  # round(0.6*23)=14, round(0.8*23)=18
  rows = np.concatenate([p.extras["row"] for p in parts])
  np.testing.assert_array_equal(rows, np.random.default_rng(3).permutation(23))
  a, b = ds.split((0.5, 0.25))  # fractions summing to < 1 leave the rest out
  np.testing.assert_array_equal(np.concatenate([a.extras["row"], b.extras["row"]]), np.arange(17))
  with pytest.raises(ValueError, match="fractions"):
    ds.split((0.8, 0.4))


def test_batch_dict_layout():
  ds = _toy()
  b = ds.batch(np.array([1, 2]))
  assert set(b) == {"x", "labels", "mask"}
  assert b["labels"].shape == (2, 2) and b["mask"].shape == (2, 2) and b["x"]["d"].shape == (2, 3)
  assert set(ds.batch(np.array([1]), include_extras=True)) == {"x", "labels", "mask", "extras"}
  assert "mask" not in _toy(with_masks=False).batch(np.array([0]))


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_each_epoch_is_a_permutation(drop_remainder):
  ds = _toy()
  seen = []
  for epoch in range(3):
    rows = [
      b["extras"]["row"]
      for b in data.batches(ds, 5, seed=7, epoch=epoch, drop_remainder=drop_remainder, include_extras=True)
    ]
    assert len(rows) == (4 if drop_remainder else 5)
    assert all(len(r) == 5 for r in rows[:4])
    order = np.concatenate(rows)
    expected = np.random.default_rng((7, epoch)).permutation(23)  # independent reference of the order
    np.testing.assert_array_equal(order, expected[: len(order)])
    if not drop_remainder:
      np.testing.assert_array_equal(np.sort(order), np.arange(23))
    else:
      assert len(np.unique(order)) == 20
    seen.append(order)
  assert not np.array_equal(seen[0], seen[1])


def test_batch_contents_match_rows():
  ds = _toy()
  for b in data.batches(ds, 4, seed=1, epoch=2, include_extras=True):
    r = b["extras"]["row"]
    np.testing.assert_array_equal(b["x"]["c"], ds.features["c"][r])
    np.testing.assert_array_equal(b["x"]["d"], ds.features["d"][r])
    np.testing.assert_array_equal(b["labels"], ds.labels[:, r])
    np.testing.assert_array_equal(b["mask"], ds.masks[:, r])


def test_unshuffled_batches_are_views_in_order():
  ds = _toy()
  bs = list(data.batches(ds, 10, shuffle=False, drop_remainder=False))
  assert np.shares_memory(bs[0]["x"]["d"], ds.features["d"])
  np.testing.assert_array_equal(np.concatenate([b["labels"] for b in bs], axis=1), ds.labels)


def test_batches_do_not_copy_the_dataset():
  n, d = 200_000, 25  # 20 MB of features
  ds = data.MultiTaskDataset(
    features=np.ones((n, d), np.float32), labels=np.zeros((2, n), np.float32), task_names=("a", "b")
  )
  it = data.batches(ds, 64, seed=0, epoch=1)
  tracemalloc.start()
  try:
    for _ in range(3):
      b = next(it)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert b["x"].shape == (64, d)
  # the epoch permutation (n int64 = 1.6 MB) plus three small batches; a full copy would be 20 MB
  assert peak < 4_000_000, peak


def test_batch_errors():
  ds = _toy()
  with pytest.raises(ValueError, match="no batch"):
    list(data.batches(ds, 24))
  assert len(list(data.batches(ds, 24, drop_remainder=False))) == 1
  with pytest.raises(ValueError, match="batch_size"):
    list(data.batches(ds, 0))


@pytest.mark.parametrize("stop_at", [0, 3, 4, 9])
def test_batch_iterator_resumes_exactly(stop_at):
  ds = _toy()
  ref_it = data.BatchIterator(ds, 5, seed=11, include_extras=True)
  reference = [next(ref_it)["extras"]["row"] for _ in range(12)]  # 3 epochs of 4 batches
  # the iterator follows batches() epoch by epoch
  flat = [b["extras"]["row"] for e in range(3) for b in data.batches(ds, 5, seed=11, epoch=e, include_extras=True)]
  for r, f in zip(reference, flat):
    np.testing.assert_array_equal(r, f)

  it = data.BatchIterator(ds, 5, seed=11, include_extras=True)
  got = [next(it)["extras"]["row"] for _ in range(stop_at)]
  state = json.loads(json.dumps(it.state()))  # survives a JSON checkpoint
  assert state["epoch"] == stop_at // 4 and state["position"] == stop_at % 4
  assert it.step == stop_at
  resumed = data.BatchIterator(ds, 5, seed=11, include_extras=True).restore(state)
  got += [next(resumed)["extras"]["row"] for _ in range(12 - stop_at)]
  for r, g in zip(reference, got):
    np.testing.assert_array_equal(r, g)


def test_batch_iterator_epochs_and_restore_checks():
  ds = _toy()
  it = data.BatchIterator(ds, 10, seed=0, num_epochs=2)
  assert it.steps_per_epoch == 2 and len(list(it)) == 4
  it = data.BatchIterator(ds, 10, seed=0, drop_remainder=False, num_epochs=1)
  assert [b["labels"].shape[1] for b in it] == [10, 10, 3]
  state = data.BatchIterator(ds, 10, seed=0).state()
  with pytest.raises(ValueError, match="seed"):
    data.BatchIterator(ds, 10, seed=1).restore(state)
  with pytest.raises(ValueError, match="batch_size"):
    data.BatchIterator(ds, 5, seed=0).restore(state)
  with pytest.raises(ValueError, match="out of range"):
    data.BatchIterator(ds, 10, seed=0).restore({**state, "position": 5})
