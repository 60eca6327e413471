r"""DSelect-k: differentiable selection of k experts per task (Hazimeh et al., NeurIPS 2021)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models import _experts
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register

_EPS = 1e-6  # inside the entropy's log, as in the paper's code


def smooth_step(t: jax.Array, gamma: float = 1.0) -> jax.Array:
  r"""The smooth-step function of Hazimeh et al. (2020): 0 below :math:`-\gamma/2`, 1 above
  :math:`\gamma/2`, and :math:`-\frac{2}{\gamma^3} t^3 + \frac{3}{2\gamma} t + \frac12` between
  (continuously differentiable, exactly 0 or 1 outside the band).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax.models import smooth_step
    >>> smooth_step(jnp.array([-1.0, 0.0, 0.25, 1.0])).tolist()
    [0.0, 0.5, 0.84375, 1.0]
  """
  poly = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
  return jnp.where(t <= -gamma / 2, jnp.zeros_like(t), jnp.where(t >= gamma / 2, jnp.ones_like(t), poly))


def binary_codes(num_experts: int) -> np.ndarray:
  """``[num_experts, m]`` booleans, row ``i`` the ``m = ceil(log2 n)``-bit code of ``i`` (most significant first)."""
  m = max(1, math.ceil(math.log2(num_experts)))
  return np.array([[(i >> (m - 1 - b)) & 1 for b in range(m)] for i in range(num_experts)], bool)


def single_expert_selectors(z: jax.Array, num_experts: int, gamma: float) -> jax.Array:
  r"""``[..., k, m]`` logits -> ``[..., k, n]``: selector ``i`` puts :math:`\prod_b S(z_{ib})^{c_{jb}}
  (1 - S(z_{ib}))^{1 - c_{jb}}` on expert ``j`` (code :math:`c_j`); a distribution over the ``2^m``
  codes, of which the first ``n`` are experts."""
  s = smooth_step(z, gamma)[..., None, :]  # [..., k, 1, m]
  codes = jnp.asarray(binary_codes(num_experts))  # [n, m]
  return jnp.prod(jnp.where(codes, s, 1.0 - s), axis=-1)


class DSelectKGate(nn.Module):
  r"""A DSelect-k gate: a mixture of ``k`` single-expert selectors over ``n`` experts.

  .. math::
    q = \sum_{i=1}^{k} \mathrm{softmax}(w)_i\, r(z_i), \qquad
    r(z)_j = \prod_{b=1}^{m} S(z_b)^{c_{jb}} \big(1 - S(z_b)\big)^{1 - c_{jb}},

  with :math:`S` :func:`smooth_step`, :math:`c_j` the ``m``-bit binary code of expert ``j`` and
  :math:`z_i \in \mathbb R^m`. Once every :math:`z_{ib}` is outside :math:`(-\gamma/2, \gamma/2)` each
  selector is one expert and :math:`q` has at most ``k`` non-zeros. Static (``per_example=False``,
  the paper's task-only gate: ``z`` and ``w`` are parameters) or per-example (``z = W_z x``,
  ``w = W_w x``). Initialized as in the paper's code: ``z`` (and ``W_z``) uniform in
  :math:`\pm\gamma/100`, ``w`` (and ``W_w``) uniform in :math:`\pm 0.05`.

  Returns ``(weights, regularization)``: ``weights`` ``[B, n]`` (rows sum to one when ``n`` is a
  power of two; otherwise to the selectors' mass on the ``n`` reachable codes) and the gate's
  penalty, a scalar: ``entropy_reg`` times the summed entropy of the selectors (per-example:
  averaged over the batch), which drives them to single experts, plus, when ``n`` is not a power
  of two, :math:`\sum_i 1/(\sum_{j<n} r(z_i)_j + 10^{-6})` (the paper's code: keeps the unreachable
  codes from taking a selector; it is about ``k`` once they have no weight, and a finite 1e6 for a
  selector already stuck on an unreachable code, where the smooth-step is flat).

  Attributes:
    num_experts: ``n``.
    k: the number of single-expert selectors (at most ``k`` experts at convergence).
    gamma: the smooth-step band.
    entropy_reg: the entropy penalty's weight (the paper tunes it; 0 disables it).
    per_example: example-conditioned gate.
  """

  num_experts: int
  k: int = 2
  gamma: float = 1.0
  entropy_reg: float = 0.0
  per_example: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    n, k = self.num_experts, self.k
    if n < 1 or k < 1:
      raise ValueError(f"mtjax: DSelectKGate needs num_experts >= 1 and k >= 1, got {n} and {k}.")
    if self.gamma <= 0 or self.entropy_reg < 0:
      raise ValueError(
        f"mtjax: DSelectKGate needs gamma > 0 and entropy_reg >= 0, got {self.gamma}, {self.entropy_reg}."
      )
    m = binary_codes(n).shape[1]
    z_init = nn.initializers.uniform(scale=self.gamma / 50)  # U[0, gamma/50), shifted below
    w_init = nn.initializers.uniform(scale=0.1)
    shift = lambda init, c: lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) - c  # noqa: E731
    z_init, w_init = shift(z_init, self.gamma / 100), shift(w_init, 0.05)
    batch = x.shape[0]
    if self.per_example:
      z = nn.Dense(k * m, kernel_init=z_init, bias_init=z_init, name="z")(x).reshape(batch, k, m)
      w = nn.Dense(k, kernel_init=w_init, bias_init=w_init, name="w")(x)  # [B, k]
    else:
      z = self.param("z", z_init, (k, m))
      w = self.param("w", w_init, (k,))
    selectors = single_expert_selectors(z, n, self.gamma)  # [k, n] or [B, k, n]
    weights = jnp.einsum("...i,...ij->...j", jax.nn.softmax(w, axis=-1), selectors)
    weights = jnp.broadcast_to(weights, (batch, n))
    penalty = jnp.zeros((), weights.dtype)
    if self.entropy_reg > 0:
      entropy = -jnp.sum(selectors * jnp.log(selectors + _EPS), axis=(-2, -1))
      penalty = penalty + self.entropy_reg * jnp.mean(entropy)
    if n != 2**m:
      penalty = penalty + jnp.mean(jnp.sum(1.0 / (jnp.sum(selectors, axis=-1) + _EPS), axis=-1))
    return weights, penalty


@register("dselect_k")
class DSelectK(nn.Module):
  r"""A multi-gate mixture of experts with DSelect-k gates (Hazimeh et al., NeurIPS 2021).

  .. math::
    y_t = \mathrm{tower}_t\Big(\sum_{e=1}^{E} q_t(x)_e\, f_e(x)\Big),

  with ``E`` ReLU expert MLPs :math:`f_e` and one :class:`DSelectKGate` :math:`q_t` per task,
  which converges to at most ``k`` experts. ``aux['regularization']`` is the ``[T]`` vector of the
  gates' penalties (task ``t``'s gate is trained by task ``t`` alone);
  :func:`mtjax.losses.make_loss_fn` adds it to the task losses (so ``fit``, ``run`` and ``compare``
  do), and a hand-written loss adds ``aux['regularization']`` itself.

  Representation (for strategy='rep'/'shared'): the stacked expert outputs ``[E, B, H]``
  (``batch_axis=1``), as in :class:`MMoE`; gates and towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.DSelectK(num_tasks=2, num_experts=4, k=2, expert=(8,), tower=(4, 1))
    >>> x = jnp.ones((3, 5))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['gates'].shape, aux['regularization'].shape
    ((2, 3), (2, 3, 4), (2,))

  Attributes:
    num_tasks: ``T``.
    num_experts: ``E``.
    k: selectors per gate (at most ``k`` experts per task at convergence).
    gamma: the smooth-step band of the gates.
    entropy_reg: weight of the gates' entropy penalty (0: none; the paper tunes it per data set).
    per_example: example-conditioned gates (the paper's static, task-only gates otherwise).
    expert: widths of each expert MLP.
    tower: widths of every tower, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after hidden activations of experts and towers (train only).
    expert_impl: as in :class:`MMoE`.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['gates']`` ``[T, B, E]``, ``aux['expert_outputs']``
    ``[E, B, H]``, ``aux['regularization']`` ``[T]``.

  References:
    Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi, *DSelect-k: Differentiable
    Selection in the Mixture of Experts with Applications to Multi-Task Learning*, NeurIPS 2021.
  """

  num_tasks: int
  num_experts: int = 8
  k: int = 2
  gamma: float = 1.0
  entropy_reg: float = 0.0
  per_example: bool = False
  expert: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0
  expert_impl: str = _experts.DEFAULT_EXPERT_IMPL

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: gates and towers."""
    return (r"^tower_\d+/", r"^gate_\d+/")

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: DSelectK needs num_tasks >= 1, got {self.num_tasks}.")
    if not 1 <= self.k <= self.num_experts:
      raise ValueError(f"mtjax: DSelectK needs 1 <= k <= num_experts, got k={self.k}, num_experts={self.num_experts}.")
    x, _ = InputLayer(self.features, name="input")(x)
    expert_outputs = _experts.Experts(
      self.num_experts, tuple(self.expert), dropout=self.dropout, impl=self.expert_impl, name="experts"
    )(x, train=train)
    expert_outputs = representation(expert_outputs, batch_axis=1)
    gates, penalties, mixed = [], [], []
    for t in range(self.num_tasks):
      g, p = DSelectKGate(self.num_experts, self.k, self.gamma, self.entropy_reg, self.per_example, name=f"gate_{t}")(x)
      gates.append(g)
      penalties.append(p)
      mixed.append(_experts.mix(g, task_view(expert_outputs, t)))
    outputs = _experts.towers(self.tower, self.num_tasks, mixed, dropout=self.dropout, train=train)
    aux = {"gates": jnp.stack(gates), "expert_outputs": expert_outputs, "regularization": jnp.stack(penalties)}
    return outputs, aux
