"""The streaming AliExpress converter (aliexpress_to_store) writes, file for file, the store that
write_store(aliexpress(...)) writes, in chunks (several chunks, missing ids fixed up at the end, the
pyarrow and the np.loadtxt paths), and fails as the in-memory loader does (the same message naming
the CSV file, its line and the column, for a row in a later chunk) without leaving a store behind.
Also the synthetic AliExpress-format generator (write_aliexpress_csv)."""

import filecmp
import os
import re
import shutil
import warnings

import numpy as np
import pytest

from mtjax import data
from mtjax.data import _dataset
from mtjax.data._aliexpress import ALIEXPRESS_CATEGORICAL as CATEGORICAL
from mtjax.data._aliexpress import ALIEXPRESS_NUMERICAL as NUMERICAL
from tests.data.test_malformed import _damage_row
from tests.data.test_malformed import _lines
from tests.data.test_malformed import _write

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "aliexpress")


def _same_store(a, b):
  """The two store folders hold the same splits and files, byte for byte (manifests included)."""
  assert sorted(os.listdir(a)) == sorted(os.listdir(b))
  for split in os.listdir(a):
    files = sorted(os.listdir(os.path.join(a, split)))
    assert files == sorted(os.listdir(os.path.join(b, split))), split
    for f in files:
      assert filecmp.cmp(os.path.join(a, split, f), os.path.join(b, split, f), shallow=False), (split, f)


def _same_as_loader(directory, out, **kw):
  """``out`` (a converted store) against the in-memory loader: the same batches, spec and metadata."""
  expected = data.aliexpress(directory, **kw)
  stored = data.open_store(out, verify=True)
  assert set(stored) == set(expected)
  for split, ds in expected.items():
    got = stored[split]
    assert len(got) == len(ds) and got.spec == ds.spec and got.task_names == ds.task_names
    assert {k: v for k, v in got.metadata.items() if k != "store"} == ds.metadata
    idx = np.arange(len(ds))
    a, b = got.batch(idx, include_extras=True), ds.batch(idx, include_extras=True)
    assert set(a) == set(b) == {"x", "labels", "mask", "extras"}
    for k in b["x"]:
      assert a["x"][k].dtype == b["x"][k].dtype
      np.testing.assert_array_equal(a["x"][k], b["x"][k], err_msg=k)
    for k in ("labels", "mask"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["extras"]["search_id"].dtype == np.int64
    np.testing.assert_array_equal(a["extras"]["search_id"], b["extras"]["search_id"])
  return expected


@pytest.fixture(params=["arrow", "loadtxt"])
def parser(request, monkeypatch):
  """Runs a test with pyarrow's parser (when installed) and with np.loadtxt (pyarrow switched off)."""
  if request.param == "arrow":
    pytest.importorskip("pyarrow")
  else:
    monkeypatch.setattr(_dataset, "_read_block_arrow", lambda *args: None)
  return request.param


def _generated(tmp_path, train=3000, test=1000, missing_rate=0.02):
  d = tmp_path / "AliExpress_NL"
  data.write_aliexpress_csv(d / "train.csv", train, seed=1, missing_rate=missing_rate)
  if test:
    data.write_aliexpress_csv(d / "test.csv", test, seed=2, missing_rate=missing_rate / 2)
  return d


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_fixture_converts_to_the_loaders_store(tmp_path, chunk_rows, parser):
  d = os.path.join(FIX, "AliExpress_NL")
  reference = data.write_store(data.aliexpress(FIX, country="NL", embed_dim=4), tmp_path / "reference")
  out = data.aliexpress_to_store(FIX, tmp_path / "store", country="NL", embed_dim=4, chunk_rows=chunk_rows)
  assert out == str(tmp_path / "store")
  _same_store(reference, out)
  expected = _same_as_loader(d, out, embed_dim=4)
  assert expected["test"].spec.categorical[4].vocab_size == 41  # the largest categorical_5 id is in test only
  assert data.open_store(out)["train"].metadata["directory"] == d


def test_generated_file_with_missing_ids_in_several_chunks(tmp_path, parser):
  d = _generated(tmp_path)
  out = data.aliexpress_to_store(d, tmp_path / "store", chunk_rows=500)
  _same_store(data.write_store(data.aliexpress(d), tmp_path / "reference"), out)
  expected = _same_as_loader(d, out)
  train = expected["train"]
  for field in train.spec.categorical:  # every column had missing ids: vocabulary = max id + 2
    top = max(int(ds.features[field.name].max()) for ds in expected.values())
    assert field.vocab_size == top + 1, field
    assert (train.features[field.name] == top).sum() > 10  # the missing id, in several chunks


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_line_ends_and_byte_order_mark(tmp_path, ending):
  d = tmp_path / "AliExpress_NL"
  shutil.copytree(os.path.join(FIX, "AliExpress_NL"), d)
  lines = [line.rstrip("\n") + ending for line in _lines(d / "train.csv")]
  _write(d / "train.csv", lines, encoding="utf-8-sig")
  out = data.aliexpress_to_store(d, tmp_path / "store", chunk_rows=5)
  _same_store(data.write_store(data.aliexpress(d), tmp_path / "reference"), out)


# ------------------------------------------------------------------------------ malformed rows

LINE = 1700  # a data line of a later chunk (chunk_rows=300: the sixth)


def _set(name, value):
  j = ["search_id", *CATEGORICAL, *NUMERICAL].index(name)
  return lambda s: ",".join(value if k == j else v for k, v in enumerate(s.split(",")))


DAMAGE = {
  "short row": lambda s: s.rsplit(",", 1)[0],
  "long row": lambda s: s + ",7",
  "not a number": _set("numerical_1", "abc"),
  "non-finite": _set("numerical_5", "inf"),
  "non-integer id": _set("categorical_3", "2.5"),
  "click 2": lambda s: s.rsplit(",", 2)[0] + ",2,0",
  "quoted": _set("numerical_2", '"x"'),
}


def _messages(call):
  with pytest.raises(ValueError) as info:
    call()
  return str(info.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_malformed_row_in_a_later_chunk_same_error(tmp_path, damage, parser):
  d = _generated(tmp_path, train=2000, test=0, missing_rate=0.0)
  _damage_row(d / "train.csv", LINE, DAMAGE[damage])
  expected = _messages(lambda: data.aliexpress(d))
  assert re.match(rf"^mtjax: '{re.escape(str(d / 'train.csv'))}' line {LINE}: ", expected), expected
  got = _messages(lambda: data.aliexpress_to_store(d, tmp_path / "store", chunk_rows=300))
  assert got == expected
  assert not os.path.exists(tmp_path / "store")  # the folder it made is gone: no store, no .partial


def test_file_cut_mid_row_and_error_in_test_leave_no_store(tmp_path):
  d = _generated(tmp_path, train=1200, test=900)
  lines = _lines(d / "test.csv")
  _write(d / "test.csv", lines[:-1] + [lines[-1][:40]])
  expected = _messages(lambda: data.aliexpress(d))
  assert "line 901" in expected and "cut short" in expected
  os.makedirs(tmp_path / "store")  # an existing (empty) folder: kept, but no split appears in it
  got = _messages(lambda: data.aliexpress_to_store(d, tmp_path / "store", chunk_rows=250, overwrite=True))
  assert got == expected
  assert os.listdir(tmp_path / "store") == []


def test_negative_id_and_header_only(tmp_path):
  d = _generated(tmp_path, train=900, test=0, missing_rate=0.0)
  _damage_row(d / "train.csv", 800, _set("categorical_2", "-3"))
  _damage_row(d / "train.csv", 850, lambda s: s + ",1")  # a malformed row after it: reported first, as in memory
  assert _messages(lambda: data.aliexpress_to_store(d, tmp_path / "s", chunk_rows=100)) == _messages(
    lambda: data.aliexpress(d)
  )
  _damage_row(d / "train.csv", 850, lambda s: s.rsplit(",", 1)[0])  # the malformed row fixed
  _write(d / "train.csv", _lines(d / "train.csv")[:850])
  expected = _messages(lambda: data.aliexpress(d))
  assert "negative categorical ids" in expected
  assert _messages(lambda: data.aliexpress_to_store(d, tmp_path / "s", chunk_rows=100)) == expected
  _damage_row(d / "train.csv", 800, _set("categorical_2", "3"))
  _damage_row(d / "train.csv", 820, _set("search_id", "-1"))  # search_id is checked too
  assert "negative categorical ids" in _messages(lambda: data.aliexpress(d))
  assert _messages(lambda: data.aliexpress_to_store(d, tmp_path / "s", chunk_rows=100)) == expected
  _write(d / "train.csv", _lines(d / "train.csv")[:1])
  expected = _messages(lambda: data.aliexpress(d))
  assert "only a header" in expected
  assert _messages(lambda: data.aliexpress_to_store(d, tmp_path / "s", chunk_rows=100)) == expected
  assert not os.path.exists(tmp_path / "s")


def test_skip_drops_the_same_rows_with_the_same_warning(tmp_path, parser):
  d = _generated(tmp_path, train=2000, test=600)
  for line, damage in ((5, "long row"), (LINE, "not a number"), (1999, "click 2")):
    _damage_row(d / "train.csv", line, DAMAGE[damage])
  _damage_row(d / "test.csv", 550, DAMAGE["short row"])

  def run(call):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      result = call()
    return result, sorted(str(w.message) for w in caught if "malformed" in str(w.message))

  expected, expected_warnings = run(lambda: data.aliexpress(d, on_bad_rows="skip"))
  out, got_warnings = run(lambda: data.aliexpress_to_store(d, tmp_path / "store", on_bad_rows="skip", chunk_rows=300))
  assert got_warnings == expected_warnings and len(got_warnings) == 2
  assert "dropped 3 malformed row(s)" in got_warnings[1] and "line 5:" in got_warnings[1]
  assert len(expected["train"]) == 1997 and len(expected["test"]) == 599
  _same_store(data.write_store(expected, tmp_path / "reference"), out)


def test_overwrite(tmp_path):
  d = _generated(tmp_path, train=300, test=100)
  out = data.aliexpress_to_store(d, tmp_path / "store")
  with pytest.raises(data.StoreError, match="^mtjax: .*already exists.*overwrite=True"):
    data.aliexpress_to_store(d, out)
  os.remove(d / "test.csv")
  _damage_row(d / "train.csv", 100, DAMAGE["long row"])
  with pytest.raises(ValueError, match="line 100"):
    data.aliexpress_to_store(d, out, overwrite=True)
  assert set(data.open_store(out)) == {"train", "test"}  # a failed conversion leaves the old store as it was
  with pytest.warns(UserWarning, match="dropped 1 malformed row"):
    data.aliexpress_to_store(d, out, overwrite=True, on_bad_rows="skip")
  assert set(data.open_store(out)) == {"train"} and len(data.open_store(out)["train"]) == 299
  with pytest.raises(ValueError, match="^mtjax: chunk_rows"):
    data.aliexpress_to_store(d, tmp_path / "other", chunk_rows=0)
  with pytest.raises(ValueError, match="^mtjax: on_bad_rows"):
    data.aliexpress_to_store(d, tmp_path / "other", on_bad_rows="ignore")
  assert not os.path.exists(tmp_path / "other")


# ------------------------------------------------------------------------------ the generator


def test_generator_format_rates_and_determinism(tmp_path):
  path = data.write_aliexpress_csv(tmp_path / "a" / "train.csv", 100_000, seed=3)
  assert path == os.fspath(tmp_path / "a" / "train.csv")
  with open(path) as fh:
    header = fh.readline().rstrip("\n").split(",")
    row = fh.readline().rstrip("\n").split(",")
  assert header == ["search_id", *CATEGORICAL, *NUMERICAL, "click", "conversion"]
  assert len(row) == len(header) and re.fullmatch(r"0\.\d{4}|1\.0000", row[20])
  table = np.loadtxt(path, delimiter=",", skiprows=1, max_rows=100_000)
  click, conversion = table[:, -2], table[:, -1]
  assert 0.027 < click.mean() < 0.033 and 0.004 < conversion.mean() < 0.006
  assert not (conversion > click).any()
  assert (np.diff(table[:, 0]) >= 0).all() and 5 < len(table) / len(np.unique(table[:, 0])) < 40  # sessions
  assert (table[:, 17:80] >= 0).all() and (table[:, 17:80] <= 1).all()
  again = data.write_aliexpress_csv(tmp_path / "b.csv", 100_000, seed=3)
  assert filecmp.cmp(path, again, shallow=False)
  one = data.write_aliexpress_csv(tmp_path / "c.csv", 1, seed=3)
  assert len(_lines(one)) == 2
  with pytest.raises(ValueError, match="^mtjax: write_aliexpress_csv"):
    data.write_aliexpress_csv(tmp_path / "d.csv", 10, click_rate=0.01, conversion_rate=0.02)
