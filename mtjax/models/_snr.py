r"""SNR: sub-network routing with hard-concrete coding variables (Ma et al., AAAI 2019)."""

from __future__ import annotations

import math
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

# Louizos, Welling, Kingma (2018): the stretch interval (gamma, zeta) and temperature beta that SNR uses.
HARD_CONCRETE = {"beta": 2.0 / 3.0, "gamma": -0.1, "zeta": 1.1}


def hard_concrete_sample(log_alpha: jax.Array, key: jax.Array, *, beta=2 / 3, gamma=-0.1, zeta=1.1) -> jax.Array:
  r"""A hard-concrete sample (Louizos et al., 2018): :math:`u \sim U(0, 1)`,
  :math:`s = \sigma((\log u - \log(1 - u) + \log\alpha)/\beta)`,
  :math:`z = \min(1, \max(0, s(\zeta - \gamma) + \gamma))` -- exactly 0 or 1 with positive
  probability, differentiable in :math:`\log\alpha` (the reparameterization)."""
  u = jax.random.uniform(key, jnp.shape(log_alpha), jnp.result_type(log_alpha), minval=1e-6, maxval=1.0 - 1e-6)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
  return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_l0(log_alpha: jax.Array, *, beta=2 / 3, gamma=-0.1, zeta=1.1) -> jax.Array:
  r"""The expected number of non-zero gates, :math:`\sum \sigma(\log\alpha - \beta \log(-\gamma/\zeta))`
  (the closed-form L0 penalty of Louizos et al., 2018)."""
  return jnp.sum(jax.nn.sigmoid(log_alpha - beta * math.log(-gamma / zeta)))


class SNRRouting(nn.Module):
  r"""Routes ``n`` inputs ``[n, B, H]`` to ``m`` outputs through hard-concrete coding variables.

  .. math::
    v_j = \sum_{i=1}^{n} z_{ij}\, W_{ij} u_i \;(\text{SNR-Trans}), \qquad
    v_j = \sum_{i=1}^{n} z_{ij}\, u_i \;(\text{SNR-Aver}),

  with :math:`z_{ij}` sampled from the hard concrete distribution of :math:`\log\alpha_{ij}` in
  training (the ``'dropout'`` RNG) and, in evaluation, :math:`z_{ij} = [\log\alpha_{ij} > 0]`
  (``eval_gates="binary"``: the median gate, exactly 0 or 1) or the mean-like estimator
  :math:`\min(1, \max(0, \sigma(\log\alpha)(\zeta - \gamma) + \gamma))` (``"expected"``, Louizos et
  al.'s test-time gate). ``u`` is ``[n, B, H]``, or ``[m, n, B, H]`` where output ``j`` reads its own
  copy ``u[j]`` (the task views of the representation). Returns ``(v [m, B, H'], z [n, m], l0 [m])``
  with ``l0[j]`` the closed-form expected number of open gates into output ``j``.

  Attributes:
    num_outputs: ``m``.
    width: output width of SNR-Trans's ``W_ij`` (ignored by SNR-Aver, whose outputs keep ``H``).
    variant: ``"trans"`` or ``"aver"``.
    eval_gates: ``"binary"`` or ``"expected"``.
    log_alpha_init: initial :math:`\log\alpha` (3: gates open with probability ~0.99 at the start).
  """

  num_outputs: int
  width: int = 64
  variant: str = "trans"
  eval_gates: str = "binary"
  log_alpha_init: float = 3.0

  @nn.compact
  def __call__(self, u: jax.Array, *, train: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
    if self.variant not in ("trans", "aver"):
      raise ValueError(f"mtjax: SNR routing variant must be 'trans' or 'aver', got {self.variant!r}.")
    if self.eval_gates not in ("binary", "expected"):
      raise ValueError(f"mtjax: SNR eval_gates must be 'binary' or 'expected', got {self.eval_gates!r}.")
    per_output = u.ndim == 4
    n, h = u.shape[-3], u.shape[-1]
    m = self.num_outputs
    if per_output and u.shape[0] != m:
      raise ValueError(f"mtjax: SNR routing got {u.shape[0]} per-output inputs for {m} outputs.")
    log_alpha = self.param("log_alpha", nn.initializers.constant(self.log_alpha_init), (n, m))
    hc = HARD_CONCRETE
    if train:
      if not self.has_rng("dropout"):
        raise ValueError(
          "mtjax: SNR samples its coding variables in training: pass a 'dropout' RNG "
          "(model.apply(..., rngs={'dropout': key}); make_loss_fn's loss takes rngs={'dropout': key})."
        )
      z = hard_concrete_sample(log_alpha, self.make_rng("dropout"), **hc)
    elif self.eval_gates == "binary":
      z = (log_alpha > 0).astype(log_alpha.dtype)
    else:
      z = jnp.clip(jax.nn.sigmoid(log_alpha) * (hc["zeta"] - hc["gamma"]) + hc["gamma"], 0.0, 1.0)
    zu = z.astype(u.dtype)
    if self.variant == "trans":
      w = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0, 1)), (n, m, h, self.width))
      b = self.param("bias", nn.initializers.zeros, (m, self.width))
      spec = "ij,jibh,ijhk->jbk" if per_output else "ij,ibh,ijhk->jbk"
      v = jnp.einsum(spec, zu, u, w.astype(u.dtype)) + b[:, None, :].astype(u.dtype)
    else:
      v = jnp.einsum("ij,jibh->jbh" if per_output else "ij,ibh->jbh", zu, u)
    l0 = jax.nn.sigmoid(log_alpha - hc["beta"] * math.log(-hc["gamma"] / hc["zeta"])).sum(0)
    return v, z, l0


@register("snr")
class SNR(nn.Module):
  r"""Sub-Network Routing (Ma, Zhao, Cheng, Tang, Hong, Chi, AAAI 2019).

  The shared layers are split into levels of sub-networks; the connections from every sub-network
  of a level to every sub-network of the next (and from the last level to the ``T`` task towers)
  are gated by hard-concrete coding variables :math:`z_{ij}` (:class:`SNRRouting`), so training
  learns which connections each task uses:

  .. math::
    u^{1}_i = f^{1}_i(x), \qquad u^{l+1}_j = f^{l+1}_j\Big(\sum_i z^{l}_{ij} W^{l}_{ij} u^{l}_i\Big),
    \qquad y_t = \mathrm{tower}_t\Big(\sum_i z^{L}_{it} W^{L}_{it} u^{L}_i\Big)

  (SNR-Trans; SNR-Aver drops the :math:`W` and needs equal widths). ``aux['regularization']``
  ``[T]`` is the L0 penalty: ``l0_weight`` times the expected number of open gates, each task's own
  routing to its tower plus the lower levels' gates shared out equally over the tasks (every task
  trains them). :func:`mtjax.losses.make_loss_fn` adds it to the task losses (so ``fit``, ``run``
  and ``compare`` do); :meth:`SNR.add_l0` adds it to hand-computed losses.

  Representation (for strategy='rep'/'shared'): the last level's outputs ``[n_L, B, H]``
  (``batch_axis=1``); the routing to the towers and the towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.SNR(num_tasks=2, num_subnetworks=(3, 2), subnetwork=(8,), tower=(4, 1))
    >>> x = jnp.ones((5, 6))
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)                      # evaluation: gates exactly 0 or 1
    >>> outputs.shape, aux['gates'][0].shape, aux['regularization'].shape
    ((2, 5), (3, 2), (2,))

  Attributes:
    num_tasks: ``T``.
    num_subnetworks: sub-networks per level (e.g. ``(3, 3)``: two levels of three).
    subnetwork: widths of every sub-network MLP (ReLU, activated output).
    tower: widths of every tower, ending in 1.
    variant: ``"trans"`` (SNR-Trans) or ``"aver"`` (SNR-Aver).
    eval_gates: ``"binary"`` (:math:`[\log\alpha > 0]`) or ``"expected"`` (see :class:`SNRRouting`).
    l0_weight: the L0 penalty's weight (the paper tunes it; 0: no penalty).
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after the sub-networks' and towers' hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['gates']`` the gates of every routing (``[n_l, n_{l+1}]``, the
    last ``[n_L, T]``; sampled in training), ``aux['regularization']`` ``[T]`` (the L0 penalty).

  References:
    Ma, Zhao, Cheng, Tang, Hong, Chi, *SNR: Sub-Network Routing for Flexible Parameter Sharing in
    Multi-Task Learning*, AAAI 2019.
    Louizos, Welling, Kingma, *Learning Sparse Neural Networks through L0 Regularization*, ICLR 2018.
  """

  num_tasks: int
  num_subnetworks: Sequence[int] = (3, 3)
  subnetwork: Sequence[int] = (64,)
  tower: Sequence[int] = (32, 1)
  variant: str = "trans"
  eval_gates: str = "binary"
  l0_weight: float = 1e-4
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the
    towers. (The last routing's kernels and gates for task ``t`` are one slice of shared arrays.)"""
    return (r"^tower_\d+/",)

  @staticmethod
  def add_l0(losses: jax.Array, aux: Dict[str, Any]) -> jax.Array:
    """``losses + aux['regularization']``: the task losses ``[T]`` with the L0 penalty of a model call's aux."""
    return losses + aux["regularization"].astype(jnp.result_type(losses))

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1 or not self.num_subnetworks or min(self.num_subnetworks) < 1:
      raise ValueError(
        f"mtjax: SNR needs num_tasks >= 1 and num_subnetworks >= 1 per level, got {self.num_tasks} and "
        f"{tuple(self.num_subnetworks)}."
      )
    if not self.subnetwork:
      raise ValueError("mtjax: SNR.subnetwork needs at least one layer width.")
    x, _ = InputLayer(self.features, name="input")(x)
    width = self.subnetwork[-1]

    def level(l, inputs):  # inputs: one [B, D] per sub-network
      return jnp.stack(
        [
          MLP(tuple(self.subnetwork), dropout=self.dropout, name=f"level_{l}_subnet_{i}")(h, train=train)
          for i, h in enumerate(inputs)
        ]
      )

    u = level(0, [x] * self.num_subnetworks[0])
    gates, l0_shared = [], jnp.zeros((), u.dtype)
    for l in range(1, len(self.num_subnetworks)):
      router = SNRRouting(self.num_subnetworks[l], width, self.variant, self.eval_gates, name=f"routing_{l - 1}")
      v, z, l0 = router(u, train=train)
      gates.append(z)
      l0_shared = l0_shared + jnp.sum(l0)
      u = level(l, list(v))
    u = representation(u, batch_axis=1)
    views = jnp.stack([task_view(u, t) for t in range(self.num_tasks)])  # [T, n_L, B, H]: task t reads its copy
    v, z, l0_task = SNRRouting(self.num_tasks, width, self.variant, self.eval_gates, name="routing_tasks")(
      views, train=train
    )
    gates.append(z)
    outputs = _experts.towers(self.tower, self.num_tasks, list(v), dropout=self.dropout, train=train)
    l0 = self.l0_weight * (l0_task + l0_shared / self.num_tasks)
    return outputs, {"gates": gates, "regularization": l0.astype(outputs.dtype)}
