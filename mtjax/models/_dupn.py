r"""DUPN: a universal user representation from behaviour sequences, shared by several tasks (Ni et al., KDD 2018)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models import _experts
from mtjax.models._features import FeatureSpec
from mtjax.models._features import mask_key
from mtjax.models._features import sequence_key
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


def masked_lstm(kernel: jax.Array, bias: jax.Array, xs: jax.Array, mask: jax.Array) -> jax.Array:
  r"""An LSTM over ``xs [B, L, D]`` that holds its state over padded steps; returns ``[B, L, H]``.

  .. math::
    [i; f; g; o] = [x_t; h_{t-1}] W + b, \quad
    c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g), \quad h_t = \sigma(o) \tanh(c_t),

  with :math:`(h_t, c_t) = (h_{t-1}, c_{t-1})` where ``mask[:, t]`` is 0; ``kernel`` is
  ``[D + H, 4H]`` (gates in the order i, f, g, o).
  """
  b, _, _ = xs.shape
  h_dim = kernel.shape[1] // 4
  h0 = jnp.zeros((b, h_dim), xs.dtype)

  def step(carry, inp):
    h, c = carry
    x, m = inp
    z = jnp.concatenate([x, h], axis=-1) @ kernel + bias[None, :]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    keep = m[:, None]
    h, c = keep * h_new + (1 - keep) * h, keep * c_new + (1 - keep) * c
    return (h, c), h

  _, hs = jax.lax.scan(step, (h0, h0), (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(mask, 0, 1)))
  return jnp.swapaxes(hs, 0, 1)


@register("dupn")
class DUPN(nn.Module):
  r"""Deep User Perception Network (Ni, Ou, Liu, Li, Ouyang, Zeng, Sun, KDD 2018).

  A user's behaviour sequence (per behaviour: the item and its properties, :class:`IdSequence`
  fields aligned step by step) is embedded, read by an LSTM, and pooled by attention conditioned on
  the user; with the user's own features it gives one *universal user representation* that every
  task head (CTR, L2R, ...) reads together with the candidate item:

  .. math::
    h_{1..L} = \mathrm{LSTM}(e_1, \ldots, e_L), \quad
    a_t = \underset{t\ \mathrm{valid}}{\mathrm{softmax}}\ v^\top \tanh(W_h h_t + W_u u + b), \quad
    r = \mathrm{relu}\big(W_r [\textstyle\sum_t a_t h_t;\, u] + b_r\big), \quad
    y_k = \mathrm{tower}_k([r;\, q]),

  with :math:`u` the ``user_fields``' embeddings and :math:`q` the ``item_fields``'. Padded steps
  (negative ids) neither update the LSTM nor get attention; an empty history pools to zero.
  Library choices where the paper leaves room: one LSTM layer (the paper's), additive attention, the
  representation width ``representation_dim`` (the paper: 256), and the behaviour's property fields
  concatenated to its item embedding (sharing the item table is the spec's ``table=``).

  Representation (for strategy='rep'/'shared'): the user representation ``r`` ``[B, R]``
  (``batch_axis=0``); the towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(
    ...     categorical=(models.Categorical('user', 10, 4), models.Categorical('item', 20, 4)),
    ...     sequences=(models.IdSequence('history', 20, 4, max_len=5, table='item'),))
    >>> model = models.DUPN(num_tasks=2, features=spec, lstm=8, attention=4, representation_dim=16, tower=(8, 1))
    >>> x = {'user': jnp.array([1, 2]), 'item': jnp.array([3, 4]), 'history': jnp.array([[5, 6, -1], [-1, -1, -1]])}
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['attention'].shape, aux['attention'][1].tolist()   # an empty history
    ((2, 2), (2, 3), [0.0, 0.0, 0.0])

  Attributes:
    num_tasks: ``T``.
    features: the :class:`FeatureSpec`, with the behaviour fields as :class:`IdSequence`.
    behavior_fields: the sequence fields of one behaviour (item, category, ... per step).
    user_fields: the fields of :math:`u`.
    item_fields: the candidate item's fields (:math:`q`; ``()``: none).
    lstm: the LSTM width.
    attention: the attention's hidden width.
    representation_dim: ``R``.
    tower: widths of every task tower, ending in 1.
    dropout: dropout rate after the towers' hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``: ``aux['attention']`` ``[B, L]``, ``aux['user_representation']`` ``[B, R]``.

  References:
    Ni, Ou, Liu, Li, Ouyang, Zeng, Sun, *Perceive Your Users in Depth: Learning Universal User
    Representations from Multiple E-commerce Tasks*, KDD 2018.
  """

  num_tasks: int
  features: Optional[FeatureSpec] = None
  behavior_fields: Sequence[str] = ("history",)
  user_fields: Sequence[str] = ("user",)
  item_fields: Sequence[str] = ("item",)
  lstm: int = 64
  attention: int = 32
  representation_dim: int = 128
  tower: Sequence[int] = (64, 1)
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the towers."""
    return (r"^tower_\d+/",)

  def _validate(self, x):
    if self.features is None or not isinstance(x, Mapping):
      raise ValueError(
        "mtjax: DUPN needs features=FeatureSpec(...) with IdSequence behaviour fields and a feature dict."
      )
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: DUPN needs num_tasks >= 1, got {self.num_tasks}.")
    seqs = {f.name for f in self.features.sequences}
    if not self.behavior_fields or any(n not in seqs for n in self.behavior_fields):
      raise ValueError(
        f"mtjax: DUPN.behavior_fields {tuple(self.behavior_fields)} must name IdSequence fields of the spec "
        f"(it has {sorted(seqs)})."
      )
    names = set(self.features.names)
    unknown = [n for n in tuple(self.user_fields) + tuple(self.item_fields) if n not in names or n in seqs]
    if unknown or not self.user_fields:
      raise ValueError(
        f"mtjax: DUPN: user_fields {tuple(self.user_fields)} (non-empty) and item_fields "
        f"{tuple(self.item_fields)} must be non-sequence fields of the spec; unknown: {unknown}."
      )

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    self._validate(x)
    _, fields = InputLayer(self.features, name="input")(x)
    xs = jnp.concatenate([fields[sequence_key(n)] for n in self.behavior_fields], axis=-1)  # [B, L, D]
    mask = fields[mask_key(self.behavior_fields[0])]  # [B, L]
    u = jnp.concatenate([fields[n] for n in self.user_fields], axis=-1)
    d, h_dim = xs.shape[-1], self.lstm
    kernel = self.param("lstm_kernel", nn.initializers.lecun_normal(), (d + h_dim, 4 * h_dim))
    # forget-gate bias 1 (Jozefowicz et al., 2015): the usual LSTM initialization
    bias = self.param("lstm_bias", lambda k, s: jnp.zeros(s).at[h_dim : 2 * h_dim].set(1.0), (4 * h_dim,))
    hs = masked_lstm(kernel.astype(xs.dtype), bias.astype(xs.dtype), xs, mask)
    scores = nn.Dense(1, use_bias=False, name="attention_score")(
      jnp.tanh(
        nn.Dense(self.attention, use_bias=False, name="attention_hidden")(hs)
        + nn.Dense(self.attention, name="attention_user")(u)[:, None, :]
      )
    )[..., 0]  # [B, L]
    valid = mask > 0
    scores = jnp.where(valid, scores, -jnp.inf)
    any_valid = jnp.any(valid, axis=1, keepdims=True)
    att = jax.nn.softmax(jnp.where(any_valid, scores, 0.0), axis=1)
    att = jnp.where(valid & any_valid, att, 0.0)
    context = jnp.einsum("bl,blh->bh", att, hs)
    r = nn.relu(nn.Dense(self.representation_dim, name="representation")(jnp.concatenate([context, u], -1)))
    r = representation(r, batch_axis=0)
    q = [fields[n] for n in self.item_fields]
    heads = [jnp.concatenate([task_view(r, t)] + q, axis=-1) for t in range(self.num_tasks)]
    outputs = _experts.towers(self.tower, self.num_tasks, heads, dropout=self.dropout, train=train)
    return outputs, {"attention": att, "user_representation": r}
