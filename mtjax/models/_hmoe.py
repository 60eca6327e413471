r"""HMoE: a hybrid of implicit (feature-space) and explicit (label-space) mixtures of experts (Li et al., CIKM 2020)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models import _experts
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


@register("hmoe")
class HMoE(nn.Module):
  r"""HMoE for multi-scenario ranking (Li, Li, Da, Zeng, Zhang, CIKM 2020).

  Each of the ``T`` tasks is a *scenario* (a country, a page) with the same label space. The
  implicit part is an MMoE over the scenarios: shared experts, one gate and one tower per scenario,
  giving every sample a prediction :math:`\hat y_s(x)` of every scenario. The explicit part stacks
  them in the label space: scenario ``d``'s output is a learned, input-dependent mixture of all
  scenarios' predictions,

  .. math::
    z_d(x) = \sum_{s=1}^{T} w_{d,s}(x)\, \tilde y_{d,s}(x), \qquad
    w_d(x) = \mathrm{softmax}(V_d x), \qquad
    \tilde y_{d,s} = \begin{cases} \hat y_d & s = d \\ \mathrm{sg}(\hat y_s) & s \ne d \end{cases}

  (logits), where the task-constrained back-propagation of the paper lets scenario ``d``'s loss
  reach only its own tower (:math:`\mathrm{sg}`: stop-gradient), so each tower keeps learning its
  scenario while the stack learns how the scenarios' predictions relate. Train with each sample's
  label only in its scenario's row (a ``[T, B]`` mask); serve a sample of scenario ``d`` with row
  ``d``. ``task_constrained=False`` lets every scenario's loss reach every tower (the paper's
  ablation).

  Representation (for strategy='rep'/'shared'): the stacked expert outputs ``[E, B, H]``
  (``batch_axis=1``); gates, towers and stacking gates are the heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.HMoE(num_tasks=3, num_experts=4, expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['implicit'].shape, aux['stack_weights'].shape
    ((3, 5), (3, 5), (3, 5, 3))

  Attributes:
    num_tasks: ``T`` scenarios.
    num_experts: ``E``.
    expert: widths of each expert MLP.
    tower: widths of every scenario tower, ending in 1.
    task_constrained: the paper's task-constrained back-propagation (stop-gradient on the other
      scenarios' predictions in the stack).
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after hidden activations (train only).
    expert_impl: as in :class:`MMoE`.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['implicit']`` the towers' logits :math:`\hat y` ``[T, B]``,
    ``aux['stack_weights']`` :math:`w` ``[T, B, T]``, ``aux['gates']`` ``[T, B, E]``.

  References:
    Li, Li, Da, Zeng, Zhang, *Improving Multi-Scenario Learning to Rank in E-commerce by Exploiting
    Task Relationships in the Label Space*, CIKM 2020.
  """

  num_tasks: int
  num_experts: int = 8
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  task_constrained: bool = True
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the
    stacking gates, and with the task-constrained back-propagation also the gates and towers."""
    if self.task_constrained:
      return (r"^tower_\d+/", r"^gate_\d+/", r"^stack_\d+/")
    return (r"^stack_\d+/",)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    t_count = self.num_tasks
    if t_count < 1:
      raise ValueError(f"mtjax: HMoE needs num_tasks >= 1, got {t_count}.")
    x, _ = InputLayer(self.features, name="input")(x)
    experts = _experts.Experts(
      self.num_experts, tuple(self.expert), dropout=self.dropout, impl=self.expert_impl, name="experts"
    )(x, train=train)
    experts = representation(experts, batch_axis=1)
    gates, mixed = [], []
    for t in range(t_count):
      g = _experts.Gate(self.num_experts, name=f"gate_{t}")(x, train=train)
      gates.append(g)
      # task-constrained: scenario t's loss reaches tower t only, so its view is task t's (one backward
      # gives every task's gradient); otherwise every loss reads every tower and no view applies
      mixed.append(_experts.mix(g, task_view(experts, t) if self.task_constrained else experts))
    implicit = _experts.towers(self.tower, t_count, mixed, dropout=self.dropout, train=train)  # [T, B]
    sg = jax.lax.stop_gradient if self.task_constrained else (lambda v: v)
    outputs, weights = [], []
    for d in range(t_count):
      w = nn.softmax(nn.Dense(t_count, use_bias=False, name=f"stack_{d}")(x), axis=-1)  # [B, T]
      preds = jnp.stack([implicit[s] if s == d else sg(implicit[s]) for s in range(t_count)], axis=-1)
      outputs.append(jnp.sum(w * preds, axis=-1))
      weights.append(w)
    return jnp.stack(outputs), {"implicit": implicit, "stack_weights": jnp.stack(weights), "gates": jnp.stack(gates)}
