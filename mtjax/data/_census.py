"""Census-Income (KDD) loader: the MMoE paper's real-data benchmark."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._dataset import _BadRows
from mtjax.data._dataset import _check_file
from mtjax.data._dataset import _check_on_bad_rows
from mtjax.data._dataset import _cut_hint
from mtjax.data._dataset import _lines
from mtjax.data._dataset import _map_to_ids
from mtjax.data._dataset import _no_rows
from mtjax.data._dataset import _number
from mtjax.data._dataset import _open_text
from mtjax.data._dataset import _RowError
from mtjax.data._dataset import _split_fields
from mtjax.data._dataset import _vocabulary
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

PathLike = Union[str, os.PathLike]

#: The 42 columns of ``census-income.data`` / ``.test``, in file order (snake_case).
CENSUS_COLUMNS = (
  "age",
  "class_of_worker",
  "industry_code",
  "occupation_code",
  "education",
  "wage_per_hour",
  "enrolled_in_edu_inst_last_wk",
  "marital_status",
  "major_industry_code",
  "major_occupation_code",
  "race",
  "hispanic_origin",
  "sex",
  "member_of_a_labor_union",
  "reason_for_unemployment",
  "full_or_part_time_employment_stat",
  "capital_gains",
  "capital_losses",
  "dividends_from_stocks",
  "tax_filer_status",
  "region_of_previous_residence",
  "state_of_previous_residence",
  "detailed_household_and_family_stat",
  "detailed_household_summary_in_household",
  "instance_weight",
  "migration_code_change_in_msa",
  "migration_code_change_in_reg",
  "migration_code_move_within_reg",
  "live_in_this_house_1_year_ago",
  "migration_prev_res_in_sunbelt",
  "num_persons_worked_for_employer",
  "family_members_under_18",
  "country_of_birth_father",
  "country_of_birth_mother",
  "country_of_birth_self",
  "citizenship",
  "own_business_or_self_employed",
  "fill_inc_questionnaire_for_veterans_admin",
  "veterans_benefits",
  "weeks_worked_in_year",
  "year",
  "income",
)

#: Continuous columns (standardized dense inputs). Every other input column is categorical,
#: including the numerically coded industry/occupation codes, ``own_business_or_self_employed``,
#: ``veterans_benefits`` and ``year``.
CENSUS_NUMERIC = (
  "age",
  "wage_per_hour",
  "capital_gains",
  "capital_losses",
  "dividends_from_stocks",
  "num_persons_worked_for_employer",
  "weeks_worked_in_year",
)

#: Education values that count as "at least college" (attended college, with or without a
#: degree). Everything else (Children .. High school graduate) is 0.
CENSUS_COLLEGE = (
  "Some college but no degree",
  "Associates degree-occup /vocational",
  "Associates degree-academic program",
  "Bachelors degree(BA AB BS)",
  "Masters degree(MA MS MEng MEd MSW MBA)",
  "Prof school degree (MD DDS DVM LLB JD)",
  "Doctorate degree(PhD EdD)",
)

CENSUS_EDUCATION = (
  "Children",
  "Less than 1st grade",
  "1st 2nd 3rd or 4th grade",
  "5th or 6th grade",
  "7th and 8th grade",
  "9th grade",
  "10th grade",
  "11th grade",
  "12th grade no diploma",
  "High school graduate",
) + CENSUS_COLLEGE

_INCOME = {"- 50000": 0.0, "50000+": 1.0}
# Task name -> the column its label comes from.
_TASKS = {
  "income": "income",
  "never_married": "marital_status",
  "education": "education",
}
MISSING = "?"


class _Column:
  """One column read as distinct values plus a code per row (memory-light for 200k-row files)."""

  def __init__(self, values: list[str], codes: np.ndarray):
    self.values = np.asarray(values, dtype=str)
    self.codes = codes

  def map(self, per_value: np.ndarray) -> np.ndarray:
    return per_value[self.codes]


_NUMERIC_AT = tuple(CENSUS_COLUMNS.index(c) for c in CENSUS_NUMERIC)
_LABEL_CHECKS = {
  "income": (CENSUS_COLUMNS.index("income"), lambda v: v.rstrip(".") in _INCOME, "neither '- 50000.' nor '50000+.'"),
  "education": (CENSUS_COLUMNS.index("education"), lambda v: v in CENSUS_EDUCATION, "not a Census education value"),
}


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _census_header(row: list[str]) -> Optional[int]:
  """The offset of the data fields (1 with a leading index column) if ``row`` is a header row, else None.

  A header row has 42 names (43 with an index column, whose name may be empty); none of its
  numeric columns is a number and its income field is not an income value.
  """
  if len(row) not in (len(CENSUS_COLUMNS), len(CENSUS_COLUMNS) + 1):
    return None
  off = len(row) - len(CENSUS_COLUMNS)
  fields = [v.strip() for v in row[off:]]
  if any(_is_number(fields[j]) for j in _NUMERIC_AT) or fields[-1].rstrip(".") in _INCOME:
    return None
  return off


def _read_census(path: str, tasks: Sequence[str] = (), on_bad_rows: str = "error") -> list[_Column]:
  """Reads a Census-Income file: 42 fields a row, optionally a header row and a leading index column."""
  tables = [dict() for _ in CENSUS_COLUMNS]
  codes = [[] for _ in CENSUS_COLUMNS]
  checks = [_LABEL_CHECKS[t] for t in tasks if t in _LABEL_CHECKS]
  bad = _BadRows(path, on_bad_rows)
  width, seen_line, header_line = None, False, 0
  with _open_text(path) as fh:
    for line, text, complete in _lines(fh):
      if not text.strip():
        continue
      row = _split_fields(text)
      if not seen_line:
        seen_line = True
        off = _census_header(row)
        if off is not None:  # a header row: columns are taken by position, whatever their names
          width, header_line = len(CENSUS_COLUMNS) + off, line
          continue
        width = len(CENSUS_COLUMNS) + 1 if len(row) == len(CENSUS_COLUMNS) + 1 else len(CENSUS_COLUMNS)
      off = width - len(CENSUS_COLUMNS)
      try:
        if len(row) != width:
          raise _RowError(
            f"has {len(row)} fields; Census-Income (KDD) rows have {len(CENSUS_COLUMNS)}"
            + (" plus the leading index column of this file's first row" if off else "")
            + f" (is this census-income.data / .test?){_cut_hint(complete)}"
          )
        values = [v.strip() for v in row[off:]]
        if off:
          _number(row[0], "int", "index")
        for j in _NUMERIC_AT:
          v = values[j]
          if v != MISSING and v not in tables[j]:
            _number(v, "float", CENSUS_COLUMNS[j])
        for j, ok, what in checks:
          if not ok(values[j]):
            raise _RowError(f"column {CENSUS_COLUMNS[j]!r} holds {values[j]!r}, {what}{_cut_hint(complete)}")
      except _RowError as e:
        bad(line, str(e))
        continue
      for j, v in enumerate(values):
        codes[j].append(tables[j].setdefault(v, len(tables[j])))
  if not seen_line:
    raise ValueError(f"mtjax: {path!r} line 1: the file is empty; expected Census-Income (KDD) rows.")
  if not codes[0]:
    raise _no_rows(path, header_line + 1, bad)
  bad.warn()
  return [_Column(list(t), np.asarray(c, np.int32)) for t, c in zip(tables, codes)]


def _task_label(task: str, values: np.ndarray, path: str) -> np.ndarray:
  """The 0/1 label of each distinct value of the task's column."""
  if task == "income":
    v = np.char.rstrip(values, ".")
    bad = ~np.isin(v, list(_INCOME))
    if bad.any():
      raise ValueError(f"mtjax: {path!r}: income value {values[bad][0]!r} is neither '- 50000.' nor '50000+.'.")
    return (v == "50000+").astype(np.float32)
  if task == "never_married":
    return (values == "Never married").astype(np.float32)
  bad = ~np.isin(values, CENSUS_EDUCATION)
  if bad.any():
    raise ValueError(f"mtjax: {path!r}: unknown education value {values[bad][0]!r}.")
  return np.isin(values, CENSUS_COLLEGE).astype(np.float32)


def census_income(
  data_path: PathLike,
  test_path: Optional[PathLike] = None,
  *,
  tasks: Sequence[str] = ("income", "never_married"),
  seed: int = 0,
  embed_dim: int = 8,
  on_bad_rows: str = "error",
) -> dict[str, MultiTaskDataset]:
  """Loads Census-Income (KDD) (``census-income.data`` / ``census-income.test``) for multi-task learning.

  Tasks (MMoE paper), chosen with ``tasks`` from:

  * ``"income"``: 1 if the income column is ``50000+.``, 0 if ``- 50000.``;
  * ``"never_married"``: 1 if marital status is exactly ``Never married``, 0 for every other value
    (``Married-civilian spouse present``, ``Married-spouse absent``, ``Married-A F spouse present``,
    ``Separated``, ``Divorced``, ``Widowed``);
  * ``"education"``: 1 if education is at least college, i.e. one of :data:`CENSUS_COLLEGE`
    (``Some college but no degree``, both ``Associates degree`` values, Bachelors, Masters,
    Prof school, Doctorate); 0 for ``Children`` .. ``High school graduate``.

  The paper's group 1 is ``("income", "never_married")`` (the default), group 2
  ``("education", "never_married")``. The source columns of the chosen tasks are removed from
  the inputs (so ``education`` stays an input in group 1 and ``income`` in group 2); the
  instance weight is always dropped.

  Inputs: the 7 :data:`CENSUS_NUMERIC` columns, each a dense ``[N]`` float32 field standardized
  with the training mean and standard deviation (a missing numeric value becomes the training
  mean, i.e. 0); every other column a categorical int32 field whose vocabulary is built on the
  training file: the training values sorted are ids ``1..K``, and id ``0`` means missing (``?``)
  or a value never seen in training (vocab size ``K + 1``). Values are stripped of the leading
  space. ``metadata`` holds the vocabularies and the normalization statistics.

  File forms: the UCI files (42 comma-separated fields a row, no header), and the common
  preprocessed CSVs made from them: a header row (recognized because none of its numeric
  columns holds a number; the columns are then still taken by position, in the UCI order of
  :data:`CENSUS_COLUMNS`, whatever their names) and/or a leading index column (rows of 43
  fields, e.g. written by ``pandas.DataFrame.to_csv``; detected on the first row, header or
  data, and then every row must have 43 fields). A UTF-8 byte-order mark is ignored.

  Malformed rows: a row with another number of fields (a file cut mid-row ends with one), a
  numeric column holding something other than a number or ``?`` (``nan`` and ``inf``
  included), a non-integer index, an unknown value in the column of an ``income`` or
  ``education`` task, or a file without any data row raise a ``ValueError`` naming the file,
  the line and the column (``on_bad_rows='error'``, the default); ``on_bad_rows='skip'`` drops
  the malformed rows instead and warns once per file with their count and the first one.

  Splits: ``train`` = the data file; the test file is shuffled with
  ``np.random.default_rng(seed)`` and split 1:1 into ``validation`` (first half, the extra row
  of an odd count goes to ``test``) and ``test``.

  Examples:
    >>> import os
    >>> from mtjax import data
    >>> splits = data.census_income(os.path.join(FIXTURES, 'census'))  # doctest: +SKIP
    >>> splits['train'].task_names  # doctest: +SKIP
    ('income', 'never_married')

  Args:
    data_path: ``census-income.data``, or a directory holding ``census-income.data`` (and
      ``census-income.test``, used when ``test_path`` is None).
    test_path: ``census-income.test`` (optional).
    tasks: task names, in label order.
    seed: seed of the validation/test split.
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).

  Returns:
    ``{'train': ...}`` or ``{'train', 'validation', 'test'}`` of :class:`MultiTaskDataset`.

  References:
    Ma, Zhao, Yi, Chen, Hong, Chi, *Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts*, KDD 2018. Data: UCI Census-Income (KDD), Lane & Kohavi, 2000.
  """
  tasks = tuple(tasks)
  if not tasks or any(t not in _TASKS for t in tasks) or len(set(tasks)) != len(tasks):
    raise ValueError(f"mtjax: census_income tasks must be distinct names from {sorted(_TASKS)}, got {tasks}.")
  _check_on_bad_rows(on_bad_rows)
  data_path = os.fspath(data_path)
  if os.path.isdir(data_path):
    directory = data_path
    data_path = os.path.join(directory, "census-income.data")
    if test_path is None and os.path.isfile(os.path.join(directory, "census-income.test")):
      test_path = os.path.join(directory, "census-income.test")
  data_path = _check_file(data_path, "Census-Income data")
  files = {"train": _read_census(data_path, tasks, on_bad_rows)}
  if test_path is not None:
    test_path = _check_file(test_path, "Census-Income test")
    files["test"] = _read_census(test_path, tasks, on_bad_rows)

  col = {c: i for i, c in enumerate(CENSUS_COLUMNS)}
  label_cols = {_TASKS[t] for t in tasks}
  inputs = [c for c in CENSUS_COLUMNS if c not in label_cols and c != "instance_weight"]
  numeric = [c for c in inputs if c in CENSUS_NUMERIC]
  categorical = [c for c in inputs if c not in CENSUS_NUMERIC]

  train = files["train"]
  vocab = {c: _vocabulary(train[col[c]].values, missing=MISSING) for c in categorical}

  def numbers(column: _Column, c: str, path: str) -> np.ndarray:
    vals = np.full(column.values.shape, np.nan)
    for k, v in enumerate(column.values):
      if v != MISSING:
        try:
          vals[k] = float(v)
        except ValueError:
          raise ValueError(f"mtjax: {path!r}: numeric column {c!r} holds {v!r}.") from None
    return column.map(vals)

  stats = {}
  for c in numeric:
    x = numbers(train[col[c]], c, data_path)
    x = x[~np.isnan(x)]
    mean = float(x.mean()) if x.size else 0.0
    std = float(x.std()) if x.size else 1.0
    stats[c] = (mean, std if std > 0 else 1.0)

  def build(columns: list[_Column], path: str) -> MultiTaskDataset:
    feats = {c: columns[col[c]].map(_map_to_ids(columns[col[c]].values, vocab[c])) for c in categorical}
    for c in numeric:
      mean, std = stats[c]
      x = numbers(columns[col[c]], c, path)
      feats[c] = np.where(np.isnan(x), 0.0, (x - mean) / std).astype(np.float32)
    labels = np.stack(
      [columns[col[_TASKS[t]]].map(_task_label(t, columns[col[_TASKS[t]]].values, path)) for t in tasks]
    )
    return MultiTaskDataset(
      features=feats,
      labels=labels,
      task_names=tasks,
      spec=spec,
      metadata={"name": "census_income", "vocabularies": vocab, "numeric_stats": stats},
    )

  spec = FeatureSpec(
    categorical=tuple(Categorical(c, len(vocab[c]) + 1, embed_dim) for c in categorical),
    dense=tuple(Dense(c) for c in numeric),
  )
  out = {"train": build(train, data_path)}
  if "test" in files:
    test = build(files["test"], test_path)
    order = np.random.default_rng(seed).permutation(len(test))
    half = len(test) // 2
    out["validation"] = test.subset(order[:half])
    out["test"] = test.subset(order[half:])
  return out
