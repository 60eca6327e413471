r"""Cross-Stitch networks: one column per task, linear mixing of the columns after every layer (Misra et al., 2016)."""

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


def cross_stitch_init(alpha_same: float, channels: Optional[int] = None):
  r"""The paper's initialization of a cross-stitch unit: ``alpha_same`` on the diagonal and
  :math:`(1 - \alpha_S)/(T - 1)` off it (rows sum to one; ``[[1]]`` for one task), broadcast to
  ``[T, T, channels]`` when ``channels`` is given."""

  def init(key, shape, dtype=jnp.float32):
    del key
    t = shape[0]
    off = (1.0 - alpha_same) / (t - 1) if t > 1 else 0.0
    a = jnp.full((t, t), off, dtype) + jnp.eye(t, dtype=dtype) * ((alpha_same if t > 1 else 1.0) - off)
    return jnp.broadcast_to(a[:, :, None], shape) if channels is not None else a

  return init


class CrossStitchUnit(nn.Module):
  r"""Mixes the task columns' activations: :math:`\tilde x_t = \sum_s \alpha_{ts} x_s`.

  Input and output ``[T, B, H]``; ``alpha`` is ``[T, T]`` (one scalar per task pair, the paper's
  unit) or ``[T, T, H]`` with ``channel_wise`` (one per task pair and channel, the paper's variant).

  Attributes:
    alpha_same: the initial diagonal (the paper's :math:`\alpha_S`; 1 makes the unit the identity).
    channel_wise: one ``alpha`` per channel.
  """

  alpha_same: float = 0.9
  channel_wise: bool = False

  @nn.compact
  def __call__(self, xs: jax.Array) -> jax.Array:
    t, _, h = xs.shape
    if self.channel_wise:
      alpha = self.param("alpha", cross_stitch_init(self.alpha_same, h), (t, t, h))
      return jnp.einsum("tsh,sbh->tbh", alpha.astype(xs.dtype), xs)
    alpha = self.param("alpha", cross_stitch_init(self.alpha_same), (t, t))
    return jnp.einsum("ts,sbh->tbh", alpha.astype(xs.dtype), xs)


@register("cross_stitch")
class CrossStitch(nn.Module):
  r"""Cross-Stitch network (Misra et al., CVPR 2016) over a shared input embedding.

  One ReLU MLP column per task; after every hidden layer ``l`` a cross-stitch unit mixes the
  columns' activations linearly,

  .. math::
    h^{l}_t = \mathrm{relu}(W^l_t \tilde h^{l-1}_t + b^l_t), \qquad
    \tilde h^{l}_t = \sum_{s=1}^{T} \alpha^l_{ts} h^l_s, \qquad y_t = \mathrm{tower}_t(\tilde h^{L}_t),

  with :math:`\tilde h^0_t = x` (the embedded input, shared). :math:`\alpha` starts at the paper's
  :math:`\alpha_S = 0.9` on the diagonal and :math:`(1-\alpha_S)/(T-1)` off it; at
  :math:`\alpha = I` the model is :math:`T` separate networks. The paper also gives the
  :math:`\alpha` a larger learning rate (by :math:`10^2`-:math:`10^3`); do that with
  ``optax.multi_transform`` on the ``stitch_*`` parameters (not built in).

  Representation (for strategy='rep'/'shared'): the stitched outputs of the last layer,
  ``[T, B, H]`` (``batch_axis=1``); task ``t``'s tower reads row ``t``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.CrossStitch(num_tasks=3, hidden=(8, 4), tower=(1,))
    >>> x = jnp.ones((5, 6))
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)
    >>> outputs.shape, aux['columns'].shape, variables['params']['stitch_0']['alpha'].shape
    ((3, 5), (3, 5, 4), (3, 3))

  Attributes:
    num_tasks: ``T``.
    hidden: widths of every column's layers (a cross-stitch unit after each).
    tower: widths of every tower, ending in 1 (``(1,)``: a linear head).
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after every hidden activation (train only).
    alpha_same: the initial diagonal of the cross-stitch units.
    channel_wise: one ``alpha`` per task pair and channel.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)`` with ``aux['columns']`` the stitched last-layer outputs ``[T, B, H]``.

  References:
    Misra, Shrivastava, Gupta, Hebert, *Cross-stitch Networks for Multi-task Learning*, CVPR 2016.
  """

  num_tasks: int
  hidden: Sequence[int] = (64, 32)
  tower: Sequence[int] = (16, 1)
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0
  alpha_same: float = 0.9
  channel_wise: bool = False

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the
    towers (the columns are mixed by the stitches, so every task reaches every column)."""
    return (r"^tower_\d+/",)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: CrossStitch needs num_tasks >= 1, got {self.num_tasks}.")
    if not self.hidden:
      raise ValueError("mtjax: CrossStitch needs at least one hidden layer (a cross-stitch unit follows each).")
    if not 0.0 <= self.alpha_same <= 1.0:
      raise ValueError(f"mtjax: CrossStitch.alpha_same must be in [0, 1], got {self.alpha_same}.")
    x, _ = InputLayer(self.features, name="input")(x)
    cols = [x] * self.num_tasks
    stitched = None
    for l, width in enumerate(self.hidden):
      outs = []
      for t in range(self.num_tasks):
        h = nn.relu(nn.Dense(width, name=f"column_{t}_dense_{l}")(cols[t]))
        if self.dropout > 0:
          h = nn.Dropout(self.dropout, deterministic=not train)(h)
        outs.append(h)
      stitched = CrossStitchUnit(self.alpha_same, self.channel_wise, name=f"stitch_{l}")(jnp.stack(outs))
      cols = [stitched[t] for t in range(self.num_tasks)]
    z = representation(stitched, batch_axis=1)
    outputs = _experts.towers(
      self.tower,
      self.num_tasks,
      [task_view(z, k)[k] for k in range(self.num_tasks)],
      dropout=self.dropout,
      train=train,
    )
    return outputs, {"columns": z}
