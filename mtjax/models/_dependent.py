r"""Models with explicit dependencies between targets: DBMTL (EasyRec) and NMTR's cascade (Gao et al., 2019)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


def _dependencies(num_tasks: int, deps: Optional[Sequence[Sequence[int]]], name: str) -> Tuple[Tuple[int, ...], ...]:
  """Per task, the earlier tasks it depends on (None: every earlier task, a chain)."""
  if deps is None:
    return tuple(tuple(range(t)) for t in range(num_tasks))
  deps = tuple(tuple(d) for d in deps)
  if len(deps) != num_tasks:
    raise ValueError(f"mtjax: {name}.dependencies needs one entry per task ({num_tasks}), got {len(deps)}.")
  for t, d in enumerate(deps):
    if any(not isinstance(k, int) or not 0 <= k < t for k in d) or len(set(d)) != len(d):
      raise ValueError(
        f"mtjax: {name}.dependencies[{t}] = {d}: a task may depend only on distinct earlier tasks "
        f"(indices in [0, {t})), so that the dependencies form no cycle."
      )
  return deps


@register("dbmtl")
class DBMTL(nn.Module):
  r"""Deep Bayesian Multi-Target Learning (the multi-target model of Alibaba's EasyRec).

  A shared bottom, one tower per task, and a *relation* layer per task that reads its tower's
  output together with the relation outputs of the tasks it depends on, so a later target is
  predicted given the earlier ones' representations (click -> conversion -> purchase):

  .. math::
    h = f(x), \qquad a_t = \mathrm{tower}_t(h), \qquad
    r_t = \mathrm{relation}_t\big([a_t;\, r_d\ (d \in D_t)]\big), \qquad y_t = w_t^\top r_t + b_t,

  with :math:`D_t` the dependencies of task ``t`` (``None``: every earlier task). Options:
  ``stop_gradient`` keeps a task's loss from training the tasks it reads. A task that no other task
  reads owns its tower and relation layer (task-specific); the others are shared.

  Representation (for strategy='rep'/'shared'): the bottom's output ``[B, H]`` (``batch_axis=0``).
  The heads read each other's layers, so ``task_grads`` takes ``T`` per-task VJPs above it (exact).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.DBMTL(num_tasks=3, bottom=(16,), tower=(8,), relation=(4,))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['relations'][2].shape
    ((3, 5), (5, 4))

  Attributes:
    num_tasks: ``T``.
    bottom: widths of the shared bottom MLP (``()``: the embedded input itself).
    tower: widths of every task tower.
    relation: widths of every relation MLP.
    dependencies: per task, the earlier tasks it reads (``None``: a chain over all earlier tasks).
    stop_gradient: read the dependencies' relations without backpropagating into them.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    dropout: dropout rate after hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)`` with ``aux['relations']`` the ``T`` relation outputs ``[B, R]``.

  References:
    Alibaba PAI, EasyRec: *DBMTL* (Deep Bayesian Multi-Target Learning), the multi-target ranking
    model with explicit target dependencies, https://easyrec.readthedocs.io (models/dbmtl).
  """

  num_tasks: int
  bottom: Sequence[int] = (128, 64)
  tower: Sequence[int] = (32,)
  relation: Sequence[int] = (16,)
  dependencies: Optional[Sequence[Sequence[int]]] = None
  stop_gradient: bool = False
  features: Optional[FeatureSpec] = None
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: every
    output layer, and the tower and relation layer of each task no other task reads."""
    deps = _dependencies(self.num_tasks, self.dependencies, "DBMTL")
    read = {d for ds in deps for d in ds} if not self.stop_gradient else set()
    alone = [t for t in range(self.num_tasks) if t not in read]
    patterns = [r"^output_\d+/"]
    patterns += [rf"^(tower|relation)_{t}/" for t in alone]
    return tuple(patterns)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.num_tasks < 1 or not self.tower or not self.relation:
      raise ValueError(
        f"mtjax: DBMTL needs num_tasks >= 1 and non-empty tower and relation widths, got {self.num_tasks}, "
        f"{tuple(self.tower)}, {tuple(self.relation)}."
      )
    deps = _dependencies(self.num_tasks, self.dependencies, "DBMTL")
    h, _ = InputLayer(self.features, name="input")(x)
    if self.bottom:
      h = MLP(tuple(self.bottom), dropout=self.dropout, name="bottom")(h, train=train)
    h = representation(h, batch_axis=0)
    sg = jax.lax.stop_gradient if self.stop_gradient else (lambda v: v)
    relations, outputs = [], []
    for t in range(self.num_tasks):
      a = MLP(tuple(self.tower), dropout=self.dropout, name=f"tower_{t}")(h, train=train)
      r = MLP(tuple(self.relation), dropout=self.dropout, name=f"relation_{t}")(
        jnp.concatenate([a] + [sg(relations[d]) for d in deps[t]], axis=-1), train=train
      )
      relations.append(r)
      outputs.append(nn.Dense(1, name=f"output_{t}")(r)[:, 0])
    return jnp.stack(outputs), {"relations": relations}


@register("nmtr")
class NMTR(nn.Module):
  r"""Neural Multi-Task Recommendation's cascade of behaviours (Gao et al., ICDE 2019).

  Behaviours in funnel order (view -> click -> cart -> buy) share the user and item embeddings; each
  has its own interaction function :math:`g_k`, and behaviour ``t``'s logit builds on every earlier
  one's:

  .. math::
    y_t = \sum_{k \le t} g_k(u, i), \qquad
    g_k = \begin{cases} w_k^\top (p_u \odot q_i) + b_k & \text{GMF} \\ \mathrm{MLP}_k([p_u; q_i]) & \text{MLP}
    \end{cases}

  so a later behaviour's score depends on the earlier ones' and not the reverse. ``user_fields`` and
  ``item_fields`` name the spec's fields that make :math:`p_u` and :math:`q_i` (concatenated
  embeddings; GMF needs equal widths). Train with per-task BCE (pointwise) or
  :func:`mtjax.losses.multi_behavior_bpr` (pairwise).

  Representation (for strategy='rep'/'shared'): the user and item embeddings
  ``{"user": [B, d], "item": [B, d]}`` (``batch_axis=0``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(categorical=(models.Categorical('user', 10, 4), models.Categorical('item', 20, 4)))
    >>> model = models.NMTR(num_tasks=3, features=spec, user_fields=('user',), item_fields=('item',))
    >>> x = {'user': jnp.array([1, 2]), 'item': jnp.array([3, 4])}
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['interactions'].shape
    ((3, 2), (3, 2))

  Attributes:
    num_tasks: ``T`` behaviours, weak to strong.
    features: the :class:`FeatureSpec` (required: the user and item fields are read by name).
    user_fields, item_fields: the fields of :math:`p_u` and :math:`q_i`.
    interaction: ``"gmf"`` or ``"mlp"``.
    mlp: widths of the MLP interaction (ending in 1).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)`` with ``aux['interactions']`` ``[T, B]`` the :math:`g_k` (the logits'
    increments).

  References:
    Gao, He, Gong, Feng, Chua, Jin, Li, *Neural Multi-Task Recommendation from Multi-Behavior Data*,
    ICDE 2019 (and TKDE 2020).
  """

  num_tasks: int
  features: Optional[FeatureSpec] = None
  user_fields: Sequence[str] = ("user",)
  item_fields: Sequence[str] = ("item",)
  interaction: str = "gmf"
  mlp: Sequence[int] = (32, 1)

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the
    last behaviour's interaction (every other one feeds the later behaviours' logits)."""
    return (rf"^interaction_{self.num_tasks - 1}/",)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    del train
    if self.features is None or not isinstance(x, Mapping):
      raise ValueError("mtjax: NMTR needs features=FeatureSpec(...) and a feature dict (user and item fields).")
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: NMTR needs num_tasks >= 1, got {self.num_tasks}.")
    if self.interaction not in ("gmf", "mlp"):
      raise ValueError(f"mtjax: NMTR.interaction must be 'gmf' or 'mlp', got {self.interaction!r}.")
    names = self.features.names
    unknown = [n for n in tuple(self.user_fields) + tuple(self.item_fields) if n not in names]
    if unknown or not self.user_fields or not self.item_fields:
      raise ValueError(
        f"mtjax: NMTR: user_fields {tuple(self.user_fields)} and item_fields {tuple(self.item_fields)} must be "
        f"non-empty fields of the spec {list(names)}."
      )
    _, fields = InputLayer(self.features, name="input")(x)
    p = jnp.concatenate([fields[n] for n in self.user_fields], axis=-1)
    q = jnp.concatenate([fields[n] for n in self.item_fields], axis=-1)
    if self.interaction == "gmf" and p.shape[-1] != q.shape[-1]:
      raise ValueError(f"mtjax: NMTR's GMF needs equal user and item widths, got {p.shape[-1]} and {q.shape[-1]}.")
    if self.interaction == "mlp" and (not self.mlp or self.mlp[-1] != 1):
      raise ValueError(f"mtjax: NMTR.mlp must be widths ending in 1, got {tuple(self.mlp)}.")
    rep = representation({"user": p, "item": q}, batch_axis=0)
    p, q = rep["user"], rep["item"]
    g = []
    for k in range(self.num_tasks):
      if self.interaction == "gmf":
        g.append(nn.Dense(1, name=f"interaction_{k}")(p * q)[:, 0])
      else:
        g.append(MLP(tuple(self.mlp), activate_last=False, name=f"interaction_{k}")(jnp.concatenate([p, q], -1))[:, 0])
    g = jnp.stack(g)
    return jnp.cumsum(g, axis=0), {"interactions": g}
