r"""OMoE and MMoE: mixtures of experts with one gate, or one gate per task (Ma et al., 2018)."""

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


@register("mmoe")
class MMoE(nn.Module):
  r"""Multi-gate Mixture-of-Experts.

  .. math::
    f_k(x) = \sum_{e=1}^{E} g_k(x)_e \, f_e(x), \qquad g_k(x) = \mathrm{softmax}(W_k x),
    \qquad y_k = t_k(f_k(x)),

  with ``E`` independently initialised ReLU expert MLPs :math:`f_e`, one linear softmax gate per
  task on the input :math:`x` (no bias) and one tower :math:`t_k` per task.

  Options beyond the paper: ``gate_hidden`` (an MLP gate), ``gate_bias``, and gate dropout
  (Zhao et al., 2019): with ``gate_dropout = p > 0`` and ``train=True`` each gate value is
  dropped with probability ``p`` after the softmax and the rest renormalized, one mask per batch
  (``gate_dropout_mode="batch"``) or per sample (``"sample"``), drawn from the ``'dropout'`` RNG;
  eval is deterministic. Zhao et al. used ``p = 0.1``; the default 0 is the plain MMoE.

  Representation (for strategy='rep'/'shared'): the stacked expert outputs ``[E, B, H]``
  (``batch_axis=1``, for either ``expert_impl``); the gates and the towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.MMoE(num_tasks=2, num_experts=3, expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)
    >>> outputs.shape, aux['gates'].shape, aux['expert_outputs'].shape
    ((2, 5), (2, 5, 3), (3, 5, 8))

  Attributes:
    num_tasks: ``T``.
    num_experts: ``E``.
    expert: widths of each expert MLP.
    tower: widths of every tower, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after hidden activations of experts and towers (train only).
    gate_hidden: hidden widths of an MLP gate (``()``: the paper's linear gate).
    gate_bias: bias in the gate's linear map (the paper has none).
    gate_dropout: gate-dropout probability ``p`` (0 disables it).
    gate_dropout_mode: ``"batch"`` or ``"sample"``.
    expert_impl: ``"list"`` (default, measured faster on CPU, see :mod:`mtjax.models._experts`) or
      ``"vmap"`` (one ``nn.vmap``-ed MLP).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``; ``aux['gates']`` is ``[T, B, E]``, ``aux['expert_outputs']``
    is ``[E, B, H]``.

  References:
    Ma, Zhao, Yi, Chen, Hong, Chi, *Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts*, KDD 2018.
    Zhao, Hong, Wei, Chen, Nath, Andrews, Kumthekar, Sathiamoorthy, Yi, Chi, *Recommending What
    Video to Watch Next: A Multitask Ranking System*, RecSys 2019.
  """

  num_tasks: int
  num_experts: int = 8
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0
  gate_hidden: Sequence[int] = ()
  gate_bias: bool = False
  gate_dropout: float = 0.0
  gate_dropout_mode: str = "batch"
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL

  _single_gate = False  # OMoE sets True (a class constant, not a dataclass field)

  def _gate(self, name: str) -> _experts.Gate:
    return _experts.Gate(
      self.num_experts,
      hidden=tuple(self.gate_hidden),
      use_bias=self.gate_bias,
      dropout=self.gate_dropout,
      dropout_mode=self.gate_dropout_mode,
      name=name,
    )

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return (r"^tower_\d+/",) if self._single_gate else (r"^tower_\d+/", r"^gate_\d+/")

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: {type(self).__name__} needs num_tasks >= 1, got {self.num_tasks}.")
    x, _ = InputLayer(self.features, name="input")(x)
    expert_outputs = _experts.Experts(
      self.num_experts, tuple(self.expert), dropout=self.dropout, impl=self.expert_impl, name="experts"
    )(x, train=train)
    # The shared representation (both expert impls return [E, B, H]); the mixtures read the marked value.
    expert_outputs = representation(expert_outputs, batch_axis=1)
    if self._single_gate:
      g = self._gate("gate")(x, train=train)
      gates = jnp.broadcast_to(g[None], (self.num_tasks,) + g.shape)
      # Each task reads its own view of the representation (one backward gives every task's gradient).
      mixed = [_experts.mix(g, task_view(expert_outputs, k)) for k in range(self.num_tasks)]
    else:
      gates = jnp.stack([self._gate(f"gate_{k}")(x, train=train) for k in range(self.num_tasks)], axis=0)
      mixed = [_experts.mix(gates[k], task_view(expert_outputs, k)) for k in range(self.num_tasks)]
    outputs = _experts.towers(self.tower, self.num_tasks, mixed, dropout=self.dropout, train=train)
    return outputs, {"gates": gates, "expert_outputs": expert_outputs}


@register("omoe")
class OMoE(MMoE):
  r"""One-gate Mixture-of-Experts: the MMoE baseline with one gate shared by all tasks.

  .. math::
    f(x) = \sum_{e=1}^{E} g(x)_e \, f_e(x), \qquad g(x) = \mathrm{softmax}(W x),
    \qquad y_k = t_k(f(x)).

  Same attributes and options as :class:`MMoE` (gate dropout included); ``aux['gates']`` is the
  one gate broadcast to ``[T, B, E]``; its parameters live under ``gate``.

  Representation (for strategy='rep'/'shared'): the stacked expert outputs ``[E, B, H]``
  (``batch_axis=1``), as in :class:`MMoE`; the gate and the towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.OMoE(num_tasks=3, num_experts=4, expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['gates'].shape
    ((3, 5), (3, 5, 4))

  References:
    Ma, Zhao, Yi, Chen, Hong, Chi, *Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts*, KDD 2018.
  """

  _single_gate = True
