r"""Groups of expert MLPs and softmax gates: the building blocks of the MoE family.

An :class:`Experts` group runs ``E`` independently initialised MLPs on one input and returns
their outputs stacked on a leading expert axis ``[E, B, H]``. Two implementations give the same
function (and the same initial distribution, not the same parameter tree):

* ``impl="vmap"``: one ``nn.vmap`` over the parameters (``variable_axes={'params': 0}``,
  ``split_rngs={'params': True, 'dropout': True}``); params are ``experts/Dense_i/kernel
  [E, D_in, D_out]`` and every layer is a single batched matmul.
* ``impl="list"``: a Python list of ``E`` MLPs (``expert_0/Dense_i/kernel [D_in, D_out]``, ...).

Default ``"list"``, from ``benchmarks/experts_vmap.py`` (jitted forward + backward of an MMoE with
input 128, 8 experts ``[256, 128]``, towers ``[64, 1]``, batch 1024, 3 tasks, median of 30 steps
after compilation; run once, on a 2-core CPU shared with other jobs, so the figures are rough):
vmap 165.3 ms, list 119.6 ms, list / vmap = 0.72, i.e. the vectorized experts were about 1.4x
slower on CPU. Not measured on GPU/TPU, where ``impl="vmap"`` (one batched matmul per layer
instead of ``E``) may win; re-run the benchmark there before switching.

A :class:`Gate` is :math:`g(x) = \mathrm{softmax}(W x)` (Ma et al., 2018), optionally after a
hidden MLP and with a bias, and optionally with gate dropout (Zhao et al., 2019).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import linear_einsum
from mtjax.models._layers import MLP
from mtjax.models._layers import Activation

EXPERT_IMPLS = ("vmap", "list")
DEFAULT_EXPERT_IMPL = "list"  # measured, see the module docstring
GATE_DROPOUT_MODES = ("batch", "sample")


class _StaticTrainMLP(MLP):
  """An :class:`MLP` whose ``train`` flag is an attribute (``nn.vmap`` drops keyword args)."""

  train: bool = False

  def __call__(self, x):  # pytype: disable=signature-mismatch
    return MLP.__call__(self, x, train=self.train)


class Experts(nn.Module):
  r"""``num_experts`` independently initialised expert MLPs applied to the same input.

  .. math::
    \mathrm{out}_e = f_e(x), \quad e = 1..E, \qquad \text{returned as } [E, B, H].

  Every layer (the last one included) is followed by the activation, as in the MoE papers'
  ReLU experts; dropout (rate ``dropout``) follows every activation when ``train=True`` and
  needs a ``'dropout'`` RNG; each expert draws its own mask.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> experts = models.Experts(num_experts=4, features=(8, 6), impl="vmap")
    >>> x = jnp.ones((2, 5))
    >>> params = experts.init(jax.random.key(0), x)
    >>> experts.apply(params, x).shape
    (4, 2, 6)
    >>> params['params']['experts']['Dense_0']['kernel'].shape
    (4, 5, 8)
    >>> listed = models.Experts(num_experts=4, features=(8, 6), impl="list")
    >>> listed.init(jax.random.key(0), x)['params']['expert_3']['Dense_0']['kernel'].shape
    (5, 8)

  Attributes:
    num_experts: ``E``.
    features: the widths of each expert MLP; the last one is ``H``.
    activation: hidden activation (ReLU).
    dropout: dropout rate after each activation.
    impl: ``"list"`` (a Python list of MLPs, default: measured faster on CPU) or ``"vmap"``
      (one vectorized MLP).
    kernel_init: kernel initializer (each expert gets its own draw).

  References:
    Jacobs, Jordan, Nowlan, Hinton, *Adaptive Mixtures of Local Experts*, Neural Computation, 1991.
    Ma, Zhao, Yi, Chen, Hong, Chi, *Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts*, KDD 2018.
  """

  num_experts: int
  features: Sequence[int]
  activation: Activation = nn.relu
  dropout: float = 0.0
  impl: str = DEFAULT_EXPERT_IMPL
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.impl not in EXPERT_IMPLS:
      raise ValueError(f"mtjax: Experts.impl must be one of {EXPERT_IMPLS}, got {self.impl!r}.")
    if self.num_experts < 1:
      raise ValueError(f"mtjax: Experts needs num_experts >= 1, got {self.num_experts}.")
    if not self.features:
      raise ValueError("mtjax: Experts.features must name at least one layer width.")
    kwargs: dict[str, Any] = dict(
      features=tuple(self.features),
      activation=self.activation,
      dropout=self.dropout,
      activate_last=True,
      kernel_init=self.kernel_init,
    )
    if self.impl == "vmap":
      stacked = nn.vmap(
        _StaticTrainMLP,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=None,
        out_axes=0,
        axis_size=self.num_experts,
      )
      return stacked(train=train, name="experts", **kwargs)(x)
    outs = [MLP(name=f"expert_{e}", **kwargs)(x, train=train) for e in range(self.num_experts)]
    return jnp.stack(outs, axis=0)


def gate_dropout(weights: jax.Array, rate: float, mode: str, rng: jax.Array) -> jax.Array:
  r"""Drops gate values with probability ``rate`` and renormalizes (Zhao et al., 2019).

  .. math::
    \tilde g_e = \frac{m_e g_e}{\sum_{e'} m_{e'} g_{e'}}, \qquad m_e \sim \mathrm{Bernoulli}(1 - p).

  One mask ``m`` per batch (``mode="batch"``: the same experts are dropped for every sample) or
  one per sample (``"sample"``). A row whose experts are all dropped keeps its undropped gate
  (otherwise it would be 0/0).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> g = jnp.full((3, 4), 0.25)
    >>> out = models.gate_dropout(g, 0.5, "batch", jax.random.key(0))
    >>> bool(jnp.allclose(out.sum(-1), 1.0))
    True

  Args:
    weights: ``[B, E]`` gate weights (rows sum to one).
    rate: drop probability ``p`` (static).
    mode: ``"batch"`` or ``"sample"``.
    rng: a PRNG key.

  Returns:
    ``[B, E]`` renormalized weights.

  References:
    Zhao, Hong, Wei, Chen, Nath, Andrews, Kumthekar, Sathiamoorthy, Yi, Chi, *Recommending What
    Video to Watch Next: A Multitask Ranking System*, RecSys 2019.
  """
  if mode not in GATE_DROPOUT_MODES:
    raise ValueError(f"mtjax: gate_dropout_mode must be one of {GATE_DROPOUT_MODES}, got {mode!r}.")
  shape = weights.shape if mode == "sample" else (1,) * (weights.ndim - 1) + weights.shape[-1:]
  keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
  kept = jnp.where(keep, weights, jnp.zeros_like(weights))
  total = jnp.sum(kept, axis=-1, keepdims=True)
  ok = total > 0
  return jnp.where(ok, kept / jnp.where(ok, total, jnp.ones_like(total)), weights)


class Gate(nn.Module):
  r"""A softmax gate over ``num_experts`` experts.

  .. math::
    g(x) = \mathrm{softmax}(W x) \in \Delta^{E-1}

  (Ma et al., 2018: a linear map of the input, no bias). Options: ``hidden`` puts a ReLU MLP
  before the linear map, ``use_bias`` adds a bias, ``dropout > 0`` applies :func:`gate_dropout`
  when ``train=True`` (drawing from the ``'dropout'`` RNG; eval is deterministic).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> gate = models.Gate(num_experts=3)
    >>> x = jnp.ones((2, 5))
    >>> w = gate.apply(gate.init(jax.random.key(0), x), x)
    >>> w.shape, bool(jnp.allclose(w.sum(-1), 1.0))
    ((2, 3), True)

  Attributes:
    num_experts: ``E``.
    hidden: widths of an optional ReLU MLP before the gate's linear map (``()`` = linear gate).
    use_bias: bias in the linear map (the paper has none).
    dropout: gate-dropout probability ``p`` (Zhao et al. used 0.1); 0 disables it.
    dropout_mode: ``"batch"`` (one mask per batch) or ``"sample"`` (one per sample).

  References:
    Ma et al., *Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts*, KDD 2018.
    Zhao et al., *Recommending What Video to Watch Next: A Multitask Ranking System*, RecSys 2019.
  """

  num_experts: int
  hidden: Sequence[int] = ()
  use_bias: bool = False
  dropout: float = 0.0
  dropout_mode: str = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.dropout_mode not in GATE_DROPOUT_MODES:
      raise ValueError(f"mtjax: gate_dropout_mode must be one of {GATE_DROPOUT_MODES}, got {self.dropout_mode!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"mtjax: gate dropout must be in [0, 1), got {self.dropout}.")
    h = MLP(tuple(self.hidden), name="hidden")(x) if self.hidden else x
    weights = nn.softmax(nn.Dense(self.num_experts, use_bias=self.use_bias, name="logits")(h), axis=-1)
    if train and self.dropout > 0:
      weights = gate_dropout(weights, self.dropout, self.dropout_mode, self.make_rng("dropout"))
    return weights


def mix(weights: jax.Array, expert_outputs: jax.Array) -> jax.Array:
  """``sum_e weights[:, e] * expert_outputs[e]``: ``[B, E] x [E, B, H] -> [B, H]``."""
  # Linear in the view: under task_grads' "rep" batch sums the cotangent of delta_t is one [E, B] x [B, H]
  # product, under "shared" each task's rows stay the factors (weights, d mix) (sparse.linear_einsum).
  return linear_einsum("be,ebh->bh", weights, expert_outputs)


def towers(
  tower: Sequence[int], num_tasks: int, inputs: Sequence[jax.Array], *, dropout: float, train: bool
) -> jax.Array:
  """Applies ``num_tasks`` towers (``tower_k``, ending in one unit) and stacks logits ``[T, B]``.

  Must be called inside a compact method (the towers attach to the calling module).
  """
  if not tower or tower[-1] != 1:
    raise ValueError(f"mtjax: tower widths must end in 1 (one logit per task), got {tuple(tower)}.")
  outs = [
    MLP(tuple(tower), dropout=dropout, activate_last=False, name=f"tower_{k}")(inputs[k], train=train)
    for k in range(num_tasks)
  ]
  return jnp.stack([o[:, 0] for o in outs], axis=0)
