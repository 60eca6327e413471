"""Damaged files never load silently: every loader rejects a malformed row with a ValueError that names
the file, the line and (where it applies) the column, or drops it with a warning under
on_bad_rows='skip'. Each test builds a small damaged copy of a fixture in tmp_path. Also: the
preprocessed forms (Census with a header / an index column, Ali-CCP with dense columns), byte-order
marks, and the stratified split."""

import os
import re
import shutil

import numpy as np
import pytest

from mtjax import data
from mtjax.experiment import _registry

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _lines(path):
  with open(path, newline="") as fh:
    return fh.read().splitlines(keepends=True)


def _write(path, lines, encoding="utf-8"):
  with open(path, "w", newline="", encoding=encoding) as fh:
    fh.write("".join(lines))


# Per format: (copy the fixtures into tmp_path and return the file to damage, load, first data line,
# a numeric column of that line: (its field index, its name), whether the file has a header row).


def _aliexpress(tmp):
  d = tmp / "AliExpress_NL"
  shutil.copytree(os.path.join(FIX, "aliexpress", "AliExpress_NL"), d)
  return d / "train.csv", lambda **kw: data.aliexpress(d, **kw)


def _aliccp_processed(tmp):
  p = tmp / "processed_train.csv"
  shutil.copy(os.path.join(FIX, "aliccp", "processed_train.csv"), p)
  return p, lambda **kw: data.aliccp_processed(p, **kw)


def _kuairand(tmp):
  d = tmp / "kuairand"
  shutil.copytree(os.path.join(FIX, "kuairand"), d)
  return d / "log_standard_4_08_to_4_21_1k.csv", lambda **kw: data.kuairand(d, **kw)


def _census(tmp):
  p = tmp / "census-income.data"
  shutil.copy(os.path.join(FIX, "census", "census-income.data"), p)
  return p, lambda **kw: data.census_income(p, **kw)


def _aliccp(tmp):
  os.makedirs(tmp, exist_ok=True)
  skel, com = tmp / "sample_skeleton_train.csv", tmp / "common_features_train.csv"
  shutil.copy(os.path.join(FIX, "aliccp", "sample_skeleton_train.csv"), skel)
  shutil.copy(os.path.join(FIX, "aliccp", "common_features_train.csv"), com)
  return skel, lambda **kw: data.aliccp(skel, com, min_count=1, **kw)


FORMATS = {
  # name: (setup, 1-based line of the first data row, (field index, column name) of a numeric column, header)
  "aliexpress": (_aliexpress, 2, (17, "numerical_1"), True),
  "aliccp_processed": (_aliccp_processed, 2, (2, "101"), True),
  "kuairand": (_kuairand, 2, (13, "duration_ms"), True),
  "census": (_census, 1, (0, "age"), False),
  "aliccp": (_aliccp, 1, None, False),
}
NUMERIC_FORMATS = [f for f, v in FORMATS.items() if v[2] is not None]


def _error(path, line, column=None):
  pattern = rf"^mtjax: .*{re.escape(os.path.basename(str(path)))}' line {line}: "
  return pattern + (rf".*column {re.escape(repr(column))}" if column else "")


def _damage_row(path, k, edit):
  lines = _lines(path)
  lines[k - 1] = edit(lines[k - 1].rstrip("\r\n")) + "\n"
  _write(path, lines)


@pytest.mark.parametrize("fmt", FORMATS)
def test_short_row(tmp_path, fmt):
  setup, first, _, _ = FORMATS[fmt]
  path, load = setup(tmp_path)
  line = first + 2
  _damage_row(path, line, lambda s: s.rsplit(",", 1)[0])  # the last field is gone
  with pytest.raises(ValueError, match=_error(path, line)):
    load()


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_row(tmp_path, fmt):
  setup, first, _, _ = FORMATS[fmt]
  path, load = setup(tmp_path)
  line = first + 1
  _damage_row(path, line, lambda s: s + ",7")
  with pytest.raises(ValueError, match=_error(path, line)):
    load()


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_cut_mid_row(tmp_path, fmt):
  setup, _, _, _ = FORMATS[fmt]
  path, load = setup(tmp_path)
  lines = _lines(path)
  _write(path, lines[:-1] + [lines[-1][: len(lines[-1]) // 2]])
  with pytest.raises(ValueError, match=_error(path, len(lines)) + ".*cut short"):
    load()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
@pytest.mark.parametrize("fmt", NUMERIC_FORMATS)
def test_non_finite_number(tmp_path, fmt, value):
  setup, first, (j, column), _ = FORMATS[fmt]
  path, load = setup(tmp_path)
  line = first + 3
  _damage_row(path, line, lambda s: ",".join(v if k != j else value for k, v in enumerate(s.split(","))))
  with pytest.raises(ValueError, match=_error(path, line, column) + ".*non-finite"):
    load()


@pytest.mark.parametrize("value", ["abc", "1_0", "0x10"])
@pytest.mark.parametrize("fmt", NUMERIC_FORMATS)
def test_not_a_number(tmp_path, fmt, value):
  setup, first, (j, column), _ = FORMATS[fmt]
  path, load = setup(tmp_path)
  line = first + 1
  _damage_row(path, line, lambda s: ",".join(v if k != j else value for k, v in enumerate(s.split(","))))
  with pytest.raises(ValueError, match=_error(path, line, column) + ".*not a number"):
    load()


def test_non_integer_id_and_bad_label(tmp_path):
  path, load = _aliccp_processed(tmp_path)
  _damage_row(path, 3, lambda s: ",".join(v if k != 2 else "2.5" for k, v in enumerate(s.split(","))))
  with pytest.raises(ValueError, match=_error(path, 3, "101") + ".*not an integer"):
    load()
  path, load = _aliexpress(tmp_path / "x")
  _damage_row(path, 4, lambda s: s.rsplit(",", 2)[0] + ",2,0")  # click = 2
  with pytest.raises(ValueError, match=_error(path, 4, "click")):
    load()
  path, load = _aliccp(tmp_path / "y")
  _damage_row(path, 2, lambda s: s.replace(",1,", ",x,", 1) if ",1," in s else s.replace(",0,", ",x,", 1))
  with pytest.raises(ValueError, match=_error(path, 2)):
    load()


@pytest.mark.parametrize("fmt", ["aliexpress", "aliccp_processed", "kuairand"])
def test_header_only_file(tmp_path, fmt):
  path, load = FORMATS[fmt][0](tmp_path)
  _write(path, _lines(path)[:1])
  with pytest.raises(ValueError, match=_error(path, 2) + ".*only a header"):
    load()


def test_census_header_only_file(tmp_path):
  path, load = _census(tmp_path)
  _write(path, [",".join(data.CENSUS_COLUMNS) + "\n"])
  with pytest.raises(ValueError, match=_error(path, 2) + ".*only a header"):
    load()


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_file(tmp_path, fmt):
  path, load = FORMATS[fmt][0](tmp_path)
  _write(path, [])
  with pytest.raises(ValueError, match=_error(path, 1) + ".*empty"):
    load()


def _same(a, b):
  assert set(a) == set(b)
  for split in a:
    x, y = a[split], b[split]
    assert x.spec == y.spec and len(x) == len(y)
    np.testing.assert_array_equal(x.labels, y.labels)
    for k in x.features:
      np.testing.assert_array_equal(x.features[k], y.features[k], err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_byte_order_mark_loads_identically(tmp_path, fmt):
  path, load = FORMATS[fmt][0](tmp_path)
  plain = load()
  _write(path, _lines(path), encoding="utf-8-sig")
  with open(path, "rb") as fh:
    assert fh.read(3) == b"\xef\xbb\xbf"
  _same(load(), plain)


@pytest.mark.parametrize("fmt", FORMATS)
def test_skip_drops_bad_rows_with_a_warning(tmp_path, fmt):
  setup, first, _, _ = FORMATS[fmt]
  path, load = setup(tmp_path)
  lines = _lines(path)
  keep = lines[:first] + lines[first + 1 :]  # without the second data row (line first + 1)
  _write(path, keep)
  expected = load()
  lines[first] = lines[first].rstrip("\r\n").rsplit(",", 1)[0] + "\n"  # the second data row: one field short
  _write(path, lines)
  with pytest.warns(UserWarning, match=rf"dropped 1 malformed row.*{re.escape(path.name)}.*line {first + 1}"):
    got = load(on_bad_rows="skip")
  for split in got:
    got[split].metadata.get("counts", {}).pop("dropped_malformed", None)
  _same(got, expected)
  with pytest.raises(ValueError, match="on_bad_rows"):
    load(on_bad_rows="ignore")


# ------------------------------------------------------------------------- preprocessed forms


def _census_fields():
  return [
    [v.strip() for v in line.rstrip("\n").split(",")]
    for line in _lines(os.path.join(FIX, "census", "census-income.data"))
  ]


@pytest.mark.parametrize("form", ["header", "index", "header+index", "pandas"])
def test_census_header_and_index_column(tmp_path, form):
  rows = _census_fields()
  plain = data.census_income(os.path.join(FIX, "census", "census-income.data"))
  lines = [", ".join(r) + "\n" for r in rows]
  if "index" in form:
    lines = [f"{k}, {line}" for k, line in enumerate(lines)]
  if "header" in form:
    names = list(data.CENSUS_COLUMNS)
    lines = [", ".join(([""] if "index" in form else []) + names) + "\n"] + lines
  if form == "pandas":  # DataFrame.to_csv: the UCI code names, an unnamed index column, no spaces
    names = [
      "AAGE",
      "ACLSWKR",
      "ADTIND",
      "ADTOCC",
      "AHGA",
      "AHRSPAY",
      "AHSCOL",
      "AMARITL",
      "AMJIND",
      "AMJOCC",
      "ARACE",
      "AREORGN",
      "ASEX",
      "AUNMEM",
      "AUNTYPE",
      "AWKSTAT",
      "CAPGAIN",
      "CAPLOSS",
      "DIVVAL",
      "FILESTAT",
      "GRINREG",
      "GRINST",
      "HHDFMX",
      "HHDREL",
      "MARSUPWT",
      "MIGMTR1",
      "MIGMTR3",
      "MIGMTR4",
      "MIGSAME",
      "MIGSUN",
      "NOEMP",
      "PARENT",
      "PEFNTVTY",
      "PEMNTVTY",
      "PENATVTY",
      "PRCITSHP",
      "SEOTR",
      "VETQVA",
      "VETYN",
      "WKSWORK",
      "YEAR",
      "income",
    ]
    lines = [",".join([""] + names) + "\n"] + [",".join([str(k)] + r) + "\n" for k, r in enumerate(rows)]
  path = tmp_path / "census.csv"
  _write(path, lines)
  _same(data.census_income(path), plain)
  # the detected form is then enforced on every row
  lines[3] = lines[3].split(",", 1)[1] if "index" in form or form == "pandas" else "7, " + lines[3]
  _write(path, lines)
  with pytest.raises(ValueError, match=_error(path, 4) + ".*fields"):
    data.census_income(path)


def test_census_index_column_must_be_an_integer(tmp_path):
  rows = _census_fields()
  path = tmp_path / "census.csv"
  _write(path, [f"{k if k != 5 else 'x'},{','.join(r)}\n" for k, r in enumerate(rows)])
  with pytest.raises(ValueError, match=_error(path, 6, "index")):
    data.census_income(path)


def test_census_inf_does_not_poison_normalization(tmp_path):
  path, load = _census(tmp_path)
  _damage_row(path, 10, lambda s: ", ".join(v if k != 5 else "inf" for k, v in enumerate(s.split(", "))))
  with pytest.raises(ValueError, match=_error(path, 10, "wage_per_hour") + ".*non-finite"):
    load()
  with pytest.warns(UserWarning, match="dropped 1 malformed row"):
    train = load(on_bad_rows="skip")["train"]
  assert len(train) == 39 and all(np.isfinite(train.features[c]).all() for c in data.CENSUS_NUMERIC)


def test_census_bad_label_value_names_the_line(tmp_path):
  path, load = _census(tmp_path)
  _damage_row(path, 7, lambda s: s.rsplit(", ", 1)[0] + ", 5000")
  with pytest.raises(ValueError, match=_error(path, 7, "income")):
    load()


TORCH_RECHUB_HEADER = "click,purchase,101,121,205,210,301,109_14,D109_14,D110_14,D127_14,D150_14,D508,D509,D702,D853"


def _rechub_rows(rng, n):
  rows = []
  for _ in range(n):
    click = int(rng.random() < 0.5)
    ids = [int(rng.integers(0, 9)) for _ in range(6)]
    dense = [round(float(v), 4) for v in rng.random(8) * 3]
    rows.append([click, click * int(rng.random() < 0.5)] + ids + dense)
  return rows


def test_aliccp_processed_dense_columns_stay_floats(tmp_path):
  rng = np.random.default_rng(0)
  rows = {s: _rechub_rows(rng, n) for s, n in (("train", 12), ("val", 5), ("test", 6))}
  rows["train"][3][9] = ""  # an empty dense field is 0.0
  for s, rs in rows.items():
    _write(tmp_path / f"ali_ccp_{s}.csv", [TORCH_RECHUB_HEADER + "\n"] + [",".join(map(str, r)) + "\n" for r in rs])
  splits = data.aliccp_processed(
    tmp_path / "ali_ccp_train.csv", tmp_path / "ali_ccp_test.csv", validation_path=tmp_path / "ali_ccp_val.csv"
  )
  assert set(splits) == {"train", "validation", "test"}
  spec = splits["train"].spec
  assert tuple(d.name for d in spec.dense) == data.ALICCP_PROCESSED_DENSE
  assert [c.name for c in spec.categorical] == ["101", "121", "205", "210", "301", "109_14"]
  for j, c in enumerate(spec.categorical):
    assert c.vocab_size == max(r[2 + j] for rs in rows.values() for r in rs) + 1
  for s, name in (("train", "train"), ("validation", "val"), ("test", "test")):
    ds = splits[s]
    assert len(ds) == len(rows[name])
    for k, d in enumerate(data.ALICCP_PROCESSED_DENSE):
      x = ds.features[d]
      assert x.dtype == np.float32
      np.testing.assert_allclose(x, [r[8 + k] if r[8 + k] != "" else 0.0 for r in rows[name]], rtol=1e-6)
  assert len(np.unique(splits["train"].features["D109_14"])) > 5  # not truncated to an id vocabulary of 1
  # explicit dense columns: the schema, not the values, decides
  explicit = data.aliccp_processed(
    tmp_path / "ali_ccp_train.csv", dense_columns=("109_14",) + data.ALICCP_PROCESSED_DENSE
  )["train"]
  assert [d.name for d in explicit.spec.dense] == ["109_14", *data.ALICCP_PROCESSED_DENSE]
  assert explicit.features["109_14"].dtype == np.float32 and "109_14" not in [c.name for c in explicit.spec.categorical]


def test_aliccp_processed_dense_values_are_checked(tmp_path):
  rows = _rechub_rows(np.random.default_rng(1), 6)
  rows[4][10] = "nan"
  path = tmp_path / "ali_ccp_train.csv"
  _write(path, [TORCH_RECHUB_HEADER + "\n"] + [",".join(map(str, r)) + "\n" for r in rows])
  with pytest.raises(ValueError, match=_error(path, 6, "D127_14") + ".*non-finite"):
    data.aliccp_processed(path)
  with pytest.raises(ValueError, match=_error(path, 1) + ".*lacks dense"):
    data.aliccp_processed(path, dense_columns=("D999",))


def test_aliccp_processed_float_in_an_id_column_is_an_error(tmp_path):
  rows = _rechub_rows(np.random.default_rng(2), 6)
  path = tmp_path / "ali_ccp_train.csv"
  _write(path, [TORCH_RECHUB_HEADER + "\n"] + [",".join(map(str, r)) + "\n" for r in rows])
  with pytest.raises(ValueError, match=_error(path, 2, "D109_14") + ".*not an integer"):
    data.aliccp_processed(path, dense_columns=("D508",))


def test_aliccp_processed_is_a_config_dataset():
  assert _registry.DATASETS["aliccp_processed"] is data.aliccp_processed


# --------------------------------------------------------------------------- stratified split


def _two_task_dataset(n=203, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.random(n) < 0.12
  b = np.where(a, rng.random(n) < 0.7, rng.random(n) < 0.3)
  return data.MultiTaskDataset(
    features=np.arange(n, dtype=np.float32)[:, None],
    labels=np.stack([a, b]),
    task_names=("a", "b"),
    extras={"row": np.arange(n)},
  )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stratified_split_keeps_positive_rates(seed):
  ds = _two_task_dataset(seed=seed)
  fractions = (0.6, 0.2, 0.2)
  parts = ds.split(fractions, seed=seed, stratify=True)
  plain = ds.split(fractions, seed=seed)
  assert [len(p) for p in parts] == [len(p) for p in plain]
  rows = np.concatenate([p.extras["row"] for p in parts])
  np.testing.assert_array_equal(np.sort(rows), np.arange(len(ds)))
  whole = ds.labels.mean(axis=1)
  for p in parts:
    assert np.all(np.abs(p.labels.mean(axis=1) - whole) <= 1.0 / len(p) + 0.01), (p.labels.mean(axis=1), whole)
    np.testing.assert_array_equal(p.features[:, 0], p.extras["row"])  # rows and features stay together
  # joint patterns too
  pattern = lambda d: d.labels[0] * 2 + d.labels[1]
  for p in parts:
    for v in range(4):
      assert abs(np.sum(pattern(p) == v) - np.mean(pattern(ds) == v) * len(p)) <= 1.0 + 1e-9


def test_stratified_split_is_seeded():
  ds = _two_task_dataset()
  one = ds.split((0.7, 0.3), seed=5, stratify=True)
  two = ds.split((0.7, 0.3), seed=5, stratify=True)
  other = ds.split((0.7, 0.3), seed=6, stratify=True)
  for x, y in zip(one, two):
    np.testing.assert_array_equal(x.extras["row"], y.extras["row"])
  assert not np.array_equal(one[1].extras["row"], other[1].extras["row"])
  # the plain split is unchanged by the new keyword
  np.testing.assert_array_equal(
    ds.split((0.7, 0.3), seed=5)[1].extras["row"],
    ds.subset(np.random.default_rng(5).permutation(len(ds))[142:]).extras["row"],
  )


def test_stratified_split_masks_and_regression():
  rng = np.random.default_rng(0)
  n = 120
  click = rng.random(n) < 0.3
  conv = click & (rng.random(n) < 0.4)
  labels = np.stack([click, conv, rng.normal(size=n)])
  masks = np.stack([np.ones(n, bool), click, np.ones(n, bool)])
  ds = data.MultiTaskDataset(
    features=np.zeros((n, 1), np.float32),
    labels=labels,
    masks=masks,
    task_names=("click", "conversion", "value"),
    task_types=("binary", "binary", "regression"),
  )
  parts = ds.split((0.5, 0.5), seed=0, stratify=True)
  for p in parts:
    # patterns: no click (conversion masked), click without / with conversion
    counts = [np.sum(~p.masks[1]), np.sum(p.masks[1] & (p.labels[1] == 0)), np.sum(p.labels[1] == 1)]
    whole = [np.sum(~click), np.sum(click & ~conv), np.sum(conv)]
    assert all(abs(c - w / 2) <= 1 for c, w in zip(counts, whole)), (counts, whole)
  only_regression = data.MultiTaskDataset(
    features=np.zeros((n, 1), np.float32), labels=labels[2:], task_names=("value",), task_types=("regression",)
  )
  a = only_regression.split((0.5, 0.5), seed=0, stratify=True)
  b = only_regression.split((0.5, 0.5), seed=0)
  np.testing.assert_array_equal(a[0].labels, b[0].labels)


def test_aliccp_common_features_byte_order_mark(tmp_path):
  skel, load = _aliccp(tmp_path)
  plain = load()
  com = tmp_path / "common_features_train.csv"
  _write(com, _lines(com), encoding="utf-8-sig")  # else the first user's common_feature_index would not match
  got = load()
  _same(got, plain)
  assert got["train"].metadata["counts"] == plain["train"].metadata["counts"]
