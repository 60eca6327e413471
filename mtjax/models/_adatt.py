r"""AdaTT: adaptive task-to-task fusion of task-specific and shared experts (Li et al., KDD 2023)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models import _experts
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


@register("adatt")
class AdaTT(nn.Module):
  r"""Adaptive Task-to-Task Fusion Network (Li et al., KDD 2023).

  Each of ``num_levels`` levels has ``experts_per_task`` ReLU experts per task, reading that task's
  input, and ``num_shared_experts`` shared experts reading the shared input (0: AdaTT-sp, the
  paper's variant without shared experts). Every task fuses *all* the level's experts with a gate on
  its own input, and adds a learned combination of its own experts (the NativeExpert residual):

  .. math::
    f^{l}_t = \sum_{i=1}^{m} v^{l}_{t,i}\, E^{l}_{t,i} \;+\;
      \sum_{e} \mathrm{softmax}(W^{l}_t f^{l-1}_t)_e\, E^{l}_e, \qquad
    E^{l}_{t,i} = \mathrm{expert}^{l}_{t,i}(f^{l-1}_t),

  with :math:`f^0_t = x` (the embedded input), :math:`E^l` every task's and the shared experts'
  outputs, :math:`v^l_t` initialized to ones (with one expert per task the paper uses the identity;
  ``learn_native=False`` keeps it fixed); the shared input is fused the same way from all experts,
  except at the last level, where nothing reads it. Towers on :math:`f^L_t`.

  Representation (for strategy='rep'/'shared'): the last level's fused outputs ``[T, B, H]``
  (``batch_axis=1``); task ``t``'s tower reads row ``t``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.AdaTT(num_tasks=3, num_levels=2, experts_per_task=2, num_shared_experts=1,
    ...                      expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['gates'][-1].shape       # last level: T gates over 3 * 2 + 1 experts
    ((3, 5), (3, 5, 7))

  Attributes:
    num_tasks: ``T``.
    num_levels: fusion levels ``L``.
    experts_per_task: ``m``, task-specific experts per task and level.
    num_shared_experts: shared experts per level (0: AdaTT-sp).
    expert: widths of every expert MLP (the last is the fused width).
    tower: widths of every tower, ending in 1.
    learn_native: learn the NativeExpert weights ``v`` (else fixed ones).
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after hidden activations of experts and towers (train only).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['gates']`` per level ``[T, B, T m + s]``, ``aux['fused']`` the
    last level's ``[T, B, H]``.

  References:
    Li, Li, Wang, Luo, Zhang, Hu, Li, Xu, *AdaTT: Adaptive Task-to-Task Fusion Network for Multitask
    Learning in Recommendations*, KDD 2023.
  """

  num_tasks: int
  num_levels: int = 2
  experts_per_task: int = 1
  num_shared_experts: int = 1
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  learn_native: bool = True
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the
    towers, and the last level's gates and native weights (every lower fusion feeds experts that all
    tasks read)."""
    last = self.num_levels - 1
    return (r"^tower_\d+/", rf"^level_{last}_gate_\d+/", rf"^level_{last}_native_\d+$")

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    t_count, m, s = self.num_tasks, self.experts_per_task, self.num_shared_experts
    if t_count < 1 or self.num_levels < 1 or m < 1 or s < 0:
      raise ValueError(
        f"mtjax: AdaTT needs num_tasks, num_levels, experts_per_task >= 1 and num_shared_experts >= 0, got "
        f"{t_count}, {self.num_levels}, {m}, {s}."
      )
    if not self.expert:
      raise ValueError("mtjax: AdaTT.expert needs at least one layer width.")
    x, _ = InputLayer(self.features, name="input")(x)
    inputs = [x] * t_count  # f^{l-1}_t
    shared_in = x
    all_gates = []
    fused = None
    for l in range(self.num_levels):
      last = l == self.num_levels - 1

      def expert(name, h, level=l):
        return MLP(tuple(self.expert), dropout=self.dropout, name=f"level_{level}_{name}")(h, train=train)

      task_experts = [[expert(f"task_{t}_expert_{i}", inputs[t]) for i in range(m)] for t in range(t_count)]
      shared = [expert(f"shared_expert_{i}", shared_in) for i in range(s)]
      every = jnp.stack([e for row in task_experts for e in row] + shared)  # [T m + s, B, H]
      outs, gates = [], []
      for t in range(t_count):
        g = _LevelGate(every.shape[0], name=f"level_{l}_gate_{t}")(inputs[t])
        gates.append(g)
        own = jnp.stack(task_experts[t])  # [m, B, H]
        if self.learn_native:
          v = self.param(f"level_{l}_native_{t}", nn.initializers.ones, (m,))
        else:
          v = jnp.ones((m,), own.dtype)
        outs.append(jnp.einsum("i,ibh->bh", v.astype(own.dtype), own) + _experts.mix(g, every))
      all_gates.append(jnp.stack(gates))
      if not last and s > 0:
        gs = _LevelGate(every.shape[0], name=f"level_{l}_gate_shared")(shared_in)
        shared_in = _experts.mix(gs, every)
      inputs = outs
      fused = jnp.stack(outs)
    z = representation(fused, batch_axis=1)
    outputs = _experts.towers(
      self.tower, t_count, [task_view(z, t)[t] for t in range(t_count)], dropout=self.dropout, train=train
    )
    return outputs, {"gates": all_gates, "fused": z}


class _LevelGate(nn.Module):
  """A linear softmax gate ``softmax(W h)`` (no bias) over ``num_experts``."""

  num_experts: int

  @nn.compact
  def __call__(self, h):
    return nn.softmax(nn.Dense(self.num_experts, use_bias=False, name="logits")(h), axis=-1)
