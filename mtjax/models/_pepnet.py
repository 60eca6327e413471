r"""PEPNet: parameter and embedding personalized network (EPNet + PPNet with Gate NUs)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


class GateNU(nn.Module):
  r"""Gate Neural Unit: a two-layer gate whose output lies in :math:`[0, \gamma]`.

  .. math::
    x' = \mathrm{ReLU}(x W + b), \qquad \delta = \gamma \cdot \sigma(x' W' + b'),

  with :math:`\gamma = 2`, so that a neutral gate (:math:`\sigma = 0.5`) scales by 1 and the gate
  can amplify a signal up to twice.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> gate = models.GateNU(4)
    >>> delta, _ = gate.init_with_output(jax.random.key(0), jnp.ones((3, 5)))
    >>> delta.shape, bool(jnp.all((delta >= 0) & (delta <= 2)))
    ((3, 4), True)

  Attributes:
    features: output width.
    hidden: width of the ReLU layer (``None``: ``features``).
    gamma: the scale :math:`\gamma` (2 in the paper).

  References:
    Chang, Zhang, Fu, Zang, Guan, Lu, Niu, Song, *PEPNet: Parameter and Embedding Personalized
    Network for Infusing with Personalized Prior Information*, KDD 2023.
  """

  features: int
  hidden: Optional[int] = None
  gamma: float = 2.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden or self.features, name="hidden")(x))
    return self.gamma * nn.sigmoid(nn.Dense(self.features, name="out")(h))


def _concat(fields: Mapping[str, jax.Array], names: Sequence[str]) -> jax.Array:
  return jnp.concatenate([fields[n] for n in names], axis=-1)


@register("pepnet")
class PEPNet(nn.Module):
  r"""PEPNet: EPNet personalizes the embedding per domain, PPNet every tower layer per user/item.

  General input :math:`E` (the embeddings of the general fields), domain-side features
  :math:`E(F_d)` and prior ids :math:`O_{\text{prior}}` (e.g. user, item, author ids):

  .. math::
    \delta_{\text{domain}} = U_{ep}\bigl(E(F_d) \oplus \oslash(E)\bigr), \qquad
    E' = \delta_{\text{domain}} \otimes E,

  .. math::
    \delta^{(l)}_{\text{task}} = U^{(l)}_{pp}\bigl(O_{\text{prior}} \oplus \oslash(E')\bigr)
      = [\delta^{(l)}_1, \dots, \delta^{(l)}_T], \qquad
    H^{(l+1)}_t = f\bigl((\delta^{(l)}_t \otimes H^{(l)}_t) W^{(l)}_t + b^{(l)}_t\bigr),

  with :math:`H^{(0)}_t = E'`, :math:`\oslash` the stop-gradient, :math:`U` the :class:`GateNU`
  (:math:`\gamma = 2`) and one tower per task whose every layer (the logit layer included) has
  its input scaled by its task's slice of the layer's gate.

  Input: a feature dict embedded by ``features``. ``domain_fields`` feed only EPNet's gate,
  ``prior_fields`` only PPNet's gates; the general input :math:`E` is ``general_fields``
  (``None``: every other field of the spec).

  Options (library deviations): ``gate_position="output"`` scales the activated output of every
  hidden tower layer instead of the layer input; ``stop_gradient=False`` removes the
  stop-gradient on the gates' embedding inputs; ``epnet=False`` / ``ppnet=False`` ablate a part.

  Representation (for strategy='rep'/'shared'): what the task towers read, all computed by
  networks every task shares: ``{'embedding': E' [B, D_E], 'ppnet_gates': (U^{(l)}_{pp} outputs
  [B, T * width_l], ...)}`` (``batch_axis=0``; the PPNet gates before they are split per task);
  the embeddings and both Gate NU networks are the trunk, the towers the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> spec = models.FeatureSpec(categorical=(models.Categorical('domain', 3, 4),
    ...     models.Categorical('user', 10, 4), models.Categorical('item', 20, 4)),
    ...     dense=(models.Dense('price'),))
    >>> model = models.PEPNet(features=spec, domain_fields=('domain',), prior_fields=('user',),
    ...                       num_tasks=2, tower=(8, 1))
    >>> x = {'domain': jnp.array([0, 2]), 'user': jnp.array([1, 3]), 'item': jnp.array([5, 6]),
    ...      'price': jnp.array([1.0, 2.0])}
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['epnet_gate'].shape, [g.shape for g in aux['ppnet_gates']]
    ((2, 2), (2, 5), [(2, 2, 5), (2, 2, 8)])

  Attributes:
    features: the :class:`FeatureSpec` (required; the input must be a feature dict).
    domain_fields: names of the domain-side fields (domain id, domain statistics).
    prior_fields: names of the personalized prior fields (user / item / author ids).
    num_tasks: ``T``.
    tower: widths of every task tower, ending in 1.
    general_fields: the fields of :math:`E` (``None``: all fields not in the two lists above).
    gate_hidden: hidden width of each Gate NU (``None``: its output width).
    gamma: Gate NU scale (2).
    gate_position: ``"input"`` (paper) or ``"output"``.
    stop_gradient: stop-gradient on :math:`E` / :math:`E'` in the gate inputs (paper: True).
    epnet: use EPNet.
    ppnet: use PPNet.
    activation: hidden activation of the towers.
    dropout: dropout rate after hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [T, B], aux)``; ``aux['epnet_gate']`` is :math:`\delta_{\text{domain}}` ``[B, D_E]``
    (ones without EPNet) and ``aux['ppnet_gates']`` a list with one ``[T, B, width]`` gate per
    gated layer (empty without PPNet).

  References:
    Chang, Zhang, Fu, Zang, Guan, Lu, Niu, Song, *PEPNet: Parameter and Embedding Personalized
    Network for Infusing with Personalized Prior Information*, KDD 2023.
  """

  features: Optional[FeatureSpec] = None
  domain_fields: Sequence[str] = ()
  prior_fields: Sequence[str] = ()
  num_tasks: int = 2
  tower: Sequence[int] = (64, 32, 1)
  general_fields: Optional[Sequence[str]] = None
  gate_hidden: Optional[int] = None
  gamma: float = 2.0
  gate_position: str = "input"
  stop_gradient: bool = True
  epnet: bool = True
  ppnet: bool = True
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout: float = 0.0

  def _validate(self, x) -> Tuple[str, ...]:
    if self.features is None or not isinstance(x, Mapping):
      raise ValueError(
        "mtjax: PEPNet needs features=FeatureSpec(...) and a feature dict input "
        "(it reads domain and prior fields by name)."
      )
    if self.num_tasks < 1:
      raise ValueError(f"mtjax: PEPNet needs num_tasks >= 1, got {self.num_tasks}.")
    if not self.tower or self.tower[-1] != 1:
      raise ValueError(f"mtjax: PEPNet: tower must be widths ending in 1, got {tuple(self.tower)}.")
    if self.gate_position not in ("input", "output"):
      raise ValueError(f"mtjax: PEPNet.gate_position must be 'input' or 'output', got {self.gate_position!r}.")
    names = self.features.names
    if self.epnet and not self.domain_fields:
      raise ValueError("mtjax: PEPNet's EPNet needs domain_fields (e.g. ('domain',)); or set epnet=False.")
    if self.ppnet and not self.prior_fields:
      raise ValueError("mtjax: PEPNet's PPNet needs prior_fields (e.g. ('user', 'item')); or set ppnet=False.")
    special = tuple(self.domain_fields) + tuple(self.prior_fields)
    general = tuple(n for n in names if n not in special) if self.general_fields is None else tuple(self.general_fields)
    unknown = [n for n in special + general if n not in names]
    if unknown:
      raise ValueError(f"mtjax: PEPNet: field(s) {unknown} are not in the feature spec {list(names)}.")
    if not general:
      raise ValueError("mtjax: PEPNet has no general field left for E; set general_fields.")
    return general

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return (r"^tower_\d+_dense_\d+/",)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    general = self._validate(x)
    sg = jax.lax.stop_gradient if self.stop_gradient else (lambda v: v)
    _, fields = InputLayer(self.features, name="input")(x)
    e = _concat(fields, general)
    batch, width_e = e.shape
    if self.epnet:
      domain_gate = GateNU(width_e, self.gate_hidden, self.gamma, name="epnet_gate")(
        jnp.concatenate([_concat(fields, self.domain_fields), sg(e)], axis=-1)
      )
      e = domain_gate * e
    else:
      domain_gate = jnp.ones_like(e)

    tower = tuple(self.tower)
    if self.gate_position == "input":
      gated_widths = (width_e,) + tower[:-1]  # inputs of every layer, the logit layer included
    else:
      gated_widths = tower[:-1]  # activated outputs of the hidden layers
    raw_gates = []
    if self.ppnet:
      gate_in = jnp.concatenate([_concat(fields, self.prior_fields), sg(e)], axis=-1)
      raw_gates = [
        GateNU(self.num_tasks * w, self.gate_hidden, self.gamma, name=f"ppnet_gate_{l}")(gate_in)
        for l, w in enumerate(gated_widths)
      ]
    # The shared representation: E' and the PPNet gates [B, T * w] (the towers read only these).
    marked = representation({"embedding": e, "ppnet_gates": tuple(raw_gates)}, batch_axis=0)
    e = marked["embedding"]
    gates = [
      jnp.transpose(jnp.reshape(g, (batch, self.num_tasks, w)), (1, 0, 2))
      for g, w in zip(marked["ppnet_gates"], gated_widths)
    ]

    outputs = []
    for t in range(self.num_tasks):
      # Task t reads its own view of the representation (see mtjax.task_view).
      view = task_view(marked, t)
      h = view["embedding"]
      gates_t = [jnp.reshape(g, (batch, self.num_tasks, w))[:, t] for g, w in zip(view["ppnet_gates"], gated_widths)]
      for l, width in enumerate(tower):
        if self.ppnet and self.gate_position == "input":
          h = gates_t[l] * h
        h = nn.Dense(width, name=f"tower_{t}_dense_{l}")(h)
        if l < len(tower) - 1:
          h = self.activation(h)
          if self.ppnet and self.gate_position == "output":
            h = gates_t[l] * h
          if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
      outputs.append(h[:, 0])
    return jnp.stack(outputs), {"epnet_gate": domain_gate, "ppnet_gates": gates}
