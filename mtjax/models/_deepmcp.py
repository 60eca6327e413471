r"""DeepMCP: prediction, matching and correlation subnets over one shared embedding (Ouyang et al., SIGIR 2019)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax.models._features import FeatureSpec
from mtjax.models._features import mask_key
from mtjax.models._features import sequence_key
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


@register("deepmcp")
class DeepMCP(nn.Module):
  r"""DeepMCP (Ouyang, Zhang, Zhao, Luo, Zhang, Zhang, Zhang, Zhang, Huang, SIGIR 2019).

  Three subnets over one shared embedding, trained jointly; only the prediction subnet serves:

  * **prediction**: an MLP over every field's embedding -> the CTR logit (output 0);
  * **matching**: a user-side MLP over ``user_fields`` and an item-side MLP over ``item_fields``;
    their inner product :math:`u^\top v` is a second click logit (output 1), so the embeddings learn
    the user-item relation;
  * **correlation**: skip-gram over items -- the target item :math:`i` against the items of the
    user's history (``context_field``, an :class:`IdSequence` in the item table) as positives and
    the other samples' target items as negatives (``num_negatives`` of them, in-batch),

  .. math::
    L_c = -\frac{1}{|C|} \sum_{(i, j) \in C} \Big(\log\sigma(e_i^\top e_j)
      + \sum_{k=1}^{K} \log\sigma(-e_i^\top e_{n_k})\Big),

  on the item table's embeddings :math:`e`. The joint loss is
  :math:`L_p + \alpha L_m + \beta L_c`: train outputs 0 and 1 with BCE on the click label (a
  dataset with the click label twice, or ``task_losses`` weights), and :math:`\beta L_c` is
  ``aux["regularization"][1]`` (added to the matching task by :func:`mtjax.losses.make_loss_fn`).
  Both auxiliary losses reach the shared embedding and never the prediction MLP.

  Representation (for strategy='rep'/'shared'): the shared embedding output ``[B, D]``
  (``batch_axis=0``); the subnets are the heads (the heads read field embeddings beyond ``z``,
  so ``task_grads`` takes per-task VJPs above it: exact).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(
    ...     categorical=(models.Categorical('user', 10, 4), models.Categorical('item', 20, 4)),
    ...     sequences=(models.IdSequence('history', 20, 4, max_len=5, table='item'),))
    >>> model = models.DeepMCP(features=spec, prediction=(8, 1), matching=(8,), correlation_weight=0.5)
    >>> x = {'user': jnp.array([1, 2, 3]), 'item': jnp.array([3, 4, 5]),
    ...      'history': jnp.array([[5, 6, -1], [7, -1, -1], [-1, -1, -1]])}
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['regularization'].shape
    ((2, 3), (2,))

  Attributes:
    features: the :class:`FeatureSpec` (with the item table and the history).
    user_fields, item_fields: the matching subnet's two sides.
    item_field: the categorical field whose table the correlation subnet uses (the target item).
    context_field: the :class:`IdSequence` of context items (sharing ``item_field``'s table).
    prediction: widths of the prediction MLP, ending in 1.
    matching: widths of each side of the matching subnet (the last is the matching dimension).
    correlation_weight: :math:`\beta` (0 switches the correlation subnet off).
    num_negatives: ``K`` in-batch negatives per positive pair (samples rolled by 1..K, at most
      ``B - 1``; another sample's item can equal a context item: the usual in-batch noise).
    dropout: dropout rate after hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [2, B], aux)``: (prediction, matching) logits; ``aux['regularization']`` ``[2]``
    ``(0, beta L_c)``; ``aux['correlation_loss']`` the scalar :math:`L_c`.

  References:
    Ouyang, Zhang, Zhao, Luo, Zhang, Zhang, Zhang, Zhang, Huang, *Representation Learning-Assisted
    Click-Through Rate Prediction*, SIGIR 2019.
  """

  features: Optional[FeatureSpec] = None
  user_fields: Sequence[str] = ("user",)
  item_fields: Sequence[str] = ("item",)
  item_field: str = "item"
  context_field: Optional[str] = "history"
  prediction: Sequence[int] = (64, 32, 1)
  matching: Sequence[int] = (32,)
  correlation_weight: float = 1.0
  num_negatives: int = 4
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the
    prediction MLP and the embedding tables only it reads (task 0), and the matching subnet (task 1)."""
    out = [r"^prediction/", r"^matching_(user|item)/"]
    if self.features is None:
      return tuple(out)
    seqs = {f.name: f for f in self.features.sequences}
    aux_fields = set(self.user_fields) | set(self.item_fields)
    if self.context_field is not None and self.correlation_weight > 0:
      aux_fields |= {self.item_field, self.context_field}
    table = lambda n: seqs[n].table or n if n in seqs else n  # noqa: E731
    aux_tables = {table(n) for n in aux_fields}
    tables = [f.name for f in self.features.categorical] + [f.name for f in seqs.values() if f.table is None]
    out += [rf"^input/embedding/embed_{n}/" for n in tables if n not in aux_tables]
    return tuple(out)

  def _validate(self, x):
    if self.features is None or not isinstance(x, Mapping):
      raise ValueError("mtjax: DeepMCP needs features=FeatureSpec(...) and a feature dict.")
    cats = {f.name for f in self.features.categorical}
    names = set(self.features.names)
    for what, fields in (("user_fields", self.user_fields), ("item_fields", self.item_fields)):
      if not fields or any(n not in names for n in fields):
        raise ValueError(f"mtjax: DeepMCP.{what} {tuple(fields)} must be non-empty fields of the spec {sorted(names)}.")
    if self.item_field not in cats:
      raise ValueError(f"mtjax: DeepMCP.item_field {self.item_field!r} must be a categorical field of the spec.")
    if self.context_field is not None:
      seq = {f.name: f for f in self.features.sequences}.get(self.context_field)
      if seq is None or seq.table != self.item_field:
        raise ValueError(
          f"mtjax: DeepMCP.context_field {self.context_field!r} must be an IdSequence sharing the table of "
          f"item_field {self.item_field!r} (or None, no correlation subnet)."
        )
    if not self.prediction or self.prediction[-1] != 1 or not self.matching:
      raise ValueError("mtjax: DeepMCP.prediction must be widths ending in 1 and matching non-empty widths.")
    if self.num_negatives < 0 or self.correlation_weight < 0:
      raise ValueError("mtjax: DeepMCP.num_negatives and correlation_weight must be >= 0.")

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    self._validate(x)
    h, fields = InputLayer(self.features, name="input")(x)
    h = representation(h, batch_axis=0)
    pred = MLP(tuple(self.prediction), dropout=self.dropout, activate_last=False, name="prediction")(h, train=train)
    cat = lambda names: jnp.concatenate([fields[n] for n in names], axis=-1)  # noqa: E731
    u = MLP(tuple(self.matching), dropout=self.dropout, activate_last=False, name="matching_user")(
      cat(self.user_fields), train=train
    )
    v = MLP(tuple(self.matching), dropout=self.dropout, activate_last=False, name="matching_item")(
      cat(self.item_fields), train=train
    )
    match = jnp.sum(u * v, axis=-1)
    corr = jnp.zeros((), h.dtype)
    if self.context_field is not None and self.correlation_weight > 0:
      e = fields[self.item_field]  # [B, d] target items
      ctx, m = fields[sequence_key(self.context_field)], fields[mask_key(self.context_field)]  # [B, L, d], [B, L]
      pos = jax.nn.log_sigmoid(jnp.einsum("bd,bld->bl", e, ctx))
      neg = jnp.zeros_like(pos)
      for k in range(1, min(self.num_negatives, e.shape[0] - 1) + 1):  # the k-th other sample's target item
        neg = neg + jax.nn.log_sigmoid(-jnp.einsum("bd,bld->bl", jnp.roll(e, k, axis=0), ctx))
      pairs = jnp.sum(m)
      corr = -jnp.sum((pos + neg) * m) / jnp.maximum(pairs, 1.0)
    reg = jnp.stack([jnp.zeros((), h.dtype), self.correlation_weight * corr])
    return jnp.stack([pred[:, 0], match]), {"regularization": reg, "correlation_loss": corr}
