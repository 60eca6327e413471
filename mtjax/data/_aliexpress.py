"""AliExpress (processed CSV, one directory per country) loader."""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._dataset import _check_file
from mtjax.data._dataset import _check_on_bad_rows
from mtjax.data._dataset import _read_csv
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

PathLike = Union[str, os.PathLike]

ALIEXPRESS_CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
ALIEXPRESS_NUMERICAL = tuple(f"numerical_{i}" for i in range(1, 64))
ALIEXPRESS_COUNTRIES = ("NL", "ES", "FR", "US")


def _country_dir(path: str, country: Optional[str]) -> str:
  if country is not None:
    path = os.path.join(path, f"AliExpress_{country}")
  if not os.path.isdir(path):
    raise ValueError(f"mtjax: AliExpress directory {path!r} does not exist.")
  if not os.path.isfile(os.path.join(path, "train.csv")):
    found = sorted(d for d in os.listdir(path) if d.startswith("AliExpress_"))
    hint = f" It holds {found}: pass country=... (one of {ALIEXPRESS_COUNTRIES})." if found else ""
    raise ValueError(f"mtjax: {path!r} has no train.csv; pass an AliExpress_<country> directory.{hint}")
  return path


def aliexpress(
  path: PathLike, country: Optional[str] = None, *, embed_dim: int = 8, on_bad_rows: str = "error"
) -> dict[str, MultiTaskDataset]:
  """Loads one country of the AliExpress dataset (``AliExpress_{NL,ES,FR,US}/{train,test}.csv``).

  Each CSV has a header with ``search_id``, ``categorical_1`` .. ``categorical_16`` (integer
  ids), ``numerical_1`` .. ``numerical_63`` (floats in ``[0, 1]``), ``click`` and ``conversion``.

  * Features: the 16 categorical columns as int32 fields (ids kept as they are; vocabulary size
    = max id + 1 over train and test), and the 63 numerical columns as ONE dense field
    ``numerical`` of width 63 (float32 ``[N, 63]``).
  * Tasks ``('click', 'conversion')``: ``labels[1]`` is the file's ``conversion`` column, which
    is click-and-purchase over all impressions (the CTCVR label). ``masks[0]`` is all True and
    ``masks[1] = click`` (where ``labels[1]`` is the CVR label, for masked CVR losses; drop the
    masks, ``dataclasses.replace(ds, masks=None)``, to train both tasks on all impressions).
  * Missing values (empty fields; the published files have none): a missing categorical id
    gets its own id ``max id + 1`` (the vocabulary grows by one for that column), a missing
    numerical value is 0.0, a missing label is 0.
  * ``extras['search_id']``: int64 (the search session of each impression).

  * Malformed rows: a row with more or fewer fields than the header (a file cut mid-row ends
    with one), a field that is not a number, ``nan`` / ``inf`` (the files have none), a
    non-integer id, a label that is not 0 or 1, or a header without any data row raise a
    ``ValueError`` naming the file, the line and the column (``on_bad_rows='error'``, the
    default); ``on_bad_rows='skip'`` drops the malformed rows instead and warns once per file
    with their count and the first one. Columns are found by their header names (any order;
    extra columns are not read, but every row must have as many fields as the header); a UTF-8
    byte-order mark is ignored.

  Parsing uses ``np.loadtxt`` (fast C parser), falling back to a line-by-line reader (which
  finds the line of a malformed row) when a field is empty or anything is off.

  Examples:
    >>> from mtjax import data
    >>> splits = data.aliexpress('/data/aliexpress', country='NL')  # doctest: +SKIP
    >>> splits['train'].features['numerical'].shape  # doctest: +SKIP
    (N, 63)

  Args:
    path: an ``AliExpress_<country>`` directory, or the directory holding them with ``country``.
    country: ``'NL'``, ``'ES'``, ``'FR'`` or ``'US'`` (with a parent ``path``).
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).

  Returns:
    ``{'train', 'test'}`` of :class:`MultiTaskDataset` (``'test'`` only if ``test.csv`` exists).

  References:
    Li, Zhao, Chen, Guo, Xu, Chen, Zhang, Liu, *Improving Multi-Scenario Learning to Rank in
    E-commerce by Exploiting Task Relationships in the Label Space*, CIKM 2020 (the dataset).
  """
  directory = _country_dir(os.fspath(path), country)
  files = {"train": os.path.join(directory, "train.csv")}
  if os.path.isfile(os.path.join(directory, "test.csv")):
    files["test"] = os.path.join(directory, "test.csv")

  _check_on_bad_rows(on_bad_rows)
  schema = {c: "int" for c in ("search_id",) + ALIEXPRESS_CATEGORICAL}
  schema.update({c: "float" for c in ALIEXPRESS_NUMERICAL + ("click", "conversion")})
  raw = {}
  for split, file in files.items():
    file = _check_file(file, f"AliExpress {split}")
    values, missing = _read_csv(file, schema, on_bad_rows=on_bad_rows, allowed={"click": (0, 1), "conversion": (0, 1)})
    ids = np.stack([values[c] for c in ("search_id",) + ALIEXPRESS_CATEGORICAL], axis=1)
    ids_missing = np.stack([missing[c] for c in ("search_id",) + ALIEXPRESS_CATEGORICAL], axis=1)
    num = np.stack([values[c] for c in ALIEXPRESS_NUMERICAL + ("click", "conversion")], axis=1)
    num_missing = np.stack([missing[c] for c in ALIEXPRESS_NUMERICAL + ("click", "conversion")], axis=1)
    del values, missing
    if ((ids < 0) & ~ids_missing).any():
      raise ValueError(f"mtjax: {file!r} has negative categorical ids; AliExpress ids are >= 0.")
    raw[split] = (ids, ids_missing, num, num_missing)

  # Vocabulary: max id + 1 over train and test; a missing id gets the next id.
  vocab, missing_id = [], []
  for j in range(len(ALIEXPRESS_CATEGORICAL)):
    seen = [r[0][:, 1 + j][~r[1][:, 1 + j]] for r in raw.values()]
    top = max((int(s.max()) for s in seen if s.size), default=-1)
    any_missing = any(r[1][:, 1 + j].any() for r in raw.values())
    missing_id.append(top + 1)
    vocab.append(top + 1 + int(any_missing))
  spec = FeatureSpec(
    categorical=tuple(Categorical(c, max(v, 1), embed_dim) for c, v in zip(ALIEXPRESS_CATEGORICAL, vocab)),
    dense=(Dense("numerical", len(ALIEXPRESS_NUMERICAL)),),
  )

  out = {}
  for split, (ids, ids_missing, num, num_missing) in raw.items():
    feats = {}
    for j, c in enumerate(ALIEXPRESS_CATEGORICAL):
      feats[c] = np.where(ids_missing[:, 1 + j], missing_id[j], ids[:, 1 + j]).astype(np.int32)
    feats["numerical"] = np.where(num_missing[:, :63], 0.0, num[:, :63]).astype(np.float32)
    click = num[:, 63] > 0.5
    conversion = num[:, 64] > 0.5
    out[split] = MultiTaskDataset(
      features=feats,
      labels=np.stack([click, conversion]).astype(np.float32),
      masks=np.stack([np.ones_like(click), click]),
      task_names=("click", "conversion"),
      spec=spec,
      extras={"search_id": ids[:, 0]},
      metadata={"name": "aliexpress", "directory": directory},
    )
  return out
