"""Experiment configuration: plain TOML files (or dicts) validated up front.

An experiment file has four tables and two top-level keys::

    name = "mmoe-pcgrad"          # optional, used for the output folder
    seeds = [0]                   # optional, `mtjax compare` runs every seed

    [data]                        # a dataset from mtjax.experiment.DATASETS and its arguments
    name = "conflicting"
    num_samples = 12000

    [model]                       # a model from mtjax.models.available() and its arguments
    name = "mmoe"
    num_experts = 4

    [method]                      # a transform from mtjax.experiment.METHODS and its arguments
    name = "pcgrad"
    # gram_leaves = "expert"      # weights from the Gram of these leaves only (strategy "subset")
    # every = 16                  # amortized: recompute the weights every 16 steps (mtjax.amortized)
    # ema = 0.9                   # amortized: EMA of the weights (CR-MOGM)
    # shared = "model"            # the Gram's parameters: "model" (the model's declared shared
    #                             # parameters, default), "all", or {exclude = ["tower_"]} patterns

    [optimizer]                   # an optax optimizer and its arguments
    name = "adam"
    learning_rate = 0.001

    [train]
    steps = 600
    batch_size = 256
    strategy = "auto"             # per-task gradients: auto | loop | map | vmap | rep | shared | subset
    chunk_size = 0                # at most this many task rows at a time (0: all)
    rep_gram = "sum"              # strategy "rep": "sum" (over the batch) or "stack" (per sample)
    sparse = true                 # exact sparse per-task gradients of embedding tables
    similarity = "model"          # logged task-gradient cosines (shared parameters): "model" or "layer"
    seed = 0
    eval_every = 200              # 0: only at the end
    log_every = 10
    checkpoint_every = 0          # 0: no checkpoints
    keep_checkpoints = 2          # the newest checkpoints kept (mtjax run --from-step N goes back to one)
    tensorboard = false           # true: TensorBoard event files in <out>/tensorboard (mtjax[tensorboard] extra)
    precision = "fp32"            # "bf16": bfloat16 forward/backward, float32 params, method state and losses

Every error (unknown table, key, model, method, optimizer or dataset; wrong type; impossible
value) is one ``ConfigError`` line raised before any training starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from typing import Any, Mapping

TABLES = ("data", "model", "method", "optimizer", "train")
TOP_LEVEL = ("name", "seeds", "methods") + TABLES


class ConfigError(ValueError):
  """A configuration problem, reported before training starts."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 256
  strategy: str = "auto"
  seed: int = 0
  eval_every: int = 0
  log_every: int = 10
  checkpoint_every: int = 0
  eval_batch_size: int = 4096
  track_similarity: bool = True
  chunk_size: int = 0
  rep_gram: str = "sum"
  sparse: bool = True
  similarity: str = "model"  # task-gradient cosines logged over the shared parameters: "model" or per "layer"
  keep_checkpoints: int = 2  # the newest checkpoints kept (raise it to go further back with --from-step)
  tensorboard: bool = False  # also write TensorBoard event files into <out_dir>/tensorboard (needs tensorboardX)
  precision: str = "fp32"  # "bf16": bfloat16 compute, float32 master params / method state / losses (issue #14)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A validated experiment. ``data``/``model``/``method``/``optimizer`` are ``{'name': ..., **kwargs}``."""

  data: dict
  model: dict
  method: dict
  optimizer: dict
  train: TrainConfig
  name: str = "experiment"
  seeds: tuple = (0,)

  def replace(self, **kw) -> ExperimentConfig:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return {
      "name": self.name,
      "seeds": list(self.seeds),
      "data": dict(self.data),
      "model": dict(self.model),
      "method": dict(self.method),
      "optimizer": dict(self.optimizer),
      "train": dataclasses.asdict(self.train),
    }


_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _check_type(where: str, key: str, value: Any, expected: type):
  if expected is int and isinstance(value, bool) or not isinstance(value, _TYPES[expected]):
    raise ConfigError(f"{where}.{key} must be {expected.__name__}, got {type(value).__name__} {value!r}")


def _train_config(raw: Mapping[str, Any]) -> TrainConfig:
  fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
  for k, v in raw.items():
    if k not in fields:
      raise ConfigError(f"[train] has unknown key {k!r}; known keys: {', '.join(fields)}")
    _check_type("train", k, v, type(fields[k].default))
  cfg = TrainConfig(**raw)
  if cfg.steps < 1:
    raise ConfigError(f"train.steps must be >= 1, got {cfg.steps}")
  if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
    raise ConfigError("train.batch_size and train.eval_batch_size must be >= 1")
  if cfg.keep_checkpoints < 1:
    raise ConfigError(f"train.keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
  for k in ("eval_every", "log_every", "checkpoint_every"):
    if getattr(cfg, k) < 0:
      raise ConfigError(f"train.{k} must be >= 0, got {getattr(cfg, k)}")
  from mtjax._src.task_grads import REP_GRAMS
  from mtjax._src.task_grads import STRATEGIES

  strategies = STRATEGIES + ("subset",)
  if cfg.strategy not in strategies:
    raise ConfigError(f"train.strategy must be one of {strategies}, got {cfg.strategy!r}")
  if cfg.chunk_size < 0:
    raise ConfigError(f"train.chunk_size must be >= 0 (0: all task rows at once), got {cfg.chunk_size}")
  if cfg.similarity not in ("model", "layer"):
    raise ConfigError(f"train.similarity must be 'model' or 'layer', got {cfg.similarity!r}")
  from mtjax.training._precision import NAMES as PRECISIONS

  if cfg.precision.lower() not in PRECISIONS:
    raise ConfigError(
      f"train.precision must be 'fp32' (float32, default) or 'bf16' (bfloat16 compute, float32 "
      f"parameters; also 'float32' / 'bfloat16'), got {cfg.precision!r}"
    )
  if cfg.rep_gram not in REP_GRAMS:
    raise ConfigError(f"train.rep_gram must be one of {REP_GRAMS}, got {cfg.rep_gram!r}")
  if cfg.tensorboard and _missing("tensorboardX"):
    raise ConfigError(
      "train.tensorboard = true needs tensorboardX, which is not installed: pip install "
      "'mtjax[tensorboard]' (or set tensorboard = false)"
    )
  return cfg


def _missing(module: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel

  try:
    return importlib.util.find_spec(module) is None
  except (ImportError, ValueError):
    return True


AMORTIZE_KEYS = ("every", "ema")


def _check_amortize(method: Mapping[str, Any]) -> None:
  every, ema = method.get("every"), method.get("ema")
  if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
    raise ConfigError(f"method.every must be an int >= 1 (recompute the weights every k steps), got {every!r}")
  if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1):
    raise ConfigError(f"method.ema must be a number in [0, 1), got {ema!r}")


def _check_shared(method: Mapping[str, Any]) -> None:
  shared = method.get("shared", "model")
  ok = shared in ("model", "all") or (
    isinstance(shared, Mapping)
    and shared
    and set(shared) <= {"include", "exclude"}
    and all(isinstance(v, (str, list)) for v in shared.values())
  )
  if not ok:
    raise ConfigError(
      "method.shared must be \"model\" (the parameters the model declares shared), \"all\", or a "
      f"table {{include = [...], exclude = [...]}} of parameter-path patterns; got {shared!r}"
    )


def _named_table(raw: Mapping[str, Any], table: str, known: Mapping[str, Any]) -> dict:
  if not isinstance(raw, Mapping):
    raise ConfigError(f"[{table}] must be a table, got {type(raw).__name__}")
  if "name" not in raw:
    raise ConfigError(f"[{table}] needs a 'name'; known: {', '.join(sorted(known))}")
  name = raw["name"]
  if name not in known:
    raise ConfigError(f"unknown {table} {name!r}; known: {', '.join(sorted(known))}")
  return dict(raw)


_KIND_WORDS = (
  ("bool", "bool"),
  ("int", "int"),
  ("float", "float"),
  ("str", "str"),
  ("PathLike", "str"),
  ("Sequence", "list"),
  ("Tuple", "list"),
  ("tuple", "list"),
  ("List", "list"),
  ("list", "list"),
  ("Mapping", "table"),
  ("Dict", "table"),
  ("dict", "table"),
)
_KIND_NAMES = {
  "bool": "a boolean (true/false)",
  "int": "an integer",
  "float": "a number",
  "str": "a string",
  "list": "a list",
  "table": "a table",
}


def _value_kind(value: Any) -> str:
  if isinstance(value, bool):
    return "bool"
  if isinstance(value, int):
    return "int"
  if isinstance(value, float):
    return "float"
  if isinstance(value, str):
    return "str"
  if isinstance(value, (list, tuple)):
    return "list"
  return "table" if isinstance(value, Mapping) else type(value).__name__


def _expected_kinds(annotation: Any, default: Any) -> set | None:
  """The TOML value kinds an argument accepts, from its annotation and default; None: unknown (not checked)."""
  text = (
    annotation
    if isinstance(annotation, str)
    else (annotation.__name__ if isinstance(annotation, type) else repr(annotation))
  )
  if annotation is inspect.Parameter.empty:
    text = ""
  while True:  # Sequence[int] is a list, not an int: drop the element types of containers
    inner = re.sub(r"\b(Sequence|Tuple|tuple|List|list|Mapping|Dict|dict|Callable)\[[^\[\]]*\]", r"\1", text)
    if inner == text:
      break
    text = inner
  if re.search(r"\b(Any|PyTree)\b", text):
    return None  # anything goes: the factory checks it
  while "Callable[" in text:  # TOML has no functions: drop Callable[[...], ...] with its brackets
    i = text.index("Callable[")
    depth, j = 0, i + len("Callable")
    for j in range(i + len("Callable"), len(text)):
      depth += {"[": 1, "]": -1}.get(text[j], 0)
      if depth == 0:
        break
    text = text[:i] + text[j + 1 :]
  text = re.sub(r"\bCallable\b", "", text)
  kinds = {kind for word, kind in _KIND_WORDS if re.search(rf"\b{word}\b", text)}
  if re.search(r"\b(ArrayLike|Array|ndarray)\b", text):
    kinds |= {"float", "list"}  # a number, or a list of numbers (e.g. lower_bounds = [0.1, 0.1])
  if default is not inspect.Parameter.empty and default is not None and not callable(default):
    kinds.add(_value_kind(default))
  if not kinds or not kinds <= set(_KIND_NAMES):
    return None
  if "float" in kinds:
    kinds.add("int")  # 1 for 1.0
  return kinds


def check_kwargs(where: str, fn, kwargs: Mapping[str, Any], *, reserved=()) -> None:
  """Unknown keyword arguments of ``fn`` (a factory or a dataclass), or values of the wrong type
  (from its annotations and defaults: ``num_experts = "2"``, ``expert = 8``) -> ConfigError."""
  if dataclasses.is_dataclass(fn):
    fields = {f.name: f for f in dataclasses.fields(fn) if f.init}
    names = set(fields)
    var_kw = False
    spec = {
      n: (f.type, f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
      for n, f in fields.items()
    }
  else:
    sig = inspect.signature(fn)
    names = {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    spec = {p.name: (p.annotation, p.default) for p in sig.parameters.values()}
  for k, v in kwargs.items():
    if k in reserved:
      raise ConfigError(f"{where}.{k} is set by the experiment; remove it from the config")
    if not var_kw and k not in names:
      raise ConfigError(f"{where} has unknown key {k!r}; known keys: {', '.join(sorted(names - set(reserved)))}")
    if k in spec:
      kinds = _expected_kinds(*spec[k])
      if kinds is not None and _value_kind(v) not in kinds:
        want = " or ".join(_KIND_NAMES[x] for x in sorted(kinds - ({"int"} if "float" in kinds else set())))
        raise ConfigError(f"{where}.{k} must be {want}, got {_value_kind(v)} {v!r}")


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
  """Validates a raw mapping (e.g. a parsed TOML file) into an :class:`ExperimentConfig`."""
  from mtjax.experiment import _registry as reg  # registries import heavy modules lazily

  for k in raw:
    if k not in TOP_LEVEL:
      raise ConfigError(f"unknown top-level key {k!r}; expected tables {', '.join(TABLES)} and 'name', 'seeds'")
  missing = [t for t in ("data", "model", "method") if t not in raw]
  if missing:
    raise ConfigError(f"missing table(s) {', '.join('[' + m + ']' for m in missing)}")
  data = _named_table(raw["data"], "data", reg.DATASETS)
  model = _named_table(raw["model"], "model", reg.model_names())
  method = _named_table(raw["method"], "method", reg.METHODS)
  optimizer = _named_table(raw.get("optimizer", {"name": "adam", "learning_rate": 1e-3}), "optimizer", reg.OPTIMIZERS)
  check_kwargs(
    "data", reg.DATASETS[data["name"]], {k: v for k, v in data.items() if k != "name"}, reserved=reg.DATA_RESERVED
  )
  check_kwargs(
    "model",
    reg.model_class(model["name"]),
    {k: v for k, v in model.items() if k != "name"},
    reserved=reg.MODEL_RESERVED,
  )
  check_kwargs(
    "method",
    reg.METHODS[method["name"]],
    {k: v for k, v in method.items() if k not in ("name", "shared") and k not in AMORTIZE_KEYS},
    reserved=reg.METHOD_RESERVED,
  )
  _check_amortize(method)
  _check_shared(method)
  check_kwargs("optimizer", reg.OPTIMIZERS[optimizer["name"]], {k: v for k, v in optimizer.items() if k != "name"})
  lr = optimizer.get("learning_rate")
  if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
    raise ConfigError(f"optimizer.learning_rate must be a positive number, got {lr!r}")
  train = _train_config(raw.get("train", {}))
  seeds = raw.get("seeds", [train.seed])
  if (
    not isinstance(seeds, (list, tuple))
    or not seeds
    or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
  ):
    raise ConfigError(f"seeds must be a non-empty list of ints, got {seeds!r}")
  name = raw.get("name", f"{model['name']}-{method['name']}")
  if not isinstance(name, str) or not name or os.sep in name:
    raise ConfigError(f"name must be a non-empty string without '{os.sep}', got {name!r}")
  cfg = ExperimentConfig(
    data=data, model=model, method=method, optimizer=optimizer, train=train, name=name, seeds=tuple(seeds)
  )
  micro_batches(cfg)  # a micro-batch method's num_batches against the strategy, amortization and batch size
  return cfg


def micro_batches(cfg: ExperimentConfig) -> int:
  """How many independent micro-batches a step of the config's method takes: ``method.num_batches``
  (or its default) for MoDo and SDMGrad, whose factories have that argument; 1 for every other method."""
  from mtjax.experiment import _registry as reg  # pylint: disable=import-outside-toplevel

  params = inspect.signature(reg.METHODS[cfg.method["name"]]).parameters
  if "num_batches" not in params:
    return 1
  value = cfg.method.get("num_batches", params["num_batches"].default)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"method {cfg.method['name']!r}: num_batches must be a positive int, got {value!r}")
  if value > 1 and (int(cfg.method.get("every", 1)) > 1 or cfg.method.get("ema") is not None):
    raise ConfigError(
      f"method {cfg.method['name']!r} with num_batches={value} takes micro-batch gradients "
      "[M, T, ...] every step; it cannot be amortized (method.every / method.ema)"
    )
  if value > 1 and cfg.train.strategy in ("rep", "shared", "subset"):
    raise ConfigError(
      f"method {cfg.method['name']!r} with num_batches={value} needs the per-task rows of "
      f"every micro-batch; train.strategy={cfg.train.strategy!r} gives a lazy Jacobian. "
      "Use strategy 'auto', 'loop', 'map' or 'vmap'"
    )
  if value > cfg.train.batch_size:
    raise ConfigError(
      f"method {cfg.method['name']!r}: num_batches={value} micro-batches need "
      f"train.batch_size >= {value}, got {cfg.train.batch_size}"
    )
  return value


def _is_path_key(key: str) -> bool:
  return key in ("path", "paths") or key.endswith("_path") or key.endswith("_paths")


def resolve_data_paths(raw: Mapping[str, Any], base_dir: str) -> dict:
  """``raw`` with the relative file paths of its ``[data]`` table (keys ``path``, ``*_path``,
  ``*_paths``) made relative to ``base_dir`` (the config file's folder), not the working folder."""
  raw = dict(raw)
  data = raw.get("data")
  if not isinstance(data, Mapping):
    return raw

  def fix(value):
    if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
      return os.path.normpath(os.path.join(base_dir, value))
    return os.path.expanduser(value) if isinstance(value, str) else value

  raw["data"] = {
    k: ([fix(v) for v in value] if isinstance(value, list) else fix(value)) if _is_path_key(k) else value
    for k, value in data.items()
  }
  return raw


def load(path: str) -> ExperimentConfig:
  """Reads and validates a TOML experiment file; relative data paths are relative to its folder."""
  import tomllib

  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  try:
    with open(path, "rb") as f:
      raw = tomllib.load(f)
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"{path}: not valid TOML: {e}") from None
  return from_dict(resolve_data_paths(raw, os.path.dirname(os.path.abspath(path))))


def parse_method(spec: str) -> dict:
  """A method table from a command-line spec ``name[:key=value[:key=value...]]``.

  Values are read as TOML values (``3``, ``0.5``, ``true``, ``"l2"``; a bare word is a string).
  A spec with options is labelled by the whole spec, so that two variants of one method get their
  own rows in a comparison.

  Examples:
    >>> from mtjax.experiment import parse_method
    >>> parse_method("sdmgrad:num_batches=1")
    {'name': 'sdmgrad', 'num_batches': 1, 'label': 'sdmgrad:num_batches=1'}
    >>> parse_method("normalize:inner=upgrad:normalization=loss")["inner"]
    'upgrad'
  """
  import tomllib  # pylint: disable=import-outside-toplevel

  name, *options = [p.strip() for p in spec.strip().split(":")]
  if not name:
    raise ConfigError(f"method spec {spec!r} has no method name (expected name[:key=value...])")
  method: dict = {"name": name}
  for option in options:
    key, eq, text = option.partition("=")
    key, text = key.strip(), text.strip()
    if not eq or not key or not text:
      raise ConfigError(f"method spec {spec!r}: option {option!r} is not key=value")
    try:
      value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
      value = text  # a bare word: a string
    method[key] = value
  if options:
    method["label"] = spec.strip()
  return method
