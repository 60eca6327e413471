"""Building blocks shared by the architectures."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax.models._features import FeatureEmbedding
from mtjax.models._features import FeatureSpec

Activation = Callable[[jax.Array], jax.Array]


class MLP(nn.Module):
  """Dense layers with an activation (and optional dropout) after each hidden layer.

  Attributes:
    features: layer widths.
    activation: applied after every layer except the last when ``activate_last`` is False.
    dropout: dropout rate after each activated layer (active only with ``train=True``).
    activate_last: whether the last layer is followed by the activation (True for experts and
      bottoms, False for towers that end in a logit).
  """

  features: Sequence[int]
  activation: Activation = nn.relu
  dropout: float = 0.0
  activate_last: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    n = len(self.features)
    for i, width in enumerate(self.features):
      x = nn.Dense(width, kernel_init=self.kernel_init, name=f"Dense_{i}")(x)
      if i < n - 1 or self.activate_last:
        x = self.activation(x)
        if self.dropout > 0:
          x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


class InputLayer(nn.Module):
  """Turns the model input into ``[B, D]``: a float array passes through; a feature dict is embedded.

  With ``features`` set, the input must be a feature dict: a dense array is an error (it would
  silently bypass the spec's embeddings).

  Returns ``(x, field_embeddings)``; ``field_embeddings`` is ``{}`` for array inputs.
  """

  features: Optional[FeatureSpec] = None
  width_multiplier: int = 1

  @nn.compact
  def __call__(self, x: Union[jax.Array, Mapping[str, Any]]):
    if isinstance(x, Mapping):
      if self.features is None:
        raise ValueError(
          "mtjax: this model got a feature dict but has no `features` spec; "
          "pass features=FeatureSpec(...) or a dense [B, D] array."
        )
      return FeatureEmbedding(self.features, width_multiplier=self.width_multiplier, name="embedding")(x)
    if self.features is not None:
      raise ValueError(
        f"mtjax: this model was built with features=FeatureSpec({', '.join(self.features.names)}) but got a "
        f"dense array of shape {jnp.shape(x)}; pass the feature dict {{name: [B] ids or values}} the spec "
        "describes, or build the model without features= to feed dense [B, D] inputs."
      )
    x = jnp.asarray(x)
    if x.ndim != 2:
      raise ValueError(f"mtjax: dense model input must be [B, D], got shape {x.shape}.")
    return x, {}
