"""KuaiRand (1K / Pure / 27K) interaction-log loader: three tasks and a natural domain id."""

from __future__ import annotations

import glob
import os
from typing import Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._dataset import _check_file
from mtjax.data._dataset import _check_on_bad_rows
from mtjax.data._dataset import _map_to_ids
from mtjax.data._dataset import _read_csv
from mtjax.data._dataset import _vocabulary
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec

PathLike = Union[str, os.PathLike]

KUAIRAND_COLUMNS = (
  "user_id",
  "video_id",
  "date",
  "hourmin",
  "time_ms",
  "is_click",
  "is_like",
  "is_follow",
  "is_comment",
  "is_forward",
  "is_hate",
  "long_view",
  "play_time_ms",
  "duration_ms",
  "profile_stay_time",
  "comment_stay_time",
  "is_profile_enter",
  "is_rand",
  "tab",
)
_LABELS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "is_profile_enter")
_READ = ("user_id", "video_id", "date", "hourmin", "duration_ms", "is_rand", "tab")


def _log_files(log_paths) -> list[str]:
  if isinstance(log_paths, (str, os.PathLike)):
    path = os.fspath(log_paths)
    if os.path.isdir(path):
      files = sorted(glob.glob(os.path.join(path, "log_standard_*.csv")))
      if not files:
        raise ValueError(f"mtjax: {path!r} holds no log_standard_*.csv file; pass the log file paths.")
      return files
    return [_check_file(path, "KuaiRand log")]
  files = [_check_file(p, "KuaiRand log") for p in log_paths]
  if not files:
    raise ValueError("mtjax: kuairand got an empty list of log files.")
  return files


def kuairand(
  log_paths: Union[PathLike, Sequence[PathLike]],
  *,
  tasks: Sequence[str] = ("is_click", "long_view", "is_like"),
  test_dates: Optional[Sequence[int]] = None,
  embed_dim: int = 8,
  on_bad_rows: str = "error",
) -> dict[str, MultiTaskDataset]:
  """Loads KuaiRand interaction logs (``log_standard_*.csv``) for multi-task, multi-domain learning.

  Columns (header row): ``user_id, video_id, date, hourmin, time_ms, is_click, is_like,
  is_follow, is_comment, is_forward, is_hate, long_view, play_time_ms, duration_ms,
  profile_stay_time, comment_stay_time, is_profile_enter, is_rand, tab``.

  * Split: rows whose ``date`` is in ``test_dates`` (default: the last date over all files) are
    ``test``, the others ``train``.
  * Features (int32 categorical unless noted):

    - ``user_id``, ``video_id``: vocabulary built on train (training ids sorted -> ``1..K``;
      ``0`` = unseen in train or missing);
    - ``tab``: the page the video was shown on, the natural domain id for multi-domain models
      (STAR, PEPNet: ``domain_feature='tab'``); ids kept, vocabulary = max tab + 1 over all
      files (``metadata['num_domains']``);
    - ``hour``: ``hourmin // 100`` (``hourmin`` is HHMM), vocabulary 24;
    - ``duration``: dense float32, ``log1p(duration_ms / 1000)`` standardized with train
      statistics (missing -> 0 after standardization).

    Outcome columns (``play_time_ms``, stay times, the other labels) are never inputs.
  * Tasks: ``tasks`` (default ``is_click, long_view, is_like``), 0/1 labels of all
    impressions (no masks); a missing label is 0.
  * ``extras``: ``user_id`` (raw, int64, for GAUC), ``video_id`` (raw), ``date``, ``is_rand``.
  * Malformed rows: a row with more or fewer fields than the header (a file cut mid-row ends
    with one), a read field that is not an integer (``nan`` and ``inf`` included), a task label
    that is not 0 or 1, an empty ``date``, or a header without any data row raise a
    ``ValueError`` naming the file, the line and the column (``on_bad_rows='error'``, the
    default); ``on_bad_rows='skip'`` drops the malformed rows instead and warns once per file
    with their count and the first one. An empty field of another read column is missing. A
    UTF-8 byte-order mark is ignored.

  Examples:
    >>> from mtjax import data
    >>> splits = data.kuairand('/data/KuaiRand-1K/data')  # doctest: +SKIP
    >>> splits['train'].spec.names  # doctest: +SKIP
    ('user_id', 'video_id', 'tab', 'hour', 'duration')

  Args:
    log_paths: a log file, a list of them, or a directory (all ``log_standard_*.csv`` in it).
    tasks: label columns, in task order (any of the 0/1 outcome columns).
    test_dates: dates (``YYYYMMDD`` ints) of the test split; default the last date.
    embed_dim: embedding width put in the spec.
    on_bad_rows: ``'error'`` (raise at a malformed row) or ``'skip'`` (drop malformed rows, warn).

  Returns:
    ``{'train', 'test'}`` of :class:`MultiTaskDataset`.

  References:
    Gao, Li, Wang, Chen, Sun, Yu, Zhang, Wu, *KuaiRand: An Unbiased Sequential Recommendation
    Dataset with Randomly Exposed Videos*, CIKM 2022.
  """
  tasks = tuple(tasks)
  if not tasks or any(t not in _LABELS for t in tasks) or len(set(tasks)) != len(tasks):
    raise ValueError(f"mtjax: kuairand tasks must be distinct names from {_LABELS}, got {tasks}.")
  _check_on_bad_rows(on_bad_rows)
  columns = _READ + tasks
  parts, missing_parts = [], []
  for path in _log_files(log_paths):
    values, missing = _read_csv(
      path,
      {name: "int" for name in columns},
      required=("date",),
      on_bad_rows=on_bad_rows,
      allowed={t: (0, 1) for t in tasks},
    )
    parts.append(np.stack([values[name] for name in columns], axis=1))
    missing_parts.append(np.stack([missing[name] for name in columns], axis=1))
  values = np.concatenate(parts)
  missing = np.concatenate(missing_parts)
  c = {name: j for j, name in enumerate(columns)}
  if missing[:, c["date"]].any():
    raise ValueError("mtjax: a KuaiRand log row has no date; the train/test split needs it.")
  date = values[:, c["date"]]
  test_dates = (int(date.max()),) if test_dates is None else tuple(int(d) for d in test_dates)
  is_test = np.isin(date, test_dates)
  if is_test.all() or not is_test.any():
    raise ValueError(
      f"mtjax: test_dates {test_dates} leave an empty split; the logs span dates {int(date.min())}..{int(date.max())}."
    )

  train = ~is_test
  vocab = {}
  for name in ("user_id", "video_id"):
    col = np.where(missing[:, c[name]], -1, values[:, c[name]])
    vocab[name] = _vocabulary(col[train], missing=-1)
  tab = np.where(missing[:, c["tab"]], 0, values[:, c["tab"]])
  if (tab < 0).any():
    raise ValueError("mtjax: KuaiRand tab ids must be >= 0.")
  num_domains = int(tab.max()) + 1
  hour = np.clip(values[:, c["hourmin"]] // 100, 0, 23)
  dur_ok = ~missing[:, c["duration_ms"]]
  dur = np.log1p(np.maximum(values[:, c["duration_ms"]], 0) / 1000.0)
  ref = dur[train & dur_ok]
  mean = float(ref.mean()) if ref.size else 0.0
  std = float(ref.std()) if ref.size and ref.std() > 0 else 1.0
  duration = np.where(dur_ok, (dur - mean) / std, 0.0).astype(np.float32)

  spec = FeatureSpec(
    categorical=(
      Categorical("user_id", len(vocab["user_id"]) + 1, embed_dim),
      Categorical("video_id", len(vocab["video_id"]) + 1, embed_dim),
      Categorical("tab", num_domains, embed_dim),
      Categorical("hour", 24, embed_dim),
    ),
    dense=(Dense("duration"),),
  )
  feats = {
    "user_id": _map_to_ids(np.where(missing[:, c["user_id"]], -1, values[:, c["user_id"]]), vocab["user_id"]),
    "video_id": _map_to_ids(np.where(missing[:, c["video_id"]], -1, values[:, c["video_id"]]), vocab["video_id"]),
    "tab": tab.astype(np.int32),
    "hour": hour.astype(np.int32),
    "duration": duration,
  }
  labels = np.stack([values[:, c[t]] > 0 for t in tasks]).astype(np.float32)
  extras = {
    "user_id": values[:, c["user_id"]],
    "video_id": values[:, c["video_id"]],
    "date": date,
    "is_rand": values[:, c["is_rand"]],
  }
  full = MultiTaskDataset(
    features=feats,
    labels=labels,
    task_names=tasks,
    spec=spec,
    extras=extras,
    metadata={
      "name": "kuairand",
      "test_dates": test_dates,
      "num_domains": num_domains,
      "domain_feature": "tab",
      "duration_stats": (mean, std),
    },
  )
  return {"train": full.subset(np.flatnonzero(train)), "test": full.subset(np.flatnonzero(is_test))}
