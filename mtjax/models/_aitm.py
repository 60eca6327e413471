r"""AITM: adaptive information transfer between the steps of a multi-step conversion funnel."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


class AITAttention(nn.Module):
  r"""The AIT module's attention over the two candidates :math:`u \in \{p_{t-1}, q_t\}`.

  .. math::
    z_t = \sum_u w_u\, h_1(u), \qquad
    w_u = \frac{\exp(\hat w_u)}{\sum_{u'} \exp(\hat w_{u'})}, \qquad
    \hat w_u = \frac{\langle h_2(u), h_3(u) \rangle}{\sqrt{k}},

  with :math:`h_1, h_2, h_3` one-layer (linear) maps to ``k`` dimensions shared by both
  candidates.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax.models._aitm import AITAttention
    >>> att = AITAttention(dim=4)
    >>> p, q = jnp.ones((3, 5)), jnp.zeros((3, 5))
    >>> (z, w), _ = att.init_with_output(jax.random.key(0), p, q)
    >>> z.shape, w.shape, bool(jnp.allclose(w.sum(-1), 1.0))
    ((3, 4), (3, 2), True)

  Attributes:
    dim: ``k``, the width of :math:`h_1, h_2, h_3` (and of :math:`z_t`).

  Returns (of ``__call__(transferred, own)``):
    ``(z [B, k], weights [B, 2])`` with weights in the order (transferred, own).
  """

  dim: int

  @nn.compact
  def __call__(self, transferred: jax.Array, own: jax.Array) -> Tuple[jax.Array, jax.Array]:
    u = jnp.stack([transferred, own], axis=1)  # [B, 2, d]
    h1 = nn.Dense(self.dim, name="value")(u)
    h2 = nn.Dense(self.dim, name="key")(u)
    h3 = nn.Dense(self.dim, name="query")(u)
    scores = jnp.sum(h2 * h3, axis=-1) / math.sqrt(self.dim)  # [B, 2]
    weights = jax.nn.softmax(scores, axis=-1)
    z = jnp.einsum("bu,buk->bk", weights, h1)
    return z, weights


@register("aitm")
class AITM(nn.Module):
  r"""Adaptive Information Transfer Multi-task framework for sequential funnels.

  For tasks :math:`t = 1..T` in funnel order (e.g. click -> activation -> purchase), each tower
  maps the shared embedding to :math:`q_t`. The transfer of the previous step is
  :math:`p_{t-1} = g_{t-1}(z_{t-1})` (an MLP, ``transfer`` widths, ReLU), and

  .. math::
    z_1 = q_1, \qquad z_t = \mathrm{AIT}(p_{t-1}, q_t) \ (t \ge 2), \qquad
    \hat y_t = \sigma(f_t(z_t)),

  with the attention of :class:`AITAttention` and a head :math:`f_t` (``head`` widths ending in
  1). Train with :func:`mtjax.losses.aitm_loss` (BCE per task plus the behavioural expectation
  calibrator :math:`\alpha \sum_t \mathrm{mean}\max(\hat y_t - \hat y_{t-1}, 0)`, :math:`\alpha = 0.6`).

  Option: ``stop_transfer_gradient=True`` applies ``stop_gradient`` to :math:`z_{t-1}` before the
  transfer, so task t's loss does not train task t-1's tower through the transfer (some
  implementations do this; the paper does not, the default is False).

  Representation (for strategy='rep'/'shared'): the shared embedding (the input layer's output
  ``[B, D]``, ``batch_axis=0``), the only part all tasks share; towers, transfers, attentions and
  heads are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.AITM(num_tasks=3, tower=(16, 8))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['attention'].shape
    ((3, 5), (2, 5, 2))

  Attributes:
    num_tasks: ``T >= 2`` in funnel order.
    tower: widths of each task tower (activated last layer); its last width is ``d = dim(q_t)``.
    transfer: hidden widths of the transfer MLP :math:`g`; a final ReLU layer of width ``d`` is
      appended so that :math:`p_{t-1}` and :math:`q_t` have the same width.
    attention_dim: ``k`` (``None``: ``d``).
    head: widths of the output head on :math:`z_t`, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after hidden activations (train only).
    stop_transfer_gradient: see above.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: task logits; ``aux['attention']`` is ``[T-1, B, 2]`` (weights of
    (transferred, own) for tasks 2..T, each row sums to 1).

  References:
    Xi, Chen, Liu, Zhao, Luo, Li, *Modeling the Sequential Dependence among Audience Multi-step
    Conversions with Multi-task Learning in Targeted Display Advertising*, KDD 2021.
  """

  num_tasks: int = 2
  tower: Sequence[int] = (128, 64, 32)
  transfer: Sequence[int] = ()
  attention_dim: Optional[int] = None
  head: Sequence[int] = (1,)
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0
  stop_transfer_gradient: bool = False

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    t = self.num_tasks - 1  # earlier tasks' towers and heads also feed later tasks through the transfer
    if t <= 0:
      return (r"^tower_0/", r"^head_0/")
    return (rf"^tower_{t}/", rf"^head_{t}/", rf"^attention_{t}/", rf"^transfer_{t - 1}/")

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 2:
      raise ValueError(f"mtjax: AITM needs num_tasks >= 2 (a funnel), got {self.num_tasks}.")
    if not self.tower:
      raise ValueError("mtjax: AITM needs at least one tower width.")
    if not self.head or self.head[-1] != 1:
      raise ValueError(f"mtjax: AITM: head must be widths ending in 1, got {tuple(self.head)}.")
    h, _ = InputLayer(self.features, name="input")(x)
    h = representation(h, batch_axis=0)
    d = self.tower[-1]
    k = self.attention_dim or d
    q = [MLP(tuple(self.tower), dropout=self.dropout, name=f"tower_{t}")(h, train=train) for t in range(self.num_tasks)]
    z = q[0]
    logits, attention = [], []
    for t in range(self.num_tasks):
      if t > 0:
        prev = jax.lax.stop_gradient(z) if self.stop_transfer_gradient else z
        p = MLP(tuple(self.transfer) + (d,), dropout=self.dropout, name=f"transfer_{t - 1}")(prev, train=train)
        z, w = AITAttention(k, name=f"attention_{t}")(p, q[t])
        attention.append(w)
      head = MLP(tuple(self.head), dropout=self.dropout, activate_last=False, name=f"head_{t}")
      logits.append(head(z, train=train)[:, 0])
    return jnp.stack(logits), {"attention": jnp.stack(attention)}
