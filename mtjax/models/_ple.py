r"""CGC and PLE: task-specific plus shared experts, stacked in levels (Tang et al., 2020)."""

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


def mark_experts(shared: jax.Array, specific: Sequence[jax.Array]):
  """Marks a final level's experts, ``(shared [m_s, B, H], (specific_k [m_k, B, H], ...))``, as the representation.

  One :func:`mtjax.representation` call (``batch_axis=1``) on the pytree of the shared and every
  task's specific expert outputs; returns the marked values, which the level's mixtures must read.
  """
  shared, specific = representation((shared, tuple(specific)), batch_axis=1)
  return shared, list(specific)


def view_experts(shared: jax.Array, specific: Sequence[jax.Array], task: int):
  """Task ``task``'s view (:func:`mtjax.task_view`) of the experts :func:`mark_experts` returned."""
  shared, specific = task_view((shared, tuple(specific)), task)
  return shared, list(specific)


class ExtractionLevel(nn.Module):
  r"""One extraction level of PLE (a CGC block, plus the shared gate in non-final levels).

  With task streams :math:`u_k` and a shared stream :math:`u_s`:

  .. math::
    S_k = [E_{k,1}(u_k), .., E_{k,m_k}(u_k)], \quad S_s = [E_{s,1}(u_s), .., E_{s,m_s}(u_s)],\\
    u_k' = g_k(u_k)^\top [S_k; S_s], \qquad
    u_s' = g_s(u_s)^\top [S_1; ..; S_T; S_s] \ \text{(non-final levels only)}.

  Params: ``experts_task_k``, ``experts_shared``, ``gate_task_k`` and (non-final) ``gate_shared``.
  Returns ``(task_outputs [T, B, H], shared_output [B, H] or None, task_gates [T, B, m_k+m_s],
  shared_gate [B, T m_k + m_s] or None)``. The final level marks its expert outputs (shared and
  task-specific) as the model's representation (:func:`mark_experts`).
  """

  num_tasks: int
  num_specific_experts: int
  num_shared_experts: int
  expert: Sequence[int]
  final: bool
  dropout: float = 0.0
  gate_hidden: Sequence[int] = ()
  gate_bias: bool = False
  gate_dropout: float = 0.0
  gate_dropout_mode: str = "batch"
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL

  def _gate(self, num_experts: int, name: str) -> _experts.Gate:
    return _experts.Gate(
      num_experts,
      hidden=tuple(self.gate_hidden),
      use_bias=self.gate_bias,
      dropout=self.gate_dropout,
      dropout_mode=self.gate_dropout_mode,
      name=name,
    )

  def _experts(self, num: int, name: str) -> _experts.Experts:
    return _experts.Experts(num, tuple(self.expert), dropout=self.dropout, impl=self.expert_impl, name=name)

  @nn.compact
  def __call__(self, task_inputs: Sequence[jax.Array], shared_input: jax.Array, *, train: bool = False):
    T = self.num_tasks
    shared = self._experts(self.num_shared_experts, "experts_shared")(shared_input, train=train)
    specific = [
      self._experts(self.num_specific_experts, f"experts_task_{k}")(task_inputs[k], train=train) for k in range(T)
    ]
    if self.final:
      shared, specific = mark_experts(shared, specific)
    task_outputs, task_gates = [], []
    for k in range(T):
      g = self._gate(self.num_specific_experts + self.num_shared_experts, f"gate_task_{k}")(task_inputs[k], train=train)
      task_gates.append(g)
      # In the final level task k reads its own view of the representation (see mtjax.task_view).
      shared_k, specific_k = view_experts(shared, specific, k) if self.final else (shared, specific)
      task_outputs.append(_experts.mix(g, jnp.concatenate([specific_k[k], shared_k], axis=0)))
    shared_output = shared_gate = None
    if not self.final:
      shared_gate = self._gate(T * self.num_specific_experts + self.num_shared_experts, "gate_shared")(
        shared_input, train=train
      )
      shared_output = _experts.mix(shared_gate, jnp.concatenate(specific + [shared], axis=0))
    return jnp.stack(task_outputs, 0), shared_output, jnp.stack(task_gates, 0), shared_gate


def stack_levels(model, level_cls, task_inputs, shared_input, *, train: bool):
  """Runs ``model.num_levels`` extraction levels of ``level_cls`` and the task towers.

  Shared by PLE and STEM-Net (called inside the model's ``nn.compact`` ``__call__``, so the levels
  are the model's submodules ``level_0``, ``level_1``, ...). Level ``j`` takes each task's fused
  output and the shared stream of level ``j - 1``; only non-final levels have a shared gate.
  Returns ``(outputs [T, B], aux)``.
  """
  level_gates, shared_gates = [], []
  for j in range(model.num_levels):
    final = j == model.num_levels - 1
    task_out, shared_out, gates, shared_gate = level_cls(
      model.num_tasks,
      model.num_specific_experts,
      model.num_shared_experts,
      tuple(model.expert),
      final,
      dropout=model.dropout,
      gate_hidden=tuple(model.gate_hidden),
      gate_bias=model.gate_bias,
      gate_dropout=model.gate_dropout,
      gate_dropout_mode=model.gate_dropout_mode,
      expert_impl=model.expert_impl,
      name=f"level_{j}",
    )(task_inputs, shared_input, train=train)
    level_gates.append(gates)
    if not final:
      shared_gates.append(shared_gate)
    task_inputs, shared_input = [task_out[k] for k in range(model.num_tasks)], shared_out
  outputs = _experts.towers(model.tower, model.num_tasks, task_inputs, dropout=model.dropout, train=train)
  aux = {
    "gates": level_gates[-1],
    "level_gates": tuple(level_gates),
    "shared_gates": tuple(shared_gates),
    "task_outputs": jnp.stack(task_inputs, 0),
  }
  return outputs, aux


def _ple_task_specific(num_levels: int) -> Tuple[str, ...]:
  """Task-specific parameters of a PLE-style stack: the towers, the final level's task experts and
  gates, and the task gates of the level before it (they feed only that task's final-level experts).
  Earlier task experts and gates also reach the shared gate of a non-final level, so they are shared."""
  last = num_levels - 1
  out = (r"^tower_\d+/", rf"^level_{last}/experts_task_\d+/", rf"^level_{last}/gate_task_\d+/")
  return out + ((rf"^level_{last - 1}/gate_task_\d+/",) if num_levels > 1 else ())


@register("ple")
class PLE(nn.Module):
  r"""Progressive Layered Extraction.

  ``num_levels`` extraction levels (:class:`ExtractionLevel`). Level 1 feeds the input ``x`` to
  every stream. At level :math:`j` task :math:`k`'s specific experts and gate read task
  :math:`k`'s fused output of level :math:`j-1`; the shared experts read the shared stream,
  whose own gate mixes *all* experts of the level (shared and every task's specific ones) and
  exists only in non-final levels. Task :math:`k`'s tower reads its final fused output:

  .. math::
    u_k^{(0)} = u_s^{(0)} = x, \qquad
    u_k^{(j)} = g_k^{(j)}(u_k^{(j-1)})^\top [S_k^{(j)}; S_s^{(j)}], \qquad
    u_s^{(j)} = g_s^{(j)}(u_s^{(j-1)})^\top [S_1^{(j)}; ..; S_T^{(j)}; S_s^{(j)}], \qquad
    y_k = t_k(u_k^{(L)}).

  Gates are the linear softmax gates of MMoE (options ``gate_hidden``, ``gate_bias``,
  ``gate_dropout``/``gate_dropout_mode`` as in :class:`MMoE`). Params: ``level_j/...`` (see
  :class:`ExtractionLevel`) and ``tower_k``. The paper's joint loss (per-task sample spaces,
  per-task weights) lives in :mod:`mtjax.losses`, not here.

  Representation (for strategy='rep'/'shared'): the final level's expert outputs, shared and
  task-specific, as one pytree ``(S_s [m_s, B, H], (S_1, .., S_T))`` (``batch_axis=1``); the final
  level's gates and the towers are the task heads (earlier levels are trunk).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.PLE(num_tasks=2, num_levels=2, num_specific_experts=2, num_shared_experts=1,
    ...                    expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)
    >>> outputs.shape, aux['gates'].shape, [g.shape for g in aux['shared_gates']]
    ((2, 5), (2, 5, 3), [(5, 5)])
    >>> sorted(variables['params']['level_1'])  # no shared gate in the final level
    ['experts_shared', 'experts_task_0', 'experts_task_1', 'gate_task_0', 'gate_task_1']

  Attributes:
    num_tasks: ``T``.
    num_levels: number of extraction levels ``L`` (1 = CGC).
    num_specific_experts: experts per task per level.
    num_shared_experts: shared experts per level.
    expert: widths of each expert MLP (the same at every level).
    tower: widths of every tower, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout after hidden activations of experts and towers (train only).
    gate_hidden, gate_bias, gate_dropout, gate_dropout_mode: gate options (see :class:`MMoE`).
    expert_impl: ``"list"`` (default) or ``"vmap"`` (see :class:`Experts`).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['gates']`` the final level's task gates
    ``[T, B, m_k + m_s]``, ``aux['level_gates']`` a tuple of them per level,
    ``aux['shared_gates']`` a tuple per non-final level of ``[B, T m_k + m_s]``,
    ``aux['task_outputs']`` the final fused task representations ``[T, B, H]``.

  References:
    Tang, Liu, Zhao, Gong, *Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
    (MTL) Model for Personalized Recommendations*, RecSys 2020.
  """

  num_tasks: int
  num_levels: int = 2
  num_specific_experts: int = 1
  num_shared_experts: int = 1
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0
  gate_hidden: Sequence[int] = ()
  gate_bias: bool = False
  gate_dropout: float = 0.0
  gate_dropout_mode: str = "batch"
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL

  def _check(self):
    name = type(self).__name__
    if self.num_tasks < 1 or self.num_levels < 1:
      raise ValueError(
        f"mtjax: {name} needs num_tasks >= 1 and num_levels >= 1, got {self.num_tasks} and {self.num_levels}."
      )
    if self.num_specific_experts < 1 or self.num_shared_experts < 1:
      raise ValueError(
        f"mtjax: {name} needs num_specific_experts >= 1 and num_shared_experts >= 1, "
        f"got {self.num_specific_experts} and {self.num_shared_experts}."
      )

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return _ple_task_specific(self.num_levels)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    self._check()
    x, _ = InputLayer(self.features, name="input")(x)
    return stack_levels(self, ExtractionLevel, [x] * self.num_tasks, x, train=train)


@register("cgc")
class CGC(PLE):
  r"""Customized Gate Control: a single-level :class:`PLE`.

  .. math::
    u_k = g_k(x)^\top [E_{k,1}(x); ..; E_{k,m_k}(x); E_{s,1}(x); ..; E_{s,m_s}(x)],
    \qquad y_k = t_k(u_k),

  so task :math:`k`'s loss never reaches another task's specific experts or gate. Same
  attributes as :class:`PLE` with ``num_levels = 1`` (other values raise: use :class:`PLE`).

  Representation (for strategy='rep'/'shared'): the expert outputs, shared and task-specific, as
  one pytree ``(S_s [m_s, B, H], (S_1, .., S_T))`` (``batch_axis=1``); the gates and the towers
  are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.CGC(num_tasks=2, num_specific_experts=2, num_shared_experts=2,
    ...                    expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['gates'].shape, aux['shared_gates']
    ((2, 5), (2, 5, 4), ())

  References:
    Tang, Liu, Zhao, Gong, *Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
    (MTL) Model for Personalized Recommendations*, RecSys 2020.
  """

  num_levels: int = 1

  def _check(self):
    if self.num_levels != 1:
      raise ValueError(
        f"mtjax: CGC has exactly one level, got num_levels={self.num_levels}; use PLE for stacked levels."
      )
    super()._check()
