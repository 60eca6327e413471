"""The training loop: a jitted train step, evaluation, logging, progress and exact resume."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax import analysis
from mtjax import losses as losses_lib
from mtjax import metrics as metrics_lib
from mtjax._src import numerics
from mtjax._src.task_grads import task_grads
from mtjax.training import _checkpoint
from mtjax.training import _distributed
from mtjax.training import _precision
from mtjax.training import _writers


class TrainState(NamedTuple):
  """Everything a run needs to continue: a pytree, checkpointed whole.

  Attributes:
    step: int32 scalar, steps taken.
    params: model parameters.
    opt_state: state of the whole ``optax`` chain, including the gradient method's state
      (task weights, EMA targets, PRNG keys, loss history, inner optimizer state).
    variables: the model's other collections (e.g. STAR's per-domain ``batch_stats``), or ``{}``.
    rng: PRNG key for dropout and other training randomness, split every step.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  variables: Any
  rng: jax.Array


def init_state(model, tx: optax.GradientTransformation, sample_x, *, seed: int = 0) -> TrainState:
  """Initialises params (from ``sample_x``), the optimizer state and the RNG of a run."""
  key = jax.random.PRNGKey(seed)
  init_key, dropout_key, rng = jax.random.split(key, 3)
  variables = dict(model.init({"params": init_key, "dropout": dropout_key}, sample_x, train=False))
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), variables=variables, rng=rng
  )


def method_weights(opt_state) -> Optional[jax.Array]:
  """The task weights the gradient method recorded at its last step (its state's ``weights``)."""
  stack = [opt_state]
  while stack:
    s = stack.pop(0)
    w = getattr(s, "weights", None)
    if w is not None and hasattr(w, "shape") and np.size(w) > 0:
      return w
    inner = getattr(s, "inner_state", None)
    if inner is not None:
      stack.append(inner)
    elif isinstance(s, tuple) and not hasattr(s, "_fields"):
      stack.extend(s)
  return None


def default_task_losses(task_types: Sequence[str]) -> tuple:
  """``"bce"`` for binary tasks, ``"mse"`` for regression tasks."""
  return tuple("bce" if t == "binary" else "mse" for t in task_types)


def make_train_step(
  model,
  tx,
  *,
  task_losses: Union[losses_lib.LossSpec, Sequence[losses_lib.LossSpec]] = "bce",
  multi_task_loss=None,
  masked: bool = False,
  weighted: bool = False,
  strategy: str = "auto",
  mutable: Sequence[str] = (),
  track_similarity: bool = True,
  donate: bool = True,
  sparse: bool = True,
  chunk_size: Optional[int] = None,
  rep_gram: str = "sum",
  shared=None,
  similarity_granularity: str = "model",
  micro_batches: int = 1,
  precision=None,
) -> Callable:
  """A jitted ``step(state, batch) -> (state, metrics)``: forward, per-task gradients, method, optimizer.

  ``metrics`` holds ``losses [T]``, ``weights [T]`` (the method's, ones if it records none) and,
  with ``track_similarity``, the whole-model task-gradient ``cosine [T, T]`` and ``conflict``
  fraction over the ``shared`` parameters (a ``shared=`` mask; ``None``: every parameter), and with
  ``similarity_granularity="layer"`` also ``cosine_groups [K, T, T]`` / ``conflict_groups [K]`` per
  layer, computed from the same per-task gradients (no second backward): with
  ``strategy="rep"`` those of the representation's gradients, with ``"shared"`` those of the
  trunk's parameters. ``strategy="subset"`` (weights from the Gram of a method's ``gram_leaves``,
  one backward for the update) keeps the Jacobian deferred and tracks no similarity. The state
  buffers are donated, so the input state must not be used after the call.

  ``masked`` / ``weighted``: the batch has a ``"mask"`` / ``"weights"`` ``[T, B]`` entry (a dataset's
  masks / sample weights; :func:`fit` sets both from the training set).

  ``step(state, batch, validation_batch)`` also passes ``validation_batch=`` to ``tx.update`` (for a
  transform with a meta loss, :func:`mtjax.auto_lambda`): the batch dict with the model's current
  non-parameter collections added under ``"variables"`` (see :func:`validation_loss_fn`).

  ``micro_batches=M > 1`` feeds a method that takes several independent stochastic Jacobians per
  step (:func:`mtjax.modo`, :func:`mtjax.sdmgrad`): the batch is split along its sample axis into
  ``M`` consecutive parts (sizes differ by at most one; see :func:`split_batch`), the per-task
  gradients of each part are computed with their own dropout key, and the method receives leaves
  ``[M, T, *param.shape]`` with ``task_losses`` ``[M, T]``. Rows are dense (``sparse`` does not
  apply) and the strategy must be a row strategy (``"auto"``, ``"loop"``, ``"map"``, ``"vmap"``).
  The logged ``losses`` and the similarity are those of the whole batch: the parts' losses and
  gradients averaged with weights ``size_m / B`` (for per-sample mean losses, exactly the whole
  batch's). Non-parameter collections (``batch_stats``) are updated by the parts in turn.

  ``precision="bf16"`` (or a :class:`Precision`): mixed precision with float32 master parameters.
  The step casts the parameters and the floating inputs to bfloat16, runs the forward and the
  per-task backward passes in bfloat16 (so the method receives bfloat16 rows, half the memory),
  casts the model outputs to float32 (losses, logged metrics and similarity are float32), and the
  method computes its Gram, solver and state in float32 and returns a float32 update, applied by the
  optimizer to the float32 parameters. Non-parameter collections stay float32. The default
  (``None`` / ``"fp32"``) inserts no cast: the step is the float32 one.
  """
  policy = _precision.Precision.from_name(precision)
  if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, np.integer)) or micro_batches < 1:
    raise ValueError(f"mtjax: make_train_step: micro_batches must be a positive int, got {micro_batches!r}.")
  micro_batches = int(micro_batches)
  if micro_batches > 1 and strategy in ("rep", "shared", "subset"):
    raise ValueError(
      f"mtjax: make_train_step: micro_batches={micro_batches} (a method on independent micro-batches: MoDo, "
      f"SDMGrad) needs stacked per-task rows of every part; strategy={strategy!r} gives a lazy Jacobian. Use "
      "strategy 'auto', 'loop', 'map' or 'vmap'."
    )
  if strategy == "subset":
    track_similarity = False
  loss_fn = losses_lib.make_loss_fn(
    policy.wrap_apply(model) if policy.mixed else model,
    task_losses,
    mask_key="mask" if masked else None,
    weight_key="weights" if weighted else None,
    train=True,
    mutable=tuple(mutable),
    has_aux=True,
    multi_task_loss=multi_task_loss,
  )
  # Without similarity tracking the per-task gradients stay deferred (a TaskJacobian): methods whose
  # weights do not read the gradients (linear, DWA, uncertainty, RLW) then need one backward pass.
  if micro_batches > 1:  # MoDo / SDMGrad: stacked dense rows of every part
    grad_fn = task_grads(loss_fn, strategy=strategy, has_aux=True, deferred=False, sparse=False, chunk_size=chunk_size)
  else:
    grad_fn = task_grads(
      loss_fn,
      strategy="auto" if strategy == "subset" else strategy,
      has_aux=True,
      deferred=not track_similarity,
      sparse=sparse,
      chunk_size=chunk_size,
      rep_gram=rep_gram,
    )

  def micro_batch_grads(params, batch, dropout_key, variables):
    """Per-task losses ``[M, T]`` and gradients ``[M, T, ...]`` of the parts, the variables after them,
    and the whole batch's losses ``[T]`` and gradients ``[T, ...]`` (size-weighted means of the parts; ``None``
    without similarity tracking)."""
    parts = split_batch(batch, micro_batches)
    sizes = np.array([sample_count(p) for p in parts], np.float64)
    share = jnp.asarray(sizes / sizes.sum(), jnp.float32)
    outs = []
    for part, key in zip(parts, jax.random.split(dropout_key, micro_batches)):
      (losses_m, aux_m), grads_m = grad_fn(params, part, {"dropout": key}, variables)
      if mutable:
        variables = {**variables, **aux_m["updates"]}
      outs.append((losses_m, grads_m))
    losses, grads = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    mean = lambda x: jnp.tensordot(share.astype(x.dtype), x, axes=1)
    # The whole batch's rows only feed the similarity: not computed (a [T, P] pass) when it is not tracked.
    return losses, grads, variables, (mean(losses), jax.tree.map(mean, grads) if track_similarity else None)

  def step(state: TrainState, batch, validation_batch=None):
    rng, dropout_key = jax.random.split(state.rng)
    # Mixed precision: the per-task gradients of the bfloat16 copy of the params (bfloat16 rows).
    grad_params = policy.cast_to_compute(state.params) if policy.mixed else state.params
    if micro_batches > 1:
      task_losses_, grads, variables, (logged_losses, logged_grads) = micro_batch_grads(
        grad_params, batch, dropout_key, state.variables
      )
    else:
      (task_losses_, aux), grads = grad_fn(grad_params, batch, {"dropout": dropout_key}, state.variables)
      variables = {**state.variables, **aux["updates"]} if mutable else state.variables
      logged_losses, logged_grads = task_losses_, grads
    extra = {}
    if validation_batch is not None:  # for transforms with a meta loss (mtjax.auto_lambda)
      extra["validation_batch"] = {**validation_batch, "variables": state.variables}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, task_losses=task_losses_, **extra)
    if policy.mixed:  # every built-in method returns the params' dtype; a user's may not
      updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, state.params)
    params = optax.apply_updates(state.params, updates)
    w = method_weights(opt_state)
    metrics = {"losses": logged_losses, "weights": jnp.ones_like(logged_losses) if w is None else w}
    if track_similarity:
      if hasattr(logged_grads, "similarity_gram"):  # rep / shared: the Gram they hold, no extra backward pass
        cos = numerics.cosine_from_gram(logged_grads.similarity_gram())
        metrics["cosine"], metrics["conflict"] = cos, analysis.conflict_fraction(cos)
      else:
        stats = analysis.track(logged_grads, granularity=similarity_granularity, shared=shared)
        metrics["cosine"], metrics["conflict"] = stats["cosine"], stats["conflict"]
        if similarity_granularity != "model":
          metrics["cosine_groups"], metrics["conflict_groups"] = stats["cosine_groups"], stats["conflict_groups"]
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, variables=variables, rng=rng)
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,) if donate else ())


SAMPLE_AXIS_1 = ("labels", "mask", "weights")  # [T, B]: task axis first; every other entry is sample-major


def sample_count(batch: Mapping[str, Any]) -> int:
  """The number of samples of a batch dict (axis 1 of ``labels``, else axis 0 of the first array)."""
  if "labels" in batch:
    return int(np.shape(batch["labels"])[1])
  return int(np.shape(jax.tree.leaves(batch)[0])[0])


def split_batch(batch: Mapping[str, Any], num_parts: int) -> list:
  """``num_parts`` consecutive parts of a batch along its sample axis, as :func:`numpy.array_split`:
  the first ``B mod num_parts`` parts have one sample more. The sample axis is axis 1 of ``labels``
  and ``mask`` (``[T, B]``) and axis 0 of every other array (the features, nested or not).

  Examples:
    >>> import numpy as np
    >>> from mtjax import training
    >>> batch = {"x": np.arange(10.0).reshape(5, 2), "labels": np.zeros((3, 5))}
    >>> [(p["x"].shape, p["labels"].shape) for p in training.split_batch(batch, 2)]
    [((3, 2), (3, 3)), ((2, 2), (3, 2))]
  """
  n = sample_count(batch)
  if not 1 <= num_parts <= n:
    raise ValueError(
      f"mtjax: split_batch: cannot split a batch of {n} samples into {num_parts} non-empty parts; "
      f"use a batch size of at least {num_parts}."
    )
  sizes = [n // num_parts + (1 if m < n % num_parts else 0) for m in range(num_parts)]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  parts = []
  for m in range(num_parts):

    def cut(x, axis, m=m):
      if np.shape(x)[axis] != n:
        raise ValueError(
          f"mtjax: split_batch: a batch entry of shape {np.shape(x)} has no sample axis {axis} of "
          f"size {n} (features are [B, ...], labels and mask [T, B])."
        )
      return jax.lax.slice_in_dim(jnp.asarray(x), int(starts[m]), int(starts[m + 1]), axis=axis)

    parts.append({k: jax.tree.map(lambda x, k=k: cut(x, 1 if k in SAMPLE_AXIS_1 else 0), v) for k, v in batch.items()})
  return parts


def validation_loss_fn(
  model,
  task_losses: Union[losses_lib.LossSpec, Sequence[losses_lib.LossSpec]] = "bce",
  *,
  multi_task_loss=None,
  masked: bool = False,
  precision=None,
) -> Callable:
  """``meta_loss_fn(params, validation_batch) -> [T]``: the model's task losses on a validation batch.

  The meta loss of :func:`mtjax.auto_lambda` as :func:`fit` (``validation_ds=``) and
  :func:`make_train_step` call it: the model in evaluation mode (no dropout) with the non-parameter
  collections (e.g. ``batch_stats``) the training step adds to the batch under ``"variables"``
  (none: ``{}``), and the same per-task losses as training.

  Examples:
    >>> import optax, mtjax
    >>> from mtjax import data, models, training
    >>> ds = data.mmoe_synthetic(64, 0.5, dim=4, seed=0)
    >>> model = models.MMoE(num_tasks=2, num_experts=2, expert=(4,), tower=(4, 1))
    >>> meta = training.validation_loss_fn(model, ("mse", "mse"))
    >>> tx = optax.chain(mtjax.auto_lambda(meta, num_tasks=2, virtual_lr=1e-2), optax.sgd(1e-2))
    >>> res = training.fit(model, tx, ds, steps=2, batch_size=16, validation_ds=ds, progress=False)
    >>> res.state.opt_state[0].lambdas.shape
    (2,)
  """
  policy = _precision.Precision.from_name(precision)  # the training step's (bf16: float32 losses)
  loss_fn = losses_lib.make_loss_fn(
    policy.wrap_apply(model) if policy.mixed else model,
    task_losses,
    mask_key="mask" if masked else None,
    train=False,
    has_aux=True,
    multi_task_loss=multi_task_loss,
  )

  def meta_loss_fn(params, batch):
    batch = dict(batch)
    variables = batch.pop("variables", {})
    losses, _ = loss_fn(params, batch, None, variables)
    return losses

  return meta_loss_fn


def task_scores(outputs, aux) -> jax.Array:
  """Evaluation scores ``[T, B]``: ``exp(aux['task_log_probs'])`` when a model provides the
  probabilities of its supervised events (ESMM: pCTR and pCTCVR), else the outputs."""
  if isinstance(aux, Mapping) and "task_log_probs" in aux:
    return jnp.exp(aux["task_log_probs"])
  return outputs


def make_predict_fn(model, precision=None) -> Callable:
  """A jitted ``predict(params, variables, x) -> (scores [T, B], is_prob)`` in eval mode (with
  ``precision="bf16"``: the model in bfloat16, float32 scores)."""
  policy = _precision.Precision.from_name(precision)
  apply_fn = policy.wrap_apply(model) if policy.mixed else model.apply

  @jax.jit
  def predict(params, variables, x):
    out = apply_fn({"params": params, **variables}, x, train=False)
    outputs, aux = out if isinstance(out, tuple) else (out, {})
    return task_scores(outputs, aux)

  return predict


def evaluate(model, state: TrainState, dataset, *, batch_size: int = 4096, predict_fn=None, precision=None) -> dict:
  """Per-task metrics on ``dataset``: AUC and logloss for binary tasks, MSE for regression.

  Scores of binary tasks are logits unless the model reports probabilities (``task_log_probs``).
  Masked labels are left out per task. Returns ``{task: {metric: value}, 'macro': {...}}``.
  ``precision``: the model's forward pass as in training (see :func:`make_train_step`); the metrics
  are computed in float64 on the host either way. In a multi-controller run every process calls
  it and gets the same result: the state's arrays are brought to the host (a replicated state as
  it is, a sharded one gathered) and evaluated on this process's devices.
  """
  if _distributed.is_multihost():  # the global (replicated) state as host arrays: evaluated on this process alone
    state = _distributed.host_tree(state)
  predict = predict_fn or make_predict_fn(model, precision)
  n = len(dataset)
  chunks = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(n, start + batch_size))
    b = dataset.batch(idx)
    chunks.append(np.asarray(predict(state.params, state.variables, b["x"]), np.float64))
  scores = np.concatenate(chunks, axis=1)
  probs_given = _reports_probs(model, state, dataset)
  result: dict = {}
  for t, (name, ttype) in enumerate(zip(dataset.task_names, dataset.task_types)):
    keep = dataset.masks[t] if dataset.masks is not None else np.ones(n, bool)
    y, s = dataset.labels[t][keep], scores[t][keep]
    if ttype == "binary":
      p = s if probs_given else 1.0 / (1.0 + np.exp(-s))
      result[name] = {"auc": metrics_lib.auc(y, s), "logloss": metrics_lib.logloss(y, np.clip(p, 0, 1))}
    else:
      result[name] = {"mse": float(np.mean((s - y) ** 2)) if len(y) else float("nan")}
  keys = sorted({k for v in result.values() for k in v})
  result["macro"] = {k: float(np.nanmean([v[k] for v in result.values() if k in v])) for k in keys}
  return result


def _reports_probs(model, state, dataset) -> bool:
  x = dataset.batch(np.arange(min(2, len(dataset))))["x"]
  out = jax.eval_shape(
    lambda p, v, x: model.apply({"params": p, **v}, x, train=False), state.params, state.variables, x
  )
  return isinstance(out, tuple) and isinstance(out[1], Mapping) and "task_log_probs" in out[1]


def _check_chain_order(tx, state: TrainState, num_tasks: int, validation_batch=None, micro_batches: int = 1) -> None:
  """An optimizer state that changes shape after one update means an optax optimizer sits before
  the mtjax method: it received the per-task gradients ``[T, ...]`` and keeps per-task moments (a
  different algorithm, silently). Checked on the chain's abstract evaluation with dense per-task
  gradients (no computation); a chain that cannot be evaluated this way is left to the step."""
  lead = (micro_batches, num_tasks) if micro_batches > 1 else (num_tasks,)  # MoDo / SDMGrad: [M, T, ...]
  grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(lead + tuple(np.shape(p)), p.dtype), state.params)
  losses = jax.ShapeDtypeStruct(lead, jnp.float32)
  extra = {} if validation_batch is None else {"validation_batch": {**validation_batch, "variables": state.variables}}
  try:
    with jax.numpy_rank_promotion("allow"):  # what a misplaced optimizer's broadcasting relies on
      _, out_state = jax.eval_shape(
        lambda g, s, p, l, e: tx.update(g, s, p, task_losses=l, **e),
        grads,
        state.opt_state,
        state.params,
        losses,
        extra,
      )
  except ValueError as e:  # the method's own test of the chain order (mtjax._src.composition) says the same
    if str(e).startswith("mtjax:") and "changes shape after one step" in str(e):
      raise
    return
  except Exception:  # pylint: disable=broad-except
    return
  before = [tuple(np.shape(x)) for x in jax.tree.leaves(state.opt_state)]
  after = [tuple(x.shape) for x in jax.tree.leaves(out_state)]
  if before != after:
    changed = next((b, a) for b, a in zip(before, after) if b != a) if len(before) == len(after) else (None, None)
    raise ValueError(
      "mtjax: fit: the optimizer state changes shape after one step"
      + (f" ({changed[0]} -> {changed[1]})" if changed[0] is not None else "")
      + ": an optax transform placed before the mtjax method receives the per-task gradients [T, ...] "
      "and keeps per-task state. Put the mtjax method first: optax.chain(mtjax.pcgrad(...), optax.adam(...))."
    )


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns: the final state, the per-step log, evaluations and timing."""

  state: TrainState
  history: list  # log records (dicts), one per log_every steps
  evals: list  # (step, metrics) pairs
  final_eval: Optional[dict]
  ms_per_step: float  # median wall time of a step after compilation (this process's steps)
  similarity: analysis.SimilarityHistory


def _to_host(tree):
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh, data_axis: str = "data") -> dict:
  """Puts a batch on ``mesh``, split along its batch dimension over ``data_axis``.

  The batch dimension is the first of every feature array and the second of ``labels`` /
  ``mask`` (``[T, B]``, task axis first).
  """
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  out = {}
  for key, value in batch.items():
    spec = P(None, data_axis) if key in SAMPLE_AXIS_1 else P(data_axis)
    out[key] = jax.tree.map(lambda a, spec=spec: jax.device_put(a, NamedSharding(mesh, spec)), value)
  return out


def _process_part(mesh: Optional[jax.sharding.Mesh], data_axis: str, batch_size: int) -> tuple[int, int]:
  """``(part, parts)`` of a multi-controller run: this process's devices of ``mesh`` hold rows
  ``[part * B / parts, (part + 1) * B / parts)`` of every global batch of ``B = batch_size``
  samples (what it reads); checks that ``mesh`` spans every process's devices."""
  if mesh is None:
    raise ValueError(
      f"mtjax: fit: this is a multi-host run ({jax.process_count()} processes, jax.distributed): pass a "
      "mesh over every process's devices, e.g. mesh=jax.sharding.Mesh(np.array(jax.devices()), ('data',))."
    )
  if set(mesh.devices.flat) != set(jax.devices()):
    raise ValueError(
      f"mtjax: fit: in a multi-host run the mesh must hold all {jax.device_count()} global devices "
      f"(jax.devices()), got {mesh.devices.size} of them; build it from jax.devices(), not jax.local_devices()."
    )
  rows: set = set()
  mine = jax.process_index()
  for device, index in (
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis)).devices_indices_map((batch_size,)).items()
  ):
    if device.process_index == mine:
      rows.update(range(*index[0].indices(batch_size)))
  lo, n = min(rows), len(rows)
  if max(rows) - lo + 1 != n or batch_size % n or lo % n:
    raise ValueError(
      f"mtjax: fit: the devices of process {mine} hold rows {sorted(rows)[:4]}... of the batch, not one contiguous "
      f"equal part; order the mesh's devices by process (as jax.devices() does)."
    )
  return lo // n, batch_size // n


def _global_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh, data_axis: str, batch_size: int) -> dict:
  """A multi-controller run's global batch of ``batch_size`` samples from this process's rows
  (``batch``): the layout of :func:`shard_batch`, each process contributing its part."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  out = {}
  for key, value in batch.items():
    axis = 1 if key in SAMPLE_AXIS_1 else 0
    sharding = NamedSharding(mesh, P(None, data_axis) if axis else P(data_axis))

    def put(a, axis=axis, sharding=sharding):
      a = np.asarray(a)
      shape = list(a.shape)
      shape[axis] = batch_size
      return jax.make_array_from_process_local_data(sharding, a, tuple(shape))

    out[key] = jax.tree.map(put, value)
  return out


def _replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``tree`` replicated over a multi-controller ``mesh`` (every process holds the same values)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == replicated:
      return x
    return jax.make_array_from_process_local_data(replicated, _distributed.host_value(x))

  return jax.tree.map(put, tree)


def _mtjax_message(error: BaseException) -> Optional[str]:
  """The ``mtjax: ...`` message of a failed check in a training step, or ``None``.

  A check failing on the host callback of a jitted step surfaces as a ``JaxRuntimeError`` on the
  first call and as a ``ValueError`` ("INTERNAL: CpuCallback error ...") on later, cached calls,
  both carrying the callback's traceback; a check on concrete values while tracing raises the
  ``ValueError("mtjax: ...")`` itself.
  """
  text = str(error)
  if isinstance(error, ValueError) and text.startswith("mtjax:"):
    return text.strip()
  for line in text.splitlines():
    i = line.find("ValueError: mtjax: ")
    if i >= 0:
      return line[i + len("ValueError: ") :].strip()
  return None


class _QuietMtjaxCallbacks(logging.Filter):
  """Drops jax's logged traceback of a host callback that raised an ``mtjax:`` error (fit re-raises it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, ValueError) and str(exc).startswith("mtjax:"))


def fit(
  model,
  tx,
  train_ds,
  *,
  steps: int,
  batch_size: int,
  seed: int = 0,
  strategy: str = "auto",
  task_losses=None,
  multi_task_loss=None,
  eval_ds=None,
  eval_every: int = 0,
  eval_batch_size: int = 4096,
  log_every: int = 10,
  out_dir: Optional[str] = None,
  checkpoint_every: int = 0,
  resume: bool = True,
  progress: bool = True,
  track_similarity: bool = True,
  config: Optional[dict] = None,
  desc: str = "train",
  stop_after: Optional[int] = None,
  mesh: Optional[jax.sharding.Mesh] = None,
  data_axis: str = "data",
  sparse: bool = True,
  chunk_size: Optional[int] = None,
  rep_gram: str = "sum",
  from_step: Optional[int] = None,
  keep_checkpoints: int = 2,
  shared: Any = "model",
  similarity_granularity: str = "model",
  validation_ds=None,
  micro_batches: int = 1,
  writers=(),
  precision=None,
) -> FitResult:
  """Trains ``model`` with the multi-task transform chain ``tx`` on a :class:`mtjax.data.MultiTaskDataset`.

  Each step draws a shuffled batch (order fixed by ``seed`` and the epoch), computes per-task
  gradients with ``strategy``, passes ``task_losses`` to ``tx`` and applies the update. With
  ``out_dir`` it writes ``log.jsonl`` (per-task losses, the method's task weights, task-gradient
  cosines and conflict every ``log_every`` steps, and evaluations) and, every
  ``checkpoint_every`` steps, an orbax checkpoint of the whole :class:`TrainState` plus the data
  position; with ``resume`` a run restarted on the same ``out_dir`` continues from the newest
  checkpoint and gives bit-identical results to an uninterrupted run. The log file is flushed and
  fsynced before every checkpoint, and a resume trims it to the checkpoint's step (dropping a torn
  last line), so a run killed at any point resumes to the same log as an uninterrupted one; a
  finished folder run again retrains nothing and appends no second final evaluation. A corrupt
  newest checkpoint (its arrays fail their checksums) is skipped with a warning for the previous
  valid one. A failed in-graph check raises ``ValueError("mtjax: ... [at training step N]")``; a
  failed write (disk full, read-only folder) raises :class:`CheckpointSaveError` (one ``mtjax:``
  line) and keeps every complete older checkpoint.

  Args:
    model: a flax module returning ``(outputs [T, B], aux)``.
    tx: an optax chain whose first element is an mtjax transform.
    train_ds / eval_ds: datasets (``mtjax.data.MultiTaskDataset``); a ``mtjax.data.StoredDataset`` (an on-disk
      store, :func:`mtjax.data.open_store`) trains with bounded memory, its batches read ahead in grain's
      reader threads (:class:`mtjax.data.PrefetchIterator`), the same batches as the data in memory.
    steps: total number of steps (also when resuming).
    task_losses: per-task loss specs (default from ``train_ds.task_types``).
    multi_task_loss: a loss over all outputs at once (ESMM-style), see ``mtjax.losses.make_loss_fn``.
    stop_after: stop after this many steps in this call (to simulate an interruption in tests).
    mesh: data-parallel training over the devices of a ``jax.sharding.Mesh``: every batch is split
      along ``data_axis`` (its batch dimension), the state is replicated, and ``jit``'s SPMD
      partitioner inserts the reductions, so the per-task losses, gradients and Gram matrices the
      method sees are those of the whole batch and the update equals the one-device update (up to
      floating-point summation order; tested on 8 CPU devices). ``batch_size`` must be a
      multiple of the mesh's ``data_axis`` size. Multi-host (multi-controller) training: start
      ``jax.distributed`` in every process (:func:`initialize_distributed`), build the mesh over
      every process's devices (``Mesh(np.array(jax.devices()), ("data",))``; required when
      ``jax.process_count() > 1``) and call ``fit`` with the same arguments in every process.
      ``batch_size`` is then the global batch: each process reads only the rows its devices hold
      (its contiguous part of every global batch) and the step is one SPMD program over the global
      mesh, so the run equals a one-process run on the same devices (tested bit-identical on 2
      processes). Every process takes part in the checkpoints (``out_dir`` must be on a file
      system they share) and evaluates; process 0 alone writes ``log.jsonl``, the checkpoints'
      ``meta.json``, calls ``writers`` and shows the progress bar. Every process returns the same
      :class:`FitResult` (a replicated state).
    data_axis: the mesh axis that splits the batch.
    strategy: how per-task gradients are computed (see :func:`mtjax.task_grads`): ``"auto"``,
      ``"loop"``, ``"map"``, ``"vmap"`` (full rows), ``"rep"`` (representation gradients, one
      trunk backward), ``"shared"`` (exact rows of the trunk's parameters only), or ``"subset"``
      (a deferred Jacobian: rows only of the method's ``gram_leaves``, then one backward pass;
      no similarity tracking).
    track_similarity: log task-gradient cosines and conflict (needs the rows every step: turn it
      off for deferred, amortized or subset speed).
    sparse: exact sparse per-task gradients for embedding tables (see :func:`mtjax.embedding_lookup`).
    chunk_size: at most this many task rows at a time (many tasks), see :func:`mtjax.task_grads`.
    rep_gram: ``"sum"`` or ``"stack"``: the representation Gram of ``strategy="rep"``.
    from_step: restart from the checkpoint of this step in ``out_dir`` (e.g. from before a
      divergence) instead of the newest one: the checkpoints of later steps and the log records
      after it are deleted, and the run then continues exactly as an uninterrupted run from that
      step. A :class:`CheckpointError` lists the available steps if there is no such checkpoint.
    keep_checkpoints: how many of the newest checkpoints to keep (default 2; raise it to be able
      to go back further with ``from_step``).
    shared: the parameters whose task-gradient cosines are logged: ``"model"`` (default: the
      partition the model declares, :func:`mtjax.models.partition`; every parameter for a model
      that declares none), ``"all"``, or a ``shared=`` mask. Pass the same mask to the gradient
      method (``mtjax.pcgrad(shared=...)``); ``mtjax run`` / ``compare`` do this for you.
    similarity_granularity: ``"model"`` (one cosine matrix over the shared parameters) or
      ``"layer"`` (also one per shared layer: ``cosine_layers`` / ``conflict_layers`` with their
      ``layers`` names in ``log.jsonl``).
    validation_ds: for a transform with a meta loss (:func:`mtjax.auto_lambda`, whose
      ``meta_loss_fn`` is e.g. :func:`validation_loss_fn`): every step also draws a ``batch_size``
      batch of this dataset, in its own shuffled order (seed ``seed + 1``, so ``validation_ds=train_ds``
      gives a second, differently ordered pass over the training set, as in Auto-Lambda's code), and
      passes it to ``tx.update`` as ``validation_batch=`` (with the model's non-parameter
      collections under ``"variables"``). Its position follows the step count, so a resumed run
      draws the same batches.
    micro_batches: ``M > 1`` for a method that takes ``M`` independent micro-batches per step
      (:func:`mtjax.modo`, :func:`mtjax.sdmgrad`; ``num_batches`` of the method): every batch is
      split into ``M`` parts along its sample axis and the method gets per-task gradients
      ``[M, T, *param.shape]`` and losses ``[M, T]`` (see :func:`make_train_step`). The log's
      losses and similarity are the whole batch's. ``batch_size`` must be at least ``M``.
    writers: metrics writers (:mod:`mtjax.training._writers`) that receive every record of
      ``log.jsonl`` as well -- e.g. :class:`TensorBoardWriter`, :class:`CallbackWriter` (a plain
      callable ``fn(record)`` is wrapped in one) or your own :class:`MetricsWriter`. They are
      started with the step training (re)starts from, flushed before every checkpoint and closed at
      the end (also when training fails); on a resume they receive the replayed steps again
      (:class:`TensorBoardWriter` hides the stale ones). An exception of a writer stops training
      and propagates, with a note naming the writer.
    precision: ``None`` / ``"fp32"`` (default: float32 throughout, unchanged) or ``"bf16"`` (or a
      :class:`Precision`): float32 master parameters, optimizer and method state, checkpoints; the
      forward and per-task backward passes (training and evaluation) in bfloat16; losses, metrics and
      the method's Gram and solver in float32 (see :func:`make_train_step`). A resumed run continues
      exactly (the state is float32); resume with the same precision.
  """
  from mtjax.data import BatchIterator
  from mtjax.data import batch_iterator

  policy = _precision.Precision.from_name(precision)  # an unknown name fails before any work
  if strategy == "subset":  # a deferred Jacobian: no rows to compare
    track_similarity = False
  if isinstance(shared, str):
    if shared not in ("model", "all"):
      raise ValueError(f"mtjax: fit: shared must be 'model', 'all', a shared= mask or None, got {shared!r}.")
    from mtjax.models import partition  # pylint: disable=import-outside-toplevel

    shared = partition(model) if shared == "model" else None
  if similarity_granularity not in ("model", "layer"):
    raise ValueError(f"mtjax: fit: similarity_granularity must be 'model' or 'layer', got {similarity_granularity!r}.")

  if steps < 1 or batch_size < 1:
    raise ValueError("mtjax: fit needs steps >= 1 and batch_size >= 1.")
  user_writers = _writers.as_writers(writers)
  if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, np.integer)) or micro_batches < 1:
    raise ValueError(f"mtjax: fit: micro_batches must be a positive int, got {micro_batches!r}.")
  if batch_size < micro_batches:
    raise ValueError(
      f"mtjax: fit: batch_size={batch_size} cannot be split into micro_batches={micro_batches} "
      "non-empty parts; use a batch size of at least micro_batches."
    )
  if task_losses is None and multi_task_loss is None:
    task_losses = default_task_losses(train_ds.task_types)
  if mesh is not None:
    if data_axis not in mesh.shape:
      raise ValueError(f"mtjax: fit: the mesh has axes {tuple(mesh.shape)}, not data_axis={data_axis!r}.")
    if batch_size % mesh.shape[data_axis]:
      raise ValueError(
        f"mtjax: fit: batch_size={batch_size} must be a multiple of the {mesh.shape[data_axis]} "
        f"devices of mesh axis {data_axis!r}."
      )
  # Multi-host (jax.distributed): each process reads its part of every global batch; process 0 writes the files.
  multihost = _distributed.is_multihost()
  part, parts = _process_part(mesh, data_axis, batch_size) if multihost else (0, 1)
  primary = _distributed.is_primary()
  replicated = None  # multi-host: the state's sharding on the global mesh (checkpoints restore onto it)
  if multihost and mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # a StoredDataset (on disk) is read ahead by grain; the batches are the same either way
  it = batch_iterator(train_ds, batch_size, seed=seed, process_index=part, process_count=parts)
  if validation_ds is not None and (validation_ds.num_tasks != train_ds.num_tasks or batch_size > len(validation_ds)):
    raise ValueError(
      f"mtjax: fit: validation_ds must have the training set's {train_ds.num_tasks} tasks and at least "
      f"batch_size={batch_size} samples, got {validation_ds.num_tasks} tasks, "
      f"{len(validation_ds)} samples."
    )
  state = init_state(model, tx, train_ds.batch(np.arange(min(batch_size, len(train_ds))))["x"], seed=seed)
  if keep_checkpoints < 1:
    raise ValueError(f"mtjax: fit needs keep_checkpoints >= 1, got {keep_checkpoints}.")
  if from_step is not None and not out_dir:
    raise ValueError("mtjax: fit(from_step=...) restarts from a checkpoint in out_dir; give out_dir.")
  log_path = ckpt_dir = meta = None
  logged: list = []  # the log records kept from before a resume
  if out_dir:
    out_dir = os.path.abspath(out_dir)  # orbax needs absolute paths; a relative folder must resume too
    log_path, ckpt_dir = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "checkpoints")
    try:
      os.makedirs(out_dir, exist_ok=True)
      if checkpoint_every:
        os.makedirs(ckpt_dir, exist_ok=True)
        if not os.access(ckpt_dir, os.W_OK):  # fail now, not at the first checkpoint
          raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), ckpt_dir)
    except OSError as e:
      raise _checkpoint.write_error(f"to the output folder {out_dir}", e, "Make it writable.") from e
  if from_step is not None:
    state, meta, _ = _checkpoint.restore_step(ckpt_dir, int(from_step), state, sharding=replicated)
    _checkpoint.discard_after(ckpt_dir, int(from_step))
  elif out_dir and resume:
    # a corrupt newest one: a warning, the previous one
    found = _checkpoint.restore_latest(ckpt_dir, state, sharding=replicated)
    if found is not None:
      state, meta, _ = found
  if meta is not None:
    it.restore(meta["data_state"])
    logged = _checkpoint.trim_log(log_path, meta["step"]) if primary else []  # drop records after the checkpoint
  elif log_path and primary and os.path.exists(log_path):
    os.remove(log_path)
  if multihost and mesh is not None:  # (multihost: _process_part checked the mesh)
    state = _replicate(state, mesh)
  elif mesh is not None:
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  step_fn = make_train_step(
    model,
    tx,
    task_losses=task_losses,
    multi_task_loss=multi_task_loss,
    masked=train_ds.masks is not None,
    weighted=train_ds.weights is not None,
    strategy=strategy,
    mutable=tuple(state.variables),
    track_similarity=track_similarity,
    sparse=sparse,
    chunk_size=chunk_size,
    rep_gram=rep_gram,
    shared=shared,
    similarity_granularity=similarity_granularity,
    micro_batches=micro_batches,
    precision=policy,
  )
  val_it = None
  if validation_ds is not None:  # one validation batch per step: its position is the step count
    spe = BatchIterator(validation_ds, batch_size, seed=seed + 1).steps_per_epoch
    val_it = BatchIterator(
      validation_ds,
      batch_size,
      seed=seed + 1,
      epoch=int(state.step) // spe,
      position=int(state.step) % spe,
      process_index=part,
      process_count=parts,
    )
  _check_chain_order(
    tx,
    state,
    train_ds.num_tasks,
    None if validation_ds is None else validation_ds.batch(np.arange(batch_size)),
    micro_batches,
  )
  predict_fn = make_predict_fn(model, policy) if eval_ds is not None else None
  layer_names = None
  if track_similarity and similarity_granularity != "model":
    rows = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + np.shape(x), x.dtype), state.params)
    layer_names = analysis.group_names(rows, granularity=similarity_granularity, shared=shared)
  start = int(state.step)
  history, evals, times = [], [], []
  sim = analysis.SimilarityHistory()
  # Every record goes to log.jsonl (with out_dir) and to the user's writers; all are flushed before a checkpoint.
  sinks = [(_writers.JsonlWriter(log_path), False)] if log_path else []
  sinks += [(w, True) for w in user_writers]
  if not primary:  # multi-host: process 0 writes the log and calls the writers
    sinks = []
  opened: list = []  # the writers started so far: closed at the end, also after an error
  bar = None
  if progress and primary:
    from tqdm.auto import tqdm

    # disable=None: off when not a TTY
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False, dynamic_ncols=True, disable=None)
  end = steps if stop_after is None else min(steps, start + stop_after)
  quiet = _QuietMtjaxCallbacks()  # the re-raised error below says it all: no logged callback traceback
  logging.getLogger("jax._src.callback").addFilter(quiet)

  def emit(rec: dict) -> None:
    for w, user in sinks:
      _writers.call(w, "write", rec["step"], rec, user=user)

  final = None
  try:
    for w, user in sinks:
      _writers.call(w, "start", start, tuple(train_ds.task_names), user=user)
      opened.append((w, user))
    for step in range(start, end):
      batch = next(it)
      val_batch = next(val_it) if val_it is not None else None
      if multihost and mesh is not None:  # this process's rows -> the global batch
        batch = _global_batch(batch, mesh, data_axis, batch_size)
        val_batch = _global_batch(val_batch, mesh, data_axis, batch_size) if val_batch is not None else None
      elif mesh is not None:
        batch = shard_batch(batch, mesh, data_axis)
        val_batch = shard_batch(val_batch, mesh, data_axis) if val_batch is not None else None
      done = step + 1
      t0 = time.perf_counter()
      try:  # the step keeps mtjax's in-graph checks (NaN/inf, ids out of range, infeasible bounds)
        state, m = step_fn(state, batch) if val_batch is None else step_fn(state, batch, val_batch)
        m = _distributed.host_tree(m) if multihost else jax.device_get(m)
      except (jax.errors.JaxRuntimeError, ValueError) as e:  # step 1: JaxRuntimeError; later (C++ path): ValueError
        message = _mtjax_message(e)
        if message is None:
          raise
        raise ValueError(message if "[at training step" in message else f"{message} [at training step {done}]") from e
      times.append(time.perf_counter() - t0)
      if not np.all(np.isfinite(m["losses"])):
        raise ValueError(
          f"mtjax: non-finite task losses {m['losses'].tolist()} at step {done} "
          "(or NaN/inf gradients at the step before); lower the learning rate or "
          "check the data and the loss."
        )
      if log_every and (done % log_every == 0 or done == end):
        rec = {"step": done, "losses": _to_host(m["losses"]), "weights": _to_host(m["weights"])}
        if track_similarity:
          rec["cosine"], rec["conflict"] = _to_host(m["cosine"]), float(m["conflict"])
          sim.append(done, {"cosine": m["cosine"], "conflict": m["conflict"]})
          if "cosine_groups" in m:
            rec["layers"] = layer_names
            rec["cosine_layers"], rec["conflict_layers"] = _to_host(m["cosine_groups"]), _to_host(m["conflict_groups"])
        history.append(rec)
        emit(rec)
      if bar is not None:
        bar.update(1)
        if done % max(1, log_every) == 0:
          bar.set_postfix({n[:8]: f"{l:.4f}" for n, l in zip(train_ds.task_names, m["losses"])})
      if eval_ds is not None and eval_every and done % eval_every == 0 and done != steps:
        ev = evaluate(model, state, eval_ds, batch_size=eval_batch_size, predict_fn=predict_fn)
        evals.append((done, ev))
        emit({"step": done, "eval": ev})
      if ckpt_dir and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
        for w, user in sinks:  # every record up to the checkpoint is on disk before it exists (a kill loses none)
          _writers.call(w, "flush", user=user)
        _checkpoint.save(ckpt_dir, state, step=done, data_state=it.state(), config=config, keep=keep_checkpoints)
    if bar is not None:
      bar.close()
      bar = None
    if eval_ds is not None and int(state.step) == steps:
      final = evaluate(model, state, eval_ds, batch_size=eval_batch_size, predict_fn=predict_fn)
      evals.append((steps, final))
      if not any("eval" in r and r["step"] == steps for r in logged):  # not again in a rerun of a finished folder
        emit({"step": steps, "eval": final})
  finally:
    failing = sys.exc_info()[1] is not None
    if hasattr(it, "close"):  # a PrefetchIterator's reader threads
      it.close()
    logging.getLogger("jax._src.callback").removeFilter(quiet)
    if bar is not None:
      bar.close()
    close_error = None
    for w, user in opened:  # every writer is closed, even if another one fails to
      try:
        _writers.call(w, "close", user=user)
      except Exception as e:  # pylint: disable=broad-except
        close_error = close_error or e
    if close_error is not None and not failing:  # else keep the original error (e.g. a full disk at a checkpoint)
      raise close_error
  ms = 1e3 * statistics.median(times[1:] if len(times) > 1 else times) if times else float("nan")
  return FitResult(state=state, history=history, evals=evals, final_eval=final, ms_per_step=ms, similarity=sim)
