"""Loaders of the public formats, on fixture files written in the exact formats
(tests/data/fixtures/make_fixtures.py), against independent plain-Python parses."""

import collections
import csv
import filecmp
import importlib.util
import os

import numpy as np
import pytest

from mtjax import data

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_fixtures_match_their_generator(tmp_path):
  spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIX, "make_fixtures.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.main(str(tmp_path))
  made = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
  assert len(made) == 12
  for rel in made:
    assert filecmp.cmp(os.path.join(tmp_path, rel), os.path.join(FIX, rel), shallow=False), rel
  total = sum(os.path.getsize(os.path.join(FIX, rel)) for rel in made)
  assert total < 200_000


# ------------------------------------------------------------------------------------ Census


def _census_rows(name):
  with open(os.path.join(FIX, "census", name)) as fh:
    return [[v.strip() for v in line.rstrip("\n").split(",")] for line in fh if line.strip()]


COLLEGE = {
  "Some college but no degree",
  "Associates degree-occup /vocational",
  "Associates degree-academic program",
  "Bachelors degree(BA AB BS)",
  "Masters degree(MA MS MEng MEd MSW MBA)",
  "Prof school degree (MD DDS DVM LLB JD)",
  "Doctorate degree(PhD EdD)",
}


def test_census_columns_labels_and_vocabulary():
  splits = data.census_income(os.path.join(FIX, "census"))
  train = splits["train"]
  rows = _census_rows("census-income.data")
  assert all(len(r) == 42 for r in rows) and len(train) == len(rows) == 40
  assert train.task_names == ("income", "never_married")
  # labels: independent reference
  income = [1.0 if r[41] == "50000+." else 0.0 for r in rows]
  never = [1.0 if r[7] == "Never married" else 0.0 for r in rows]
  np.testing.assert_array_equal(train.labels, [income, never])
  np.testing.assert_array_equal(train.labels[:, :3], [[1, 0, 0], [1, 0, 1]])  # hand-written rows
  # inputs: label columns and the instance weight removed
  names = train.spec.names
  assert "marital_status" not in names and "income" not in names and "instance_weight" not in names
  assert "education" in names and len(names) == 39
  assert {f.name for f in train.spec.dense} == set(data.CENSUS_NUMERIC)
  # vocabularies: distinct non-missing training values + 1 (id 0 = missing / unseen)
  for f in train.spec.categorical:
    j = data.CENSUS_COLUMNS.index(f.name)
    values = sorted({r[j] for r in rows if r[j] != "?"})
    assert f.vocab_size == len(values) + 1, f.name
    expected = [values.index(r[j]) + 1 if r[j] != "?" else 0 for r in rows]
    np.testing.assert_array_equal(train.features[f.name], expected)
  # '?' -> 0 (row 1 has '?' in the migration and country of birth father columns)
  assert train.features["migration_code_change_in_msa"][1] == 0
  assert train.features["country_of_birth_father"][1] == 0
  # numeric columns standardized with training statistics
  for c in data.CENSUS_NUMERIC:
    x = np.array([float(r[data.CENSUS_COLUMNS.index(c)]) for r in rows])
    sd = x.std() if x.std() > 0 else 1.0
    np.testing.assert_allclose(train.features[c], (x - x.mean()) / sd, rtol=1e-5, atol=1e-6)


def test_census_test_split_unseen_and_missing():
  splits = data.census_income(
    os.path.join(FIX, "census", "census-income.data"), os.path.join(FIX, "census", "census-income.test"), seed=0
  )
  rows = _census_rows("census-income.test")
  val, test = splits["validation"], splits["test"]
  assert (len(val), len(test)) == (10, 11)
  age_col = data.CENSUS_COLUMNS.index("age")
  train_ages = np.array([float(r[age_col]) for r in _census_rows("census-income.data")])
  ages = (np.array([float(r[age_col]) for r in rows]) - train_ages.mean()) / train_ages.std()
  order = np.random.default_rng(0).permutation(21)
  np.testing.assert_allclose(np.concatenate([val.features["age"], test.features["age"]]), ages[order], rtol=1e-5)
  # the hand-written test row: unseen class of worker -> 0, missing wage -> 0.0 (the training mean)
  k = int(np.flatnonzero(order == 0)[0])
  first = (val if k < 10 else test).subset([k if k < 10 else k - 10])
  assert first.features["class_of_worker"][0] == 0
  assert first.features["wage_per_hour"][0] == 0.0
  np.testing.assert_array_equal(first.labels[:, 0], [1.0, 0.0])
  other = data.census_income(os.path.join(FIX, "census"), seed=1)
  assert not np.array_equal(other["validation"].features["age"], val.features["age"])


def test_census_group_2_tasks():
  train = data.census_income(os.path.join(FIX, "census"), tasks=("education", "never_married"))["train"]
  rows = _census_rows("census-income.data")
  np.testing.assert_array_equal(train.labels[0], [1.0 if r[4] in COLLEGE else 0.0 for r in rows])
  np.testing.assert_array_equal(train.labels[:, :3], [[1, 0, 0], [1, 0, 1]])
  assert "education" not in train.spec.names and "income" in train.spec.names
  assert set(data.CENSUS_COLLEGE) == COLLEGE


def test_census_errors(tmp_path):
  with pytest.raises(ValueError, match="tasks"):
    data.census_income(os.path.join(FIX, "census"), tasks=("income", "age"))
  bad = tmp_path / "bad.data"
  bad.write_text("1, 2, 3\n")
  with pytest.raises(ValueError, match="42"):
    data.census_income(bad)
  with pytest.raises(ValueError, match="does not exist"):
    data.census_income(tmp_path / "missing.data")


# -------------------------------------------------------------------------------- AliExpress


def _csv_dicts(path):
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh))


def test_aliexpress_parsing_labels_and_vocabulary():
  d = os.path.join(FIX, "aliexpress", "AliExpress_NL")
  splits = data.aliexpress(os.path.join(FIX, "aliexpress"), country="NL")
  same = data.aliexpress(d)
  np.testing.assert_array_equal(same["train"].labels, splits["train"].labels)
  raw = {s: _csv_dicts(os.path.join(d, f"{s}.csv")) for s in ("train", "test")}
  cats = [f"categorical_{i}" for i in range(1, 17)]
  for j, c in enumerate(cats):
    ids = [int(r[c]) for s in raw.values() for r in s if r[c] != ""]
    has_missing = any(r[c] == "" for s in raw.values() for r in s)
    assert splits["train"].spec.categorical[j].vocab_size == max(ids) + 1 + has_missing, c
  assert splits["train"].spec.categorical[4].vocab_size == 41  # its largest id is only in test
  assert splits["train"].spec.dense[0].dim == 63
  for s, ds in splits.items():
    rows = raw[s]
    assert len(ds) == len(rows)
    click = [float(r["click"]) for r in rows]
    conv = [float(r["conversion"]) for r in rows]
    np.testing.assert_array_equal(ds.labels, [click, conv])
    np.testing.assert_array_equal(ds.masks, [[True] * len(rows), [c > 0 for c in click]])
    np.testing.assert_array_equal(ds.extras["search_id"], [int(r["search_id"]) for r in rows])
    for c in cats:
      top = splits["train"].spec.categorical[cats.index(c)].vocab_size - 1
      np.testing.assert_array_equal(ds.features[c], [int(r[c]) if r[c] != "" else top for r in rows])
    num = [[float(r[f"numerical_{i}"]) if r[f"numerical_{i}"] != "" else 0.0 for i in range(1, 64)] for r in rows]
    np.testing.assert_allclose(ds.features["numerical"], num, rtol=1e-6)
  test = splits["test"]
  assert test.features["numerical"][1, 9] == 0.0  # the missing numerical_10
  assert test.features["categorical_3"][1] == splits["train"].spec.categorical[2].vocab_size - 1
  np.testing.assert_array_equal(splits["train"].labels[:, :3], [[1, 1, 0], [1, 0, 0]])


def test_aliexpress_errors(tmp_path):
  with pytest.raises(ValueError, match="country"):
    data.aliexpress(os.path.join(FIX, "aliexpress"))
  (tmp_path / "train.csv").write_text("search_id,click\n1,0\n")
  with pytest.raises(ValueError, match="lacks column"):
    data.aliexpress(tmp_path)


# ------------------------------------------------------------------------------------ Ali-CCP


def _ref_features(text):
  out = {}
  for item in text.split("\x01"):
    field, rest = item.split("\x02")
    out.setdefault(field, int(rest.split("\x03")[0]))
  return out


def _aliccp_reference(split):
  """Plain-Python Ali-CCP parse: join, clean, raw ids per field (None = missing)."""
  common = {}
  with open(os.path.join(FIX, "aliccp", f"common_features_{split}.csv")) as fh:
    for line in fh:
      idx, _, feats = line.rstrip("\n").split(",", 2)
      common[idx] = _ref_features(feats)
  rows = []
  with open(os.path.join(FIX, "aliccp", f"sample_skeleton_{split}.csv")) as fh:
    for line in fh:
      _, click, conv, idx, _, feats = line.rstrip("\n").split(",", 5)
      if click == "0" and conv == "1":
        continue
      f = dict(common.get(idx, {}))
      f.update(_ref_features(feats))
      rows.append((float(click), float(conv), f))
  return rows


@pytest.mark.parametrize("min_count", [1, 2, 10])
def test_aliccp_raw_join_cleaning_and_vocabulary(min_count):
  p = lambda n: os.path.join(FIX, "aliccp", n)
  splits = data.aliccp(
    p("sample_skeleton_train.csv"),
    p("common_features_train.csv"),
    test_skeleton_path=p("sample_skeleton_test.csv"),
    test_common_features_path=p("common_features_test.csv"),
    min_count=min_count,
  )
  ref_train = _aliccp_reference("train")
  counts = {f: collections.Counter(r[2][f] for r in ref_train if f in r[2]) for f in data.ALICCP_FIELDS}
  vocab = {f: sorted(v for v, n in counts[f].items() if n >= min_count) for f in data.ALICCP_FIELDS}
  assert [c.vocab_size for c in splits["train"].spec.categorical] == [len(vocab[f]) + 1 for f in data.ALICCP_FIELDS]
  for split in ("train", "test"):
    ds, ref = splits[split], _aliccp_reference(split)
    assert len(ds) == len(ref)
    np.testing.assert_array_equal(ds.labels, [[r[0] for r in ref], [r[1] for r in ref]])
    np.testing.assert_array_equal(ds.masks[1], ds.labels[0] > 0)
    for f in data.ALICCP_FIELDS:
      expected = [vocab[f].index(r[2][f]) + 1 if r[2].get(f) in vocab[f] else 0 for r in ref]
      np.testing.assert_array_equal(ds.features[f], expected, err_msg=f"{split} {f}")
    np.testing.assert_array_equal(ds.extras["user_id"], [r[2].get("101", -1) for r in ref])


def test_aliccp_raw_hand_written_rows():
  p = lambda n: os.path.join(FIX, "aliccp", n)
  splits = data.aliccp(
    p("sample_skeleton_train.csv"),
    p("common_features_train.csv"),
    test_skeleton_path=p("sample_skeleton_test.csv"),
    test_common_features_path=p("common_features_test.csv"),
    min_count=1,
  )
  train, test = splits["train"], splits["test"]
  counts = train.metadata["counts"]
  assert counts == {"rows": 40, "dropped_click0_conversion1": 1, "missing_common": 1}
  assert len(train) == 39  # the click=0, conversion=1 row is gone
  np.testing.assert_array_equal(train.labels[:, :2], [[1, 1], [1, 0]])
  # first kept row: user 0 (raw 100000 -> id 1), item 1 (raw 300001 -> id 2)
  assert train.extras["user_id"][0] == 100000 and train.features["101"][0] == 1
  assert train.features["205"][0] == 2
  # second kept row: its common index is absent -> every user-side field is 0
  for f in ("101", "121", "122", "124", "125", "126", "127", "128", "129"):
    assert train.features[f][1] == 0
  assert train.extras["user_id"][1] == -1 and train.features["205"][1] == 3
  # test users 4, 5 were seen in training, user 6 was not -> 0
  users = dict(zip(test.extras["user_id"].tolist(), test.features["101"].tolist()))
  assert users.get(100004) == 5 and users.get(100005) == 6 and users.get(100006) == 0
  # the default min_count=10 maps the (rare) fixture user ids to 0
  rare = data.aliccp(p("sample_skeleton_train.csv"), p("common_features_train.csv"))["train"]
  assert rare.spec.categorical[0].vocab_size == 1 + sum(
    n >= 10 for n in collections.Counter(train.extras["user_id"][train.extras["user_id"] >= 0].tolist()).values()
  )


def test_aliccp_processed():
  splits = data.aliccp_processed(
    os.path.join(FIX, "aliccp", "processed_train.csv"), os.path.join(FIX, "aliccp", "processed_test.csv")
  )
  raw = {s: _csv_dicts(os.path.join(FIX, "aliccp", f"processed_{s}.csv")) for s in ("train", "test")}
  fields = list(raw["train"][0])[2:]
  assert fields == list(data.ALICCP_FIELDS) and splits["train"].spec.names == tuple(fields)
  for j, f in enumerate(fields):
    ids = [int(r[f]) for s in raw.values() for r in s if r[f] != ""]
    has_missing = any(r[f] == "" for s in raw.values() for r in s)
    assert splits["train"].spec.categorical[j].vocab_size == max(ids) + 1 + has_missing
  assert splits["train"].spec.categorical[fields.index("206")].vocab_size == 10
  for s, ds in splits.items():
    kept = [r for r in raw[s] if not (r["click"] == "0" and r["purchase"] == "1")]
    assert len(ds) == len(kept) == len(raw[s]) - 1 and ds.metadata["dropped_click0_conversion1"] == 1
    np.testing.assert_array_equal(ds.labels, [[float(r["click"]) for r in kept], [float(r["purchase"]) for r in kept]])
    for j, f in enumerate(fields):
      top = splits["train"].spec.categorical[j].vocab_size - 1
      np.testing.assert_array_equal(ds.features[f], [int(r[f]) if r[f] != "" else top for r in kept])


def test_aliccp_errors(tmp_path):
  bad = tmp_path / "skel.csv"
  bad.write_text("1,0,0,abc\n")
  com = tmp_path / "com.csv"
  com.write_text("abc,1,101\x02100\x031.0\n")
  with pytest.raises(ValueError, match="sample_id,click"):
    data.aliccp(bad, com)
  with pytest.raises(ValueError, match="neither"):
    data.aliccp(bad, com, test_skeleton_path=bad)
  bad.write_text("1,0,0,abc,1,101\x02\x031.0\n")
  with pytest.raises(ValueError, match="feature item"):
    data.aliccp(bad, com)


# ----------------------------------------------------------------------------------- KuaiRand


def test_kuairand_split_tasks_domains_and_missing():
  d = os.path.join(FIX, "kuairand")
  splits = data.kuairand(d)
  files = sorted(os.path.join(d, f) for f in os.listdir(d))
  rows = [r for f in files for r in _csv_dicts(f)]
  last = max(int(r["date"]) for r in rows)
  assert last == 20220508
  ref = {"train": [r for r in rows if int(r["date"]) != last], "test": [r for r in rows if int(r["date"]) == last]}
  train_users = sorted({int(r["user_id"]) for r in ref["train"]})
  train_videos = sorted({int(r["video_id"]) for r in ref["train"]})
  spec = splits["train"].spec
  assert spec.names == ("user_id", "video_id", "tab", "hour", "duration")
  assert [c.vocab_size for c in spec.categorical] == [len(train_users) + 1, len(train_videos) + 1, 7, 24]
  dur = np.array([np.log1p(float(r["duration_ms"]) / 1000) for r in ref["train"] if r["duration_ms"] != ""])
  for s, ds in splits.items():
    rs = ref[s]
    assert len(ds) == len(rs) and ds.task_names == ("is_click", "long_view", "is_like")
    np.testing.assert_array_equal(ds.labels, [[float(r[t]) for r in rs] for t in ds.task_names])
    assert ds.masks is None
    np.testing.assert_array_equal(ds.features["tab"], [int(r["tab"]) for r in rs])
    np.testing.assert_array_equal(ds.features["hour"], [int(r["hourmin"]) // 100 for r in rs])
    np.testing.assert_array_equal(
      ds.features["user_id"],
      [train_users.index(int(r["user_id"])) + 1 if int(r["user_id"]) in train_users else 0 for r in rs],
    )
    np.testing.assert_array_equal(
      ds.features["video_id"],
      [train_videos.index(int(r["video_id"])) + 1 if int(r["video_id"]) in train_videos else 0 for r in rs],
    )
    expected = [
      (np.log1p(float(r["duration_ms"]) / 1000) - dur.mean()) / dur.std() if r["duration_ms"] != "" else 0.0 for r in rs
    ]
    np.testing.assert_allclose(ds.features["duration"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ds.extras["user_id"], [int(r["user_id"]) for r in rs])
  test = splits["test"]
  assert test.features["video_id"][-1] == 0 and test.features["tab"][-1] == 6  # unseen video, largest tab
  assert splits["train"].metadata["num_domains"] == 7
  # explicit test dates, and one file at a time
  other = data.kuairand(files, test_dates=[20220430, 20220508])
  assert set(other["test"].extras["date"].tolist()) == {20220430, 20220508}
  assert len(other["train"]) + len(other["test"]) == len(rows)
  with pytest.raises(ValueError, match="empty split"):
    data.kuairand(files[0], test_dates=[20220508])
  with pytest.raises(ValueError, match="tasks"):
    data.kuairand(d, tasks=("play_time_ms",))
