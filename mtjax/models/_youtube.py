r"""The YouTube multitask ranker: MMoE plus a shallow tower for selection bias (Zhao et al., 2019)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models import _experts
from mtjax.models._features import FeatureEmbedding
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


def split_spec(spec: FeatureSpec, names: Sequence[str]) -> Tuple[FeatureSpec, FeatureSpec]:
  """``spec`` split into (the fields not in ``names``, the fields in ``names``), each keeping ``spec.oov``."""
  names = tuple(names)
  unknown = [n for n in names if n not in spec.names]
  if unknown:
    raise ValueError(f"mtjax: field(s) {unknown} are not in the feature spec {list(spec.names)}.")
  rest = [n for n in spec.names if n not in names]
  if not rest:
    raise ValueError(f"mtjax: every field of the spec ({list(spec.names)}) was set aside; the main model has no input.")

  def sub(keep):
    seqs = tuple(f for f in spec.sequences if f.name in keep)
    tables = {f.table for f in seqs if f.table is not None}
    return FeatureSpec(
      categorical=tuple(f for f in spec.categorical if f.name in keep or f.name in tables),
      dense=tuple(f for f in spec.dense if f.name in keep),
      oov=spec.oov,
      sequences=seqs,
    )

  return sub(rest), sub(names)


@register("youtube")
class YouTubeRanker(nn.Module):
  r"""The multitask ranker of "Recommending What Video to Watch Next" (Zhao et al., RecSys 2019).

  An MMoE over the main features, plus a **shallow tower** that reads only the selection-bias
  features (position, device, ...) and whose logit is added to the engagement tasks' logits:

  .. math::
    y_k = t_k\Big(\sum_e g_k(x)_e f_e(x)\Big) + [k \in \mathcal E]\, s(b), \qquad
    \text{serving: } y_k = t_k\Big(\sum_e g_k(x)_e f_e(x)\Big),

  with ``x`` the main features, ``b`` the bias features, ``s`` the shallow tower and
  :math:`\mathcal E` the engagement tasks (``engagement_tasks``). Training on logged impressions
  lets the shallow tower explain the clicks that the display position caused, so the main model
  learns relevance; at serving (``serving=True``) the shallow tower is left out and the scores are
  the debiased ones (the bias features need not be in the batch).

  In training, the position feature is dropped with probability ``position_dropout`` per sample
  (the paper's 10%), replaced by its "missing" value (a categorical field's reserved unknown id,
  a dense field's zeros), so the model does not rely on it too much. The paper serves with the
  position treated as missing; that adds the same bias logit to every candidate of a request (the
  device is the request's), so the ranking is the one of ``serving=True``.

  Options beyond the paper: the gate options of :class:`MMoE` (``gate_hidden``, ``gate_bias``,
  gate dropout -- the paper used gate dropout too), ``shallow_tower`` widths (the paper does not
  give them).

  Representation (for strategy='rep'/'shared'): ``{"experts": [E, B, H], "bias": [1, B, 1]}``
  (``batch_axis=1``): the expert outputs and the shallow tower's logit, so the shallow tower is
  part of the shared trunk (every engagement task trains it); gates and towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(
    ...     categorical=(models.Categorical('user', 10, 4), models.Categorical('item', 20, 4),
    ...                  models.Categorical('position', 5, 2), models.Categorical('device', 2, 2)))
    >>> model = models.YouTubeRanker(num_tasks=2, features=spec, bias_features=('position', 'device'),
    ...                              engagement_tasks=(0,), num_experts=2, expert=(8,), tower=(4, 1))
    >>> x = {'user': jnp.array([1, 2, 3]), 'item': jnp.array([4, 5, 6]),
    ...      'position': jnp.array([0, 1, 4]), 'device': jnp.array([0, 1, 0])}
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)
    >>> outputs.shape, aux['bias_logit'].shape
    ((2, 3), (3,))
    >>> serving, _ = model.apply(variables, {'user': x['user'], 'item': x['item']}, serving=True)
    >>> bool(jnp.allclose(serving[0], outputs[0] - aux['bias_logit']))   # the bias logit left out
    True
    >>> bool(jnp.allclose(serving[1], outputs[1]))                         # a satisfaction task: unchanged
    True

  Attributes:
    num_tasks: ``T``.
    features: the :class:`FeatureSpec` of the whole feature dict, bias features included.
    bias_features: names of the selection-bias fields that only the shallow tower reads.
    engagement_tasks: indices of the tasks that get the shallow tower's logit (``None``: all).
    position_feature: the field dropped in training (``None``: none); one of ``bias_features``.
    position_dropout: its per-sample drop probability in training (the paper: 0.1).
    shallow_tower: widths of the shallow tower, ending in 1.
    serving: leave the shallow tower out (the debiased scores); also a keyword of ``__call__``.
    num_experts, expert, tower, dropout, gate_hidden, gate_bias, gate_dropout, gate_dropout_mode,
      expert_impl: as in :class:`MMoE`.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['gates']`` ``[T, B, E]``, ``aux['expert_outputs']``
    ``[E, B, H]``, ``aux['bias_logit']`` ``[B]`` (zeros at serving) and ``aux['debiased']`` ``[T, B]``
    (the main model's logits, the serving scores).

  References:
    Zhao, Hong, Wei, Chen, Nath, Andrews, Kumthekar, Sathiamoorthy, Yi, Chi, *Recommending What
    Video to Watch Next: A Multitask Ranking System*, RecSys 2019.
  """

  num_tasks: int
  features: Optional[FeatureSpec] = None
  bias_features: Sequence[str] = ("position",)
  engagement_tasks: Optional[Sequence[int]] = None
  position_feature: Optional[str] = "position"
  position_dropout: float = 0.1
  shallow_tower: Sequence[int] = (16, 1)
  serving: bool = False
  num_experts: int = 8
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  dropout: float = 0.0
  gate_hidden: Sequence[int] = ()
  gate_bias: bool = False
  gate_dropout: float = 0.0
  gate_dropout_mode: str = "batch"
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    The towers and gates; with a single engagement task also the shallow tower and the bias
    features' embeddings (that task alone trains them). Every other parameter is shared (the
    experts, the main embeddings, and the shallow tower of several engagement tasks):
    :func:`mtjax.models.partition` turns this into the ``shared=`` mask.
    """
    engaged = self.num_tasks if self.engagement_tasks is None else len(tuple(self.engagement_tasks))
    heads = (r"^tower_\d+/", r"^gate_\d+/")
    return heads + ((r"^shallow_tower/", r"^bias_input/") if engaged == 1 else ())

  def _validate(self, x) -> Tuple[FeatureSpec, FeatureSpec, Tuple[int, ...]]:
    name = type(self).__name__
    if self.features is None or not isinstance(x, Mapping):
      raise ValueError(
        f"mtjax: {name} needs features=FeatureSpec(...) and a feature dict input (it reads the bias fields by name)."
      )
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: {name} needs num_tasks >= 1, got {self.num_tasks}.")
    if not self.bias_features:
      raise ValueError(f"mtjax: {name} needs bias_features (e.g. ('position', 'device')).")
    if self.position_feature is not None and self.position_feature not in self.bias_features:
      raise ValueError(
        f"mtjax: {name}.position_feature {self.position_feature!r} must be one of bias_features "
        f"{tuple(self.bias_features)} (or None)."
      )
    if not 0.0 <= self.position_dropout < 1.0:
      raise ValueError(f"mtjax: {name}.position_dropout must be in [0, 1), got {self.position_dropout}.")
    if not self.shallow_tower or self.shallow_tower[-1] != 1:
      raise ValueError(f"mtjax: {name}.shallow_tower must be widths ending in 1, got {tuple(self.shallow_tower)}.")
    engaged = tuple(range(self.num_tasks)) if self.engagement_tasks is None else tuple(self.engagement_tasks)
    bad = [k for k in engaged if not (isinstance(k, int) and 0 <= k < self.num_tasks)]
    if bad or len(set(engaged)) != len(engaged):
      raise ValueError(
        f"mtjax: {name}.engagement_tasks must be distinct task indices in [0, {self.num_tasks}), "
        f"got {tuple(self.engagement_tasks or ())}."
      )
    main, bias = split_spec(self.features, self.bias_features)
    return main, bias, engaged

  def _bias_inputs(self, x: Mapping[str, Any], bias: FeatureSpec, train: bool) -> Dict[str, Any]:
    """The bias fields, the position dropped per sample in training; ids checked as the spec's ``oov`` says."""
    from mtjax._src import numerics  # pylint: disable=import-outside-toplevel

    missing = [n for n in bias.names if n not in x]
    if missing:
      raise ValueError(
        f"mtjax: the batch lacks bias feature(s) {missing}; pass them in training and evaluation, "
        "or apply the model with serving=True."
      )
    out = {n: x[n] for n in bias.names}
    for f in bias.categorical:
      ids = jnp.asarray(out[f.name])
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"mtjax: categorical feature {f.name!r} must hold integer ids, got {ids.dtype}.")
      if bias.oov == "error":  # checked here: the dropout below writes the reserved id on purpose
        bad = (ids < 0) | (ids >= f.vocab_size)
        ids = numerics.enforce(
          ids, numerics.condition_check(jnp.any(bad), f"mtjax: feature {f.name!r} has ids outside [0, {f.vocab_size}).")
        )
      out[f.name] = ids
    name = self.position_feature
    if train and name is not None and self.position_dropout > 0:
      if not self.has_rng("dropout"):
        raise ValueError(
          f"mtjax: {type(self).__name__} drops the position in training (position_dropout="
          f"{self.position_dropout}): pass a 'dropout' RNG (model.apply(..., rngs={{'dropout': key}}); the "
          "loss of mtjax.losses.make_loss_fn takes rngs={'dropout': key} as its third argument), or set "
          "position_dropout=0."
        )
      value = out[name]
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.position_dropout, (jnp.shape(value)[0],))
      cat = {f.name: f for f in bias.categorical}
      if name in cat:
        out[name] = jnp.where(drop, cat[name].vocab_size, value)  # the reserved "unknown" row
      else:
        value = jnp.asarray(value, jnp.float32)
        out[name] = jnp.where(drop.reshape((-1,) + (1,) * (value.ndim - 1)), jnp.zeros_like(value), value)
    return out

  @nn.compact
  def __call__(self, x, *, train: bool = False, serving: Optional[bool] = None) -> Tuple[jax.Array, Dict[str, Any]]:
    main, bias, engaged = self._validate(x)
    serving = self.serving if serving is None else serving
    h, _ = InputLayer(main, name="input")(x)
    expert_outputs = _experts.Experts(
      self.num_experts, tuple(self.expert), dropout=self.dropout, impl=self.expert_impl, name="experts"
    )(h, train=train)
    batch = expert_outputs.shape[1]
    if serving:
      bias_logit = jnp.zeros((batch,), expert_outputs.dtype)
    else:
      b, _ = FeatureEmbedding(bias, oov="reserved", name="bias_input")(self._bias_inputs(x, bias, train))
      bias_logit = MLP(tuple(self.shallow_tower), activate_last=False, name="shallow_tower")(b)[:, 0]
    # The shared representation: the expert outputs and the shallow tower's logit (batch axis 1 for both).
    rep = representation({"experts": expert_outputs, "bias": bias_logit[None, :, None]}, batch_axis=1)
    gates, mixed, shifts = [], [], []
    for k in range(self.num_tasks):
      view = task_view(rep, k)
      g = _experts.Gate(
        self.num_experts,
        hidden=tuple(self.gate_hidden),
        use_bias=self.gate_bias,
        dropout=self.gate_dropout,
        dropout_mode=self.gate_dropout_mode,
        name=f"gate_{k}",
      )(h, train=train)
      gates.append(g)
      mixed.append(_experts.mix(g, view["experts"]))
      shifts.append(view["bias"][0, :, 0] if k in engaged else None)
    main_logits = _experts.towers(self.tower, self.num_tasks, mixed, dropout=self.dropout, train=train)
    outputs = jnp.stack([main_logits[k] if s is None else main_logits[k] + s for k, s in enumerate(shifts)])
    aux = {
      "gates": jnp.stack(gates, axis=0),
      "expert_outputs": expert_outputs,
      "bias_logit": bias_logit,
      "debiased": main_logits,
    }
    return outputs, aux
