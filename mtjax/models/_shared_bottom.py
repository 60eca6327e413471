r"""Shared-Bottom: one shared MLP under one tower per task (hard parameter sharing)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models import _experts
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


@register("shared_bottom")
class SharedBottom(nn.Module):
  r"""Shared-Bottom multi-task network (hard parameter sharing).

  .. math::
    h = f_{\text{bottom}}(x), \qquad y_k = t_k(h), \quad k = 1..T.

  The bottom is a ReLU MLP (activated last layer); each tower ``tower_k`` is an MLP ending in one
  unit (a logit or a raw regression output).

  Representation (for strategy='rep'/'shared'): the bottom's output :math:`h` ``[B, H]``
  (``batch_axis=0``); the towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.SharedBottom(num_tasks=2, bottom=(16,), tower=(8, 1))
    >>> x = jnp.ones((4, 5))
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)
    >>> outputs.shape, aux['bottom'].shape
    ((2, 4), (4, 16))

  Attributes:
    num_tasks: ``T``.
    bottom: widths of the shared MLP.
    tower: widths of every tower, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after every hidden activation (bottom and towers), train only.

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)`` with ``aux['bottom']`` the shared representation ``[B, H]``.

  References:
    Caruana, *Multitask Learning*, Machine Learning 28, 1997.
  """

  num_tasks: int
  bottom: Sequence[int] = (128, 64)
  tower: Sequence[int] = (32, 1)
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return (r"^tower_\d+/",)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: SharedBottom needs num_tasks >= 1, got {self.num_tasks}.")
    x, _ = InputLayer(self.features, name="input")(x)
    h = MLP(tuple(self.bottom), dropout=self.dropout, name="bottom")(x, train=train)
    h = representation(h, batch_axis=0)
    outputs = _experts.towers(
      self.tower, self.num_tasks, [task_view(h, k) for k in range(self.num_tasks)], dropout=self.dropout, train=train
    )
    return outputs, {"bottom": h}
