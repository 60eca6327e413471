r"""STAR: star-topology adaptive recommender for multi-domain CTR prediction."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src import numerics
from mtjax._src.sparse import representation
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


def _check_domain_ids(domain_ids: jax.Array, num_domains: int) -> jax.Array:
  domain_ids = jnp.asarray(domain_ids)
  if not jnp.issubdtype(domain_ids.dtype, jnp.integer):
    raise ValueError(f"mtjax: domain ids must be integers, got {domain_ids.dtype}.")
  if domain_ids.ndim != 1:
    raise ValueError(f"mtjax: domain ids must be a vector [B], got shape {domain_ids.shape}.")
  return numerics.enforce(
    domain_ids,
    numerics.condition_check(
      jnp.any((domain_ids < 0) | (domain_ids >= num_domains)),
      f"mtjax: domain ids must lie in [0, {num_domains}); set num_domains to the number of domains or remap the ids.",
    ),
  )


class PartitionedNorm(nn.Module):
  r"""Partitioned normalization: batch normalization with per-domain statistics and affine terms.

  .. math::
    z' = (\gamma \cdot \gamma_d) \, \frac{z - \mu_d}{\sqrt{\sigma_d^2 + \epsilon}} + (\beta + \beta_d),

  where :math:`d` is each sample's domain. In training :math:`\mu_d, \sigma^2_d` are the (biased)
  mean and variance over the batch samples of domain d (segment sums, so a mixed-domain batch
  normalizes every sample exactly as a batch of its domain alone would), and the moving averages
  of domain d in the ``'batch_stats'`` collection (``mean``, ``var``: ``[M, D]``) are updated
  only for the domains present in the batch (call ``apply`` with ``mutable=['batch_stats']``).
  At inference (``train=False``) each sample uses its domain's moving statistics.

  ``scale="additive"`` uses :math:`\gamma + \gamma_d` (with :math:`\gamma_d` initialised to 0)
  instead of the paper's product (:math:`\gamma_d` initialised to 1).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> pn = models.PartitionedNorm(num_domains=2)
    >>> x, d = jnp.arange(8.0).reshape(4, 2), jnp.array([0, 1, 0, 1])
    >>> variables = pn.init(jax.random.key(0), x, d)
    >>> y, updates = pn.apply(variables, x, d, train=True, mutable=['batch_stats'])
    >>> y[:, 0]
    Array([-0.99999875, -0.99999875,  0.99999875,  0.99999875], dtype=float32)
    >>> updates['batch_stats']['mean'][:, 0]
    Array([0.02, 0.04], dtype=float32)

  Attributes:
    num_domains: ``M``.
    momentum: decay of the moving statistics.
    epsilon: added to the variance.
    scale: ``"multiplicative"`` (paper) or ``"additive"``.

  References:
    Sheng, Zhao, Zhang, Li, Hu, Wang, Gai, Yin, Ren, Zhao, Zhu, *One Model to Serve All: Star
    Topology Adaptive Recommender for Multi-Domain CTR Prediction*, CIKM 2021.
  """

  num_domains: int
  momentum: float = 0.99
  epsilon: float = 1e-5
  scale: str = "multiplicative"

  @nn.compact
  def __call__(self, x: jax.Array, domain_ids: jax.Array, *, train: bool = False) -> jax.Array:
    if self.scale not in ("multiplicative", "additive"):
      raise ValueError(f"mtjax: PartitionedNorm.scale must be 'multiplicative' or 'additive', got {self.scale!r}.")
    m, dim = self.num_domains, x.shape[-1]
    domain_ids = _check_domain_ids(domain_ids, m)
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((m, dim), stat_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((m, dim), stat_dtype))
    multiplicative = self.scale == "multiplicative"
    gamma = self.param("scale", nn.initializers.ones, (dim,), stat_dtype)
    gamma_d = self.param(
      "domain_scale", nn.initializers.ones if multiplicative else nn.initializers.zeros, (m, dim), stat_dtype
    )
    beta = self.param("bias", nn.initializers.zeros, (dim,), stat_dtype)
    beta_d = self.param("domain_bias", nn.initializers.zeros, (m, dim), stat_dtype)

    xf = x.astype(stat_dtype)
    if train:
      count = jax.ops.segment_sum(jnp.ones_like(domain_ids, stat_dtype), domain_ids, num_segments=m)[:, None]
      mean = numerics.safe_div(jax.ops.segment_sum(xf, domain_ids, num_segments=m), count)
      centered = xf - mean[domain_ids]
      var = numerics.safe_div(jax.ops.segment_sum(jnp.square(centered), domain_ids, num_segments=m), count)
      if not self.is_initializing():
        present = count > 0
        mom = self.momentum
        ra_mean.value = jnp.where(present, mom * ra_mean.value + (1 - mom) * mean, ra_mean.value)
        ra_var.value = jnp.where(present, mom * ra_var.value + (1 - mom) * var, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
      centered = xf - mean[domain_ids]
    normalized = centered * jax.lax.rsqrt(var[domain_ids] + self.epsilon)
    scale = gamma[None, :] * gamma_d[domain_ids] if multiplicative else gamma[None, :] + gamma_d[domain_ids]
    shift = beta[None, :] + beta_d[domain_ids]
    return (normalized * scale + shift).astype(x.dtype)


class StarDense(nn.Module):
  r"""A star-topology fully connected layer: shared weights times per-domain weights.

  .. math::
    y = x \, (W \otimes W_d) + (b + b_d),

  with :math:`\otimes` the elementwise product and :math:`d` each sample's domain. :math:`W_d` is
  initialised to ones and :math:`b_d` to zeros, so training starts from the shared layer. A
  mixed-domain batch computes every domain's product and selects per sample (cost ``M`` times a
  dense layer).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> layer = models.StarDense(3, num_domains=2)
    >>> y, variables = layer.init_with_output(jax.random.key(0), jnp.ones((4, 5)), jnp.array([0, 1, 1, 0]))
    >>> y.shape, variables['params']['domain_kernel'].shape
    ((4, 3), (2, 5, 3))

  Attributes:
    features: output width.
    num_domains: ``M``.
    kernel_init: initializer of the shared :math:`W`.

  References:
    Sheng, Zhao, Zhang, Li, Hu, Wang, Gai, Yin, Ren, Zhao, Zhu, *One Model to Serve All: Star
    Topology Adaptive Recommender for Multi-Domain CTR Prediction*, CIKM 2021.
  """

  features: int
  num_domains: int
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, domain_ids: jax.Array) -> jax.Array:
    m, dim = self.num_domains, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (dim, self.features))
    domain_kernel = self.param("domain_kernel", nn.initializers.ones, (m, dim, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    domain_bias = self.param("domain_bias", nn.initializers.zeros, (m, self.features))
    per_domain = jnp.einsum("bi,mio->bmo", x, kernel[None] * domain_kernel)  # [B, M, out]
    y = jnp.take_along_axis(per_domain, domain_ids[:, None, None], axis=1)[:, 0]
    return y + bias[None, :] + domain_bias[domain_ids]


@register("star")
class STAR(nn.Module):
  r"""STAR: partitioned normalization, star-topology FCN and an auxiliary network.

  .. math::
    s_m = \mathrm{FCN}_\star(\mathrm{PN}(e(x), d), d), \qquad s_a = \mathrm{Aux}(e_d \oplus e(x)),
    \qquad \hat y = \sigma(s_m + s_a),

  with :math:`e(x)` the embedding of every field except the domain field, :class:`PartitionedNorm`
  (``PN``), :class:`StarDense` layers (:math:`W_d^\star = W \otimes W_d`, :math:`b^\star_d = b + b_d`)
  in the star FCN, and a small MLP on the domain embedding :math:`e_d` concatenated with the
  features as the auxiliary network. The domain id of each sample is ``x[domain_feature]``;
  batches may mix domains freely.

  Multi-task (``num_tasks = T > 1``): ``multi_task="heads"`` (default) shares the hidden star
  layers and ends in a star output layer of width T (one star head per task); ``"towers"`` gives
  every task its own star FCN. The auxiliary network outputs T logits, one per task.

  The domain embedding :math:`e_d` is the spec's embedding of ``domain_feature`` when the spec has
  that field, otherwise STAR's own table (``domain_embed_dim`` wide).

  Representation (for strategy='rep'/'shared'): the shared input representation before the star
  FCN, ``{'star': PN(e(x)) [B, D], 'auxiliary': [e_d; e(x)] [B, D_d + D]}`` (``batch_axis=0``;
  ``'auxiliary'`` only with an auxiliary network): the embeddings and the partitioned
  normalization are the trunk; the star FCN(s) and the auxiliary network (whose hidden layers
  every task reads, in ``"heads"`` mode the star FCN's too) are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(categorical=(models.Categorical('domain', 3, 4),
    ...     models.Categorical('item', 20, 4)), dense=(models.Dense('price'),))
    >>> model = models.STAR(features=spec, num_domains=3, num_tasks=2, hidden=(8,), auxiliary=(4,))
    >>> x = {'domain': jnp.array([0, 2, 1]), 'item': jnp.array([5, 6, 7]), 'price': jnp.ones(3)}
    >>> variables = model.init(jax.random.key(0), x)
    >>> (outputs, aux), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    >>> outputs.shape, variables['batch_stats']['norm']['mean'].shape
    ((2, 3), (3, 5))

  Attributes:
    features: the :class:`FeatureSpec` (required; the input must be a feature dict).
    num_domains: ``M`` (domain ids lie in ``[0, M)``).
    domain_feature: name of the domain-id field of the input dict.
    num_tasks: ``T``.
    hidden: widths of the hidden star FCN layers.
    auxiliary: hidden widths of the auxiliary network (``None``: no auxiliary network).
    multi_task: ``"heads"`` or ``"towers"`` (see above).
    partitioned_norm: apply :class:`PartitionedNorm` to the FCN input.
    norm_scale: ``"multiplicative"`` (paper) or ``"additive"`` PN scale.
    momentum: PN moving-average decay.
    epsilon: PN epsilon.
    domain_embed_dim: width of STAR's own domain embedding (used only when the spec lacks the field).
    activation: hidden activation.
    dropout: dropout rate after hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)`` with ``aux['main_logits']`` and ``aux['auxiliary_logits']``
    (``[T, B]`` each; outputs are their sum). Train with ``mutable=['batch_stats']``.

  References:
    Sheng, Zhao, Zhang, Li, Hu, Wang, Gai, Yin, Ren, Zhao, Zhu, *One Model to Serve All: Star
    Topology Adaptive Recommender for Multi-Domain CTR Prediction*, CIKM 2021.
  """

  features: Optional[FeatureSpec] = None
  num_domains: int = 0
  domain_feature: str = "domain"
  num_tasks: int = 1
  hidden: Sequence[int] = (64, 32)
  auxiliary: Optional[Sequence[int]] = (32,)
  multi_task: str = "heads"
  partitioned_norm: bool = True
  norm_scale: str = "multiplicative"
  momentum: float = 0.99
  epsilon: float = 1e-5
  domain_embed_dim: int = 8
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout: float = 0.0

  def _star_fcn(
    self, h: jax.Array, domain_ids: jax.Array, widths: Sequence[int], prefix: str, train: bool
  ) -> jax.Array:
    for l, width in enumerate(widths):
      h = StarDense(width, self.num_domains, name=f"{prefix}_{l}")(h, domain_ids)
      if l < len(widths) - 1:
        h = self.activation(h)
        if self.dropout > 0:
          h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return h

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return ()  # every layer serves every task (the output layer's columns are per task, within one leaf)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.features is None or not isinstance(x, Mapping):
      raise ValueError("mtjax: STAR needs features=FeatureSpec(...) and a feature dict input with the domain id field.")
    if self.num_domains < 1:
      raise ValueError(f"mtjax: STAR needs num_domains >= 1, got {self.num_domains}.")
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: STAR needs num_tasks >= 1, got {self.num_tasks}.")
    if self.multi_task not in ("heads", "towers"):
      raise ValueError(f"mtjax: STAR.multi_task must be 'heads' or 'towers', got {self.multi_task!r}.")
    if self.domain_feature not in x:
      raise ValueError(
        f"mtjax: STAR: the input dict lacks the domain field {self.domain_feature!r}; it has {sorted(x)}."
      )
    names = [n for n in self.features.names if n != self.domain_feature]
    if not names:
      raise ValueError("mtjax: STAR needs at least one feature besides the domain field.")
    domain_ids = _check_domain_ids(x[self.domain_feature], self.num_domains)
    _, fields = InputLayer(self.features, name="input")(x)
    e = jnp.concatenate([fields[n] for n in names], axis=-1)
    if self.domain_feature in fields:
      domain_embedding = fields[self.domain_feature]
    else:
      domain_embedding = nn.Embed(self.num_domains, self.domain_embed_dim, name="domain_embedding")(domain_ids)

    h = e
    if self.partitioned_norm:
      h = PartitionedNorm(self.num_domains, self.momentum, self.epsilon, self.norm_scale, name="norm")(
        h, domain_ids, train=train
      )
    # The shared representation: the star FCN's input and the auxiliary network's input.
    shared = {"star": h}
    if self.auxiliary is not None:
      shared["auxiliary"] = jnp.concatenate([domain_embedding, e], axis=-1)
    shared = representation(shared, batch_axis=0)
    h = shared["star"]
    if self.multi_task == "heads":
      main = self._star_fcn(h, domain_ids, tuple(self.hidden) + (self.num_tasks,), "star", train)
    else:
      main = jnp.concatenate(
        [
          self._star_fcn(h, domain_ids, tuple(self.hidden) + (1,), f"star_task_{t}", train)
          for t in range(self.num_tasks)
        ],
        axis=-1,
      )
    main = main.T
    if self.auxiliary is not None:
      aux_logits = MLP(
        tuple(self.auxiliary) + (self.num_tasks,),
        activation=self.activation,
        dropout=self.dropout,
        activate_last=False,
        name="auxiliary",
      )(shared["auxiliary"], train=train).T
    else:
      aux_logits = jnp.zeros_like(main)
    return main + aux_logits, {"main_logits": main, "auxiliary_logits": aux_logits}
