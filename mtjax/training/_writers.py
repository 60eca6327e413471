"""Metrics writers: where :func:`mtjax.training.fit` sends its log records (``log.jsonl``, TensorBoard, a callback).

Every record ``fit`` writes to ``log.jsonl`` -- the training records ``{"step", "losses",
"weights", "cosine", "conflict", ...}`` every ``log_every`` steps and the evaluation records
``{"step", "eval": {task: {metric: value}}}`` -- also goes to each writer of ``fit(writers=...)``.
``fit`` calls, in this order:

* ``start(step, task_names)`` once, before any record: the step training (re)starts from (0 for a
  fresh run, the checkpoint's step for a resumed one) and the task names. A writer that keeps a
  history drops what it holds after ``step`` (a resume replays those steps).
* ``write(step, record)`` for every record (``record["step"] == step``; do not modify it).
* ``flush()`` before every checkpoint: what was written up to it must survive a kill.
* ``close()`` once at the end, also when training fails.

Subclass :class:`MetricsWriter` and implement ``write_scalars(step, scalars)`` to receive the
records flattened to scalars with readable tags (see :func:`scalars`), or ``write`` for the raw
records; any object with a ``write(step, record)`` method works too (missing ``start`` /
``flush`` / ``close`` are skipped), and a plain callable is wrapped in :class:`CallbackWriter`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

_BAD_TAG_CHARS = re.compile(r"[^-/\w.]")  # the characters TensorBoard accepts in a tag (as tensorboardX cleans them)


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: Mapping[str, Any], task_names: Sequence[str] = ()) -> dict[str, float]:
  """A log record flattened to ``{tag: value}``: the scalars a dashboard plots.

  Tags: ``loss/<task>`` and ``weight/<task>`` (the method's task weights), ``conflict`` (the
  fraction of task pairs with negative cosine), ``cosine/<task_i>-<task_j>`` (the upper triangle,
  ``i < j``), ``conflict/<layer>`` (with per-layer similarity), ``eval/<task>/<metric>`` (evaluation
  records, including ``eval/macro/...``) and ``ms_per_step`` if the record has it. Tasks without a
  name in ``task_names`` are called ``task_<i>``.

  Examples:
    >>> from mtjax import training
    >>> rec = {"step": 3, "losses": [0.5, 0.25], "weights": [1.0, 1.0],
    ...        "cosine": [[1.0, -0.5], [-0.5, 1.0]], "conflict": 1.0}
    >>> training.scalars(rec, ["ctr", "cvr"])
    {'loss/ctr': 0.5, 'loss/cvr': 0.25, 'weight/ctr': 1.0, 'weight/cvr': 1.0, 'conflict': 1.0, 'cosine/ctr-cvr': -0.5}
    >>> training.scalars({"step": 10, "eval": {"ctr": {"auc": 0.75}, "macro": {"auc": 0.75}}})
    {'eval/ctr/auc': 0.75, 'eval/macro/auc': 0.75}
  """
  name = lambda i: str(task_names[i]) if i < len(task_names) else f"task_{i}"
  out: dict[str, float] = {}
  for key, prefix in (("losses", "loss"), ("weights", "weight")):
    for i, v in enumerate(record.get(key) or ()):
      out[f"{prefix}/{name(i)}"] = float(v)
  if _number(record.get("conflict")):
    out["conflict"] = float(record["conflict"])
  cos = record.get("cosine")
  if cos is not None:
    for i in range(len(cos)):
      for j in range(i + 1, len(cos)):
        out[f"cosine/{name(i)}-{name(j)}"] = float(cos[i][j])
  if record.get("conflict_layers") is not None and record.get("layers") is not None:
    for layer, v in zip(record["layers"], record["conflict_layers"]):
      out[f"conflict/{layer}"] = float(v)
  ev = record.get("eval")
  if isinstance(ev, Mapping):
    for task, metrics in ev.items():
      for metric, v in metrics.items() if isinstance(metrics, Mapping) else ():
        if _number(v):
          out[f"eval/{task}/{metric}"] = float(v)
  if _number(record.get("ms_per_step")):
    out["ms_per_step"] = float(record["ms_per_step"])
  return out


class MetricsWriter:
  """The writer protocol of :func:`mtjax.training.fit` (``writers=``), with no-op defaults.

  Implement :meth:`write_scalars` (records flattened by :func:`scalars`) or :meth:`write` (the raw
  records), and :meth:`flush` / :meth:`close` if the writer buffers or holds files.

  Examples:
    >>> from mtjax import training
    >>> class Printer(training.MetricsWriter):
    ...   def write_scalars(self, step, values):
    ...     print(step, values)
    >>> w = Printer()
    >>> w.start(0, ["ctr", "cvr"])
    >>> w.write(1, {"step": 1, "losses": [0.5, 0.25], "weights": [1.0, 1.0]})
    1 {'loss/ctr': 0.5, 'loss/cvr': 0.25, 'weight/ctr': 1.0, 'weight/cvr': 1.0}
  """

  task_names: tuple = ()

  def start(self, step: int, task_names: Sequence[str]) -> None:
    """Called once before any record: training (re)starts after ``step`` (0: a fresh run)."""
    del step
    self.task_names = tuple(task_names)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    """One log or evaluation record (as in ``log.jsonl``); the default flattens it for :meth:`write_scalars`."""
    self.write_scalars(step, scalars(record, self.task_names))

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    """The scalars of one record, ``{tag: value}`` (see :func:`scalars`)."""
    raise NotImplementedError(
      f"mtjax: {type(self).__name__} must implement write(step, record) or write_scalars(step, values)."
    )

  def flush(self) -> None:
    """Makes what was written so far durable (called before every checkpoint)."""

  def close(self) -> None:
    """Flushes and releases the writer (called once at the end of ``fit``, also after an error)."""


class CallbackWriter(MetricsWriter):
  """Forwards every record to ``fn``: ``fn(record)`` with a copy of each ``log.jsonl`` record, or
  with ``scalars=True`` ``fn(step, {tag: value})`` (see :func:`scalars`), e.g. for wandb::

    fit(..., writers=[CallbackWriter(lambda step, values: wandb.log(values, step=step), scalars=True)])

  An exception raised by ``fn`` stops training and propagates out of ``fit``.

  Examples:
    >>> from mtjax import training
    >>> seen = []
    >>> w = training.CallbackWriter(seen.append)
    >>> w.start(0, ["a"])
    >>> w.write(5, {"step": 5, "losses": [0.5], "weights": [1.0]})
    >>> seen
    [{'step': 5, 'losses': [0.5], 'weights': [1.0]}]
  """

  def __init__(self, fn: Callable, *, scalars: bool = False):  # pylint: disable=redefined-outer-name
    if not callable(fn):
      raise TypeError(f"mtjax: CallbackWriter needs a callable, got {type(fn).__name__} {fn!r}.")
    self.fn, self.scalars = fn, bool(scalars)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    if self.scalars:
      self.fn(step, scalars(record, self.task_names))
    else:
      self.fn(copy.deepcopy(dict(record)))

  def __repr__(self) -> str:
    return f"CallbackWriter({getattr(self.fn, '__qualname__', self.fn)!r}, scalars={self.scalars})"


class JsonlWriter(MetricsWriter):
  """One JSON object per line, exactly what ``fit`` writes to ``<out_dir>/log.jsonl`` (it uses this writer).

  ``start(step)`` trims an existing file to the records of steps ``<= step`` (dropping a torn last
  line, see :func:`mtjax.training._checkpoint.trim_log`) when resuming, or empties it for a fresh
  run (``step == 0``); records are then appended. :meth:`flush` flushes and fsyncs the file. A
  failed write is a one-line :class:`CheckpointSaveError`.

  Examples:
    >>> import json, os, tempfile
    >>> from mtjax import training
    >>> path = os.path.join(tempfile.mkdtemp(), "log.jsonl")
    >>> w = training.JsonlWriter(path)
    >>> w.start(0, ["a"])
    >>> for s in (1, 2, 3):
    ...   w.write(s, {"step": s, "losses": [1.0 / s]})
    >>> w.close()
    >>> w.start(2, ["a"])  # resumed from a checkpoint of step 2: step 3 is replayed
    >>> w.close()
    >>> [json.loads(line)["step"] for line in open(path)]
    [1, 2]
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._file = None

  def _error(self, e: OSError, hint: str):
    from mtjax.training import _checkpoint  # pylint: disable=import-outside-toplevel

    return _checkpoint.write_error(self.path, e, hint)

  def start(self, step: int, task_names: Sequence[str]) -> None:
    from mtjax.training import _checkpoint  # pylint: disable=import-outside-toplevel

    super().start(step, task_names)
    self.close()
    if step > 0:
      _checkpoint.trim_log(self.path, step)
    elif os.path.exists(self.path):
      try:
        os.remove(self.path)
      except OSError as e:
        raise self._error(e, "Make the output folder writable.") from e
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._file = open(self.path, "a")
    except OSError as e:
      raise self._error(e, "Make the output folder writable.") from e

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    if self._file is None:
      raise ValueError(f"mtjax: JsonlWriter({self.path!r}) is not open; call start(step, task_names) first.")
    try:
      self._file.write(json.dumps(record) + "\n")
    except OSError as e:
      raise self._error(e, "Free disk space or make the folder writable.") from e

  def flush(self) -> None:
    if self._file is not None:
      try:
        self._file.flush()
        os.fsync(self._file.fileno())
      except OSError as e:
        raise self._error(e, "Free disk space or make the folder writable.") from e

  def close(self) -> None:
    f, self._file = self._file, None
    if f is not None:
      try:
        f.close()
      except OSError as e:
        raise self._error(e, "Free disk space or make the folder writable.") from e

  def __repr__(self) -> str:
    return f"JsonlWriter({self.path!r})"


def _tensorboardx():
  try:
    from tensorboardX import event_file_writer  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import summary_pb2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      "mtjax: TensorBoardWriter needs tensorboardX (not installed): pip install 'mtjax[tensorboard]'"
    ) from e
  return event_file_writer, event_pb2, summary_pb2


class TensorBoardWriter(MetricsWriter):
  """TensorBoard event files in ``logdir`` (``tensorboard --logdir <logdir>``), written with ``tensorboardX``.

  Each record becomes one event of scalars tagged as in :func:`scalars` (``loss/<task>``,
  ``weight/<task>``, ``conflict``, ``cosine/<task_i>-<task_j>``, ``eval/<task>/<metric>``; characters
  TensorBoard does not accept become ``_``). Every :meth:`start` opens a new event file that begins
  with the purge marker of ``tensorboardX.SummaryWriter(purge_step=step + 1)``, so TensorBoard
  hides the points of steps after the checkpoint a run resumes from (written before a kill, then
  replayed) and shows every step once. Events are written synchronously (no queue thread), so
  :meth:`flush` before a checkpoint leaves every point up to it in the file.

  Raises:
    ImportError: ``tensorboardX`` is not installed (``pip install 'mtjax[tensorboard]'``).
  """

  def __init__(self, logdir: str):
    _tensorboardx()  # fail now, before training, if it is missing
    self.logdir = os.path.abspath(logdir)
    self._events = None

  def start(self, step: int, task_names: Sequence[str]) -> None:
    event_file_writer, event_pb2, _ = _tensorboardx()
    super().start(step, task_names)
    self.close()
    os.makedirs(self.logdir, exist_ok=True)
    # File names sort by creation time (also two files within one second): TensorBoard reads them in that order.
    self._events = event_file_writer.EventsWriter(os.path.join(self.logdir, "events"), f".{time.time_ns()}")
    purge = int(step) + 1  # what SummaryWriter(purge_step=...) writes: later points of older files are dropped
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=purge, file_version="brain.Event:2"))
    self._events.write_event(
      event_pb2.Event(
        wall_time=time.time(), step=purge, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      )
    )

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._events is None:
      raise ValueError(f"mtjax: TensorBoardWriter({self.logdir!r}) is not open; call start(step, task_names) first.")
    if not values:
      return
    _, event_pb2, summary_pb2 = _tensorboardx()
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(tag=_BAD_TAG_CHARS.sub("_", tag), simple_value=float(v)) for tag, v in values.items()
      ]
    )
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    events, self._events = self._events, None
    if events is not None:
      events.close()

  def __repr__(self) -> str:
    return f"TensorBoardWriter({self.logdir!r})"


def as_writers(writers) -> list:
  """``fit``'s ``writers=`` as a list: a writer or a sequence of writers; callables become
  :class:`CallbackWriter`; anything else is a ``TypeError``."""
  if writers is None:
    return []
  if hasattr(writers, "write") or callable(writers):
    writers = [writers]
  out = []
  for w in writers:
    if hasattr(w, "write"):
      out.append(w)
    elif callable(w):
      out.append(CallbackWriter(w))
    else:
      raise TypeError(
        f"mtjax: fit: writers must be MetricsWriter objects (with write(step, record)) or "
        f"callables taking a record, got {type(w).__name__} {w!r}."
      )
  return out


def call(writer, method: str, *args, user: bool = True) -> None:
  """Calls ``writer.<method>(*args)`` if the writer has it; an error of a user's writer gets a note naming it."""
  fn = getattr(writer, method, None)
  if fn is None:
    return
  try:
    fn(*args)
  except Exception as e:
    if user:
      e.add_note(f"mtjax: raised by the metrics writer {writer!r} in {method}() (fit(writers=...)).")
    raise
