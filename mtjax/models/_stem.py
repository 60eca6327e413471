r"""STEM-Net: shared and task-specific embeddings with all-forward, task-specific-backward gates."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax.models import _experts
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import InputLayer
from mtjax.models._ple import _ple_task_specific
from mtjax.models._ple import mark_experts
from mtjax.models._ple import stack_levels
from mtjax.models._ple import view_experts
from mtjax.models._registry import register


class STEMLevel(nn.Module):
  r"""One STEM-Net level: specific + shared experts, AFTB task gates, a shared gate if non-final.

  With task streams :math:`u_k`, shared stream :math:`u_s`, experts
  :math:`S_k = E_k(u_k)`, :math:`S_s = E_s(u_s)` and :math:`\mathrm{sg}` = stop-gradient:

  .. math::
    u_i' = g_i([u_i; u_s])^\top [\mathrm{sg}(S_1); ..; S_i; ..; \mathrm{sg}(S_T); S_s], \qquad
    u_s' = g_s(u_s)^\top [S_1; ..; S_T; S_s] \ \text{(non-final levels)}.

  Params: ``experts_task_k``, ``experts_shared``, ``gate_task_k``, ``gate_shared`` (non-final).
  Returns ``(task_outputs [T, B, H], shared_output or None, task_gates [T, B, T m_k + m_s],
  shared_gate or None)``. The final level marks its expert outputs (shared and task-specific) as
  the model's representation (:func:`mtjax.models._ple.mark_experts`).
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

  def _gate(self, name: str) -> _experts.Gate:
    n = self.num_tasks * self.num_specific_experts + self.num_shared_experts
    return _experts.Gate(
      n,
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
    for i in range(T):
      g = self._gate(f"gate_task_{i}")(jnp.concatenate([task_inputs[i], shared_input], axis=-1), train=train)
      task_gates.append(g)
      # In the final level task i reads its own view of the representation (see mtjax.task_view).
      shared_i, specific_i = view_experts(shared, specific, i) if self.final else (shared, specific)
      parts = [specific_i[k] if k == i else jax.lax.stop_gradient(specific_i[k]) for k in range(T)] + [shared_i]
      task_outputs.append(_experts.mix(g, jnp.concatenate(parts, axis=0)))
    shared_output = shared_gate = None
    if not self.final:
      shared_gate = self._gate("gate_shared")(shared_input, train=train)
      shared_output = _experts.mix(shared_gate, jnp.concatenate(specific + [shared], axis=0))
    return jnp.stack(task_outputs, 0), shared_output, jnp.stack(task_gates, 0), shared_gate


@register("stem")
class STEM(nn.Module):
  r"""STEM-Net: Shared and Task-specific EMbeddings, experts and AFTB gates.

  Every categorical field has one table of width ``embed_dim * (T + 1)``, split into ``T``
  task-specific embeddings and one shared embedding (``InputLayer(width_multiplier=T+1)``).
  Task :math:`k`'s stream :math:`u_k` concatenates the task-:math:`k` part of every field (dense
  fields are appended unchanged to every stream); the shared stream :math:`u_s` the shared parts.
  Task :math:`k`'s specific experts read :math:`u_k`, the shared experts :math:`u_s`; task
  :math:`i`'s gate reads :math:`[u_i; u_s]` and mixes *all* experts of the level, with a
  stop-gradient on the other tasks' specific experts ("All Forward, Task-specific Backward"):

  .. math::
    f_i = g_i([u_i; u_s])^\top [\mathrm{sg}(S_1); ..; S_i; ..; \mathrm{sg}(S_T); S_s],
    \qquad y_i = t_i(f_i).

  With ``num_levels > 1`` levels stack as in PLE: task streams become the fused task outputs,
  and a shared gate :math:`g_s(u_s)` mixes all experts *without* stop-gradient into the next
  shared stream (non-final levels only). See :class:`STEMLevel`.

  Dense ``[B, D]`` input: there are no embedding tables to split, so by default it raises a
  ``ValueError``; with ``dense_projection=P`` the model instead learns ``T + 1`` separate linear
  maps ``project_task_k`` / ``project_shared`` (``D -> P``, no bias) that play the role of the
  task-specific and shared embeddings (an mtjax extension, not in the paper).

  Representation (for strategy='rep'/'shared'): as in :class:`PLE`, the final level's expert
  outputs, shared and task-specific, as one pytree ``(S_s [m_s, B, H], (S_1, .., S_T))``
  (``batch_axis=1``): the embeddings (every stream) and the experts are the trunk, the final
  level's AFTB gates and the towers the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(categorical=(models.Categorical('user', 10, 4),
    ...                                        models.Categorical('item', 20, 4)),
    ...                           dense=(models.Dense('price'),))
    >>> model = models.STEM(num_tasks=2, features=spec, expert=(8,), tower=(4, 1))
    >>> batch = {'user': jnp.array([1, 2, 3]), 'item': jnp.array([4, 5, 6]), 'price': jnp.ones(3)}
    >>> variables = model.init(jax.random.key(0), batch)
    >>> outputs, aux = model.apply(variables, batch)
    >>> outputs.shape, aux['gates'].shape
    ((2, 3), (2, 3, 3))
    >>> variables['params']['input']['embedding']['embed_user']['embedding'].shape  # 4 * (T + 1)
    (11, 12)

  Attributes:
    num_tasks: ``T``.
    features: the :class:`FeatureSpec` (required for feature-dict input).
    num_levels: stacked levels (1 = the paper's single-level STEM-Net).
    num_specific_experts: experts per task per level.
    num_shared_experts: shared experts per level.
    expert: widths of each expert MLP.
    tower: widths of every tower, ending in 1.
    dropout: dropout after hidden activations of experts and towers (train only).
    gate_hidden, gate_bias, gate_dropout, gate_dropout_mode: gate options (see :class:`MMoE`).
    expert_impl: ``"list"`` (default) or ``"vmap"`` (see :class:`Experts`).
    dense_projection: ``None`` (dense-array input raises) or the width ``P`` of the per-stream
      linear projections used for dense-array input.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['gates']`` the final level's task gates
    ``[T, B, T m_k + m_s]``, ``aux['level_gates']``, ``aux['shared_gates']`` (non-final levels),
    ``aux['task_outputs']`` ``[T, B, H]``.

  References:
    Su, Pan, Wang, Xiao, Quan, Chen, Jiang, *STEM: Unleashing the Power of Embeddings for
    Multi-task Recommendation*, AAAI 2024.
  """

  num_tasks: int
  features: Optional[FeatureSpec] = None
  num_levels: int = 1
  num_specific_experts: int = 1
  num_shared_experts: int = 1
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  dropout: float = 0.0
  gate_hidden: Sequence[int] = ()
  gate_bias: bool = False
  gate_dropout: float = 0.0
  gate_dropout_mode: str = "batch"
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL
  dense_projection: Optional[int] = None

  def _streams(self, x) -> Tuple[List[jax.Array], jax.Array]:
    """Task-specific streams ``[B, D_k]`` and the shared stream from the input."""
    T = self.num_tasks
    if not isinstance(x, Mapping):
      if self.dense_projection is None:
        raise ValueError(
          "mtjax: STEM needs a feature dict (with features=FeatureSpec(...)) so that it can "
          "split each embedding into task-specific and shared parts; for a dense [B, D] "
          "array set dense_projection=P to learn T+1 linear projections instead."
        )
      x, _ = InputLayer(None, name="input")(x)
      streams = [nn.Dense(self.dense_projection, use_bias=False, name=f"project_task_{k}")(x) for k in range(T)]
      return streams, nn.Dense(self.dense_projection, use_bias=False, name="project_shared")(x)
    if self.features is None:
      raise ValueError("mtjax: STEM got a feature dict but has no `features` spec; pass features=FeatureSpec(...).")
    _, fields = InputLayer(self.features, width_multiplier=T + 1, name="input")(x)
    parts: List[List[jax.Array]] = [[] for _ in range(T + 1)]
    for f in self.features.categorical:
      chunks = jnp.split(fields[f.name], T + 1, axis=-1)  # [B, e] each: task 0..T-1, then shared
      for s in range(T + 1):
        parts[s].append(chunks[s])
    for f in self.features.sequences:  # pooled histories: split like the categorical embeddings
      chunks = jnp.split(fields[f.name], T + 1, axis=-1)
      for s in range(T + 1):
        parts[s].append(chunks[s])
    for f in self.features.dense:
      for s in range(T + 1):
        parts[s].append(fields[f.name])
    streams = [jnp.concatenate(p, axis=-1) for p in parts]
    return streams[:T], streams[T]

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return _ple_task_specific(self.num_levels) + ((r"^project_task_\d+/",) if self.num_levels == 1 else ())

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1 or self.num_levels < 1:
      raise ValueError(
        f"mtjax: STEM needs num_tasks >= 1 and num_levels >= 1, got {self.num_tasks} and {self.num_levels}."
      )
    if self.num_specific_experts < 1 or self.num_shared_experts < 1:
      raise ValueError("mtjax: STEM needs num_specific_experts >= 1 and num_shared_experts >= 1.")
    task_inputs, shared_input = self._streams(x)
    return stack_levels(self, STEMLevel, task_inputs, shared_input, train=train)
