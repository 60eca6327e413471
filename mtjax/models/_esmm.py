r"""ESMM and ESM^2: entire-space funnel models for post-click conversion rate estimation."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax._src.sparse import representation
from mtjax.losses._funnel import esm2_log_probs
from mtjax.losses._funnel import esmm_log_probs
from mtjax.models._features import FeatureSpec
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._registry import register


def _check_tower(name: str, tower: Sequence[int]) -> None:
  if not tower or tower[-1] != 1:
    raise ValueError(f"mtjax: {name}: tower must be a sequence of widths ending in 1 (a logit), got {tuple(tower)}.")


def _shared_input(module: nn.Module, x, bottom: Sequence[int], dropout: float, train: bool) -> jax.Array:
  """The part every tower reads (embedding, then the optional bottom MLP), marked as the representation."""
  h, _ = InputLayer(module.features, name="input")(x)
  if bottom:
    h = MLP(tuple(bottom), dropout=dropout, name="bottom")(h, train=train)
  return representation(h, batch_axis=0)


def _tower(name: str, tower: Sequence[int], dropout: float, h: jax.Array, train: bool) -> jax.Array:
  return MLP(tuple(tower), dropout=dropout, activate_last=False, name=name)(h, train=train)[:, 0]


def _esmm_forward(module: nn.Module, name: str, x, train: bool) -> Tuple[jax.Array, Dict[str, Any], jax.Array]:
  """ESMM's forward (CTR and CVR towers on the shared input): ``(outputs [2, B], aux, shared input)``."""
  _check_tower(name, module.tower)
  h = _shared_input(module, x, module.bottom, module.dropout, train)
  ctr = _tower("tower_ctr", module.tower, module.dropout, h, train)
  cvr = _tower("tower_cvr", module.tower, module.dropout, h, train)
  outputs = jnp.stack([ctr, cvr])
  lp = esmm_log_probs(outputs)
  aux = {k: lp[k] for k in ("log_p_ctr", "log_p_cvr", "log_p_ctcvr")}
  # The probabilities of the two supervised events (click, click & conversion): what evaluation scores.
  aux["task_log_probs"] = jnp.stack([lp["log_p_ctr"], lp["log_p_ctcvr"]])
  return outputs, aux, h


@register("esmm")
class ESMM(nn.Module):
  r"""Entire Space Multi-task Model: CTR and CVR towers on a shared embedding.

  .. math::
    p_{\mathrm{CTR}} = \sigma(a), \quad p_{\mathrm{CVR}} = \sigma(b), \quad
    p_{\mathrm{CTCVR}} = p_{\mathrm{CTR}}\, p_{\mathrm{CVR}},
    \qquad a = t_{\mathrm{ctr}}(e(x)),\ b = t_{\mathrm{cvr}}(e(x)),

  where the embedding :math:`e` is shared by both towers. Train it with
  :func:`mtjax.losses.esmm_loss` (CTR and CTCVR losses over all impressions, none on pCVR), which
  computes :math:`\log p_{\mathrm{CTCVR}} = \log\sigma(a) + \log\sigma(b)` in log space.

  Option beyond the paper: ``bottom`` adds a shared MLP between the embedding and the towers
  (some libraries share one; the paper shares only the embedding lookup).

  Representation (for strategy='rep'/'shared'): the input both towers share, ``[B, D]``
  (``batch_axis=0``): the embedding output, or the ``bottom`` MLP's output when there is one; the
  CTR and CVR towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.ESMM(tower=(8, 1))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['log_p_ctcvr'].shape
    ((2, 5), (5,))
    >>> bool(jnp.allclose(aux['log_p_ctcvr'], aux['log_p_ctr'] + aux['log_p_cvr']))
    True

  Attributes:
    tower: widths of the CTR and CVR towers, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    bottom: widths of an optional shared MLP (``()``: the paper, embedding shared only).
    dropout: dropout rate after hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [2, B], aux)``: outputs are (CTR logit, CVR logit); ``aux`` holds ``[B]``
    ``log_p_ctr``, ``log_p_cvr`` and ``log_p_ctcvr``, and ``task_log_probs [2, B]`` (pCTR, pCTCVR:
    the supervised events, which ``mtjax.training.evaluate`` scores).

  References:
    Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, *Entire Space Multi-Task Model: An Effective Approach
    for Estimating Post-Click Conversion Rate*, SIGIR 2018.
  """

  tower: Sequence[int] = (64, 32, 1)
  features: Optional[FeatureSpec] = None
  bottom: Sequence[int] = ()
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return (r"^tower_cvr/",)  # the CTR tower also trains through pCTCVR = pCTR * pCVR

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    outputs, aux, _ = _esmm_forward(self, "ESMM", x, train)
    return outputs, aux


@register("escm2")
class ESCM2(nn.Module):
  r"""ESCM²: ESMM trained with a counterfactual CVR risk (Wang et al., SIGIR 2022).

  The model of :class:`ESMM` (CTR and CVR towers on a shared embedding, pCTCVR = pCTR pCVR) plus,
  for the doubly robust variant (``counterfactual="dr"``), an imputation tower that predicts each
  impression's CVR error :math:`\hat e_i \ge 0` (a softplus output, ``aux["imputation"]``). Train
  it with :func:`mtjax.losses.escm2_loss` (``mode=counterfactual``), which adds the IPS or DR risk of
  the CVR tower over every impression to ESMM's loss; ``loss()`` returns it with this model's
  settings (what ``mtjax run`` uses for ``[model] name = "escm2"``).

  Representation (for strategy='rep'/'shared'): the shared input ``[B, D]`` (``batch_axis=0``), as
  in :class:`ESMM`; the towers are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import losses, models
    >>> model = models.ESCM2(tower=(8, 1), counterfactual="dr")
    >>> x = jnp.ones((5, 6))
    >>> variables = model.init(jax.random.key(0), x)
    >>> outputs, aux = model.apply(variables, x)
    >>> outputs.shape, aux['imputation'].shape
    ((2, 5), (5,))
    >>> loss_fn = losses.make_loss_fn(model, multi_task_loss=model.loss(), has_aux=False)
    >>> loss_fn(variables['params'], {'x': x, 'labels': jnp.ones((2, 5))}).shape
    (2,)

  Attributes:
    tower: widths of the CTR, CVR (and imputation) towers, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    bottom: widths of an optional shared MLP.
    dropout: dropout rate after hidden activations (train only).
    counterfactual: ``"ips"`` or ``"dr"``.
    counterfactual_weight: :math:`\lambda_c` of the loss.
    global_weight: :math:`\lambda_g` of the loss.

  References:
    Wang, Chang, Liu, Huang, Chen, Yu, Li, Chu, *ESCM²: Entire Space Counterfactual Multi-Task Model
    for Post-Click Conversion Rate Estimation*, SIGIR 2022.
  """

  tower: Sequence[int] = (64, 32, 1)
  features: Optional[FeatureSpec] = None
  bottom: Sequence[int] = ()
  dropout: float = 0.0
  counterfactual: str = "ips"
  counterfactual_weight: float = 0.5
  global_weight: float = 0.5

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains: the CVR
    and imputation towers (the conversion task's)."""
    return (r"^tower_cvr/", r"^tower_imputation/")

  def loss(self):
    """:func:`mtjax.losses.escm2_loss` with this model's ``counterfactual`` and weights, a ``multi_task_loss``."""
    import functools  # pylint: disable=import-outside-toplevel

    from mtjax.losses._funnel import escm2_loss  # pylint: disable=import-outside-toplevel

    return functools.partial(
      escm2_loss,
      mode=self.counterfactual,
      counterfactual_weight=self.counterfactual_weight,
      global_weight=self.global_weight,
    )

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    if self.counterfactual not in ("ips", "dr"):
      raise ValueError(f"mtjax: ESCM2.counterfactual must be 'ips' or 'dr', got {self.counterfactual!r}.")
    outputs, aux, h = _esmm_forward(self, "ESCM2", x, train)
    if self.counterfactual == "dr":
      aux["imputation"] = jax.nn.softplus(_tower("tower_imputation", self.tower, self.dropout, h, train))
    return outputs, aux


@register("esm2")
class ESM2(nn.Module):
  r"""ESM^2: entire-space multi-task model with post-click behaviour decomposition.

  Impression -> click -> {DAction (cart / wish), OAction (other)} -> buy, with four heads on a
  shared embedding:
  :math:`Y_1 = p(\text{click})`, :math:`Y_2 = p(\text{DAction} \mid \text{click})`,
  :math:`Y_3 = p(\text{buy} \mid \text{DAction})`, :math:`Y_4 = p(\text{buy} \mid \text{OAction})`,

  .. math::
    p_{\mathrm{CTAVR}} = Y_1 Y_2, \qquad p_{\mathrm{CVR}} = (1 - Y_2) Y_4 + Y_2 Y_3, \qquad
    p_{\mathrm{CTCVR}} = Y_1\, p_{\mathrm{CVR}}.

  The outputs are the ``[3, B]`` logits of the three supervised entire-space probabilities
  (pCTR, pCTAVR, pCTCVR), computed exactly in log space (log-sum-exp of log-sigmoids, see
  :func:`mtjax.losses.esm2_composite_logits`); train them with :func:`mtjax.losses.esm2_loss`
  (three BCEs on click, click & DAction, click & buy). :math:`Y_2, Y_3, Y_4` are never supervised
  directly; the head logits are in ``aux['head_logits']``.

  Representation (for strategy='rep'/'shared'): the input the four towers share, ``[B, D]``
  (``batch_axis=0``): the embedding output, or the ``bottom`` MLP's output when there is one; the
  towers (and the log-space composition of their outputs) are the task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtjax import models
    >>> model = models.ESM2(tower=(8, 1))
    >>> x = jnp.ones((5, 6))
    >>> outputs, aux = model.apply(model.init(jax.random.key(0), x), x)
    >>> outputs.shape, aux['head_logits'].shape, aux['log_p_cvr'].shape
    ((3, 5), (4, 5), (5,))

  Attributes:
    tower: widths of each of the four head towers, ending in 1.
    features: a :class:`FeatureSpec` to embed a feature dict (``None``: dense ``[B, D]`` input).
    bottom: widths of an optional shared MLP (``()``: embedding shared only, as in the paper).
    dropout: dropout rate after hidden activations (train only).

  Returns (of ``__call__``):
    ``(outputs [3, B], aux)``: outputs are the (pCTR, pCTAVR, pCTCVR) logits; ``aux`` holds
    ``head_logits [4, B]`` (Y1..Y4) and the ``[B]`` log-probabilities ``log_p_ctr``,
    ``log_p_ctavr``, ``log_p_cvr``, ``log_p_ctcvr``.

  References:
    Wen, Zhang, Lin, Yang, Feng, Lin, Zhang, *Entire Space Multi-Task Modeling via Post-Click
    Behavior Decomposition for Conversion Rate Prediction*, SIGIR 2020.
  """

  tower: Sequence[int] = (64, 32, 1)
  features: Optional[FeatureSpec] = None
  bottom: Sequence[int] = ()
  dropout: float = 0.0

  def task_specific(self) -> Tuple[str, ...]:
    """Regular expressions (``re.search``) of the parameter paths that one task alone trains.

    Every other parameter is shared: :func:`mtjax.models.partition` turns this into the ``shared=``
    mask that ``fit``, ``run`` and ``compare`` pass to the gradient method.
    """
    return (r"^tower_buy_(d|o)action/",)  # the daction tower feeds both purchase paths

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
    _check_tower("ESM2", self.tower)
    h = _shared_input(self, x, self.bottom, self.dropout, train)
    names = ("tower_click", "tower_daction", "tower_buy_daction", "tower_buy_oaction")
    heads = jnp.stack([_tower(n, self.tower, self.dropout, h, train) for n in names])
    lp = esm2_log_probs(heads)
    outputs = jnp.stack([lp[f"log_p_{k}"] - lp[f"log_1m_{k}"] for k in ("ctr", "ctavr", "ctcvr")])
    aux = {"head_logits": heads}
    aux.update({k: lp[k] for k in ("log_p_ctr", "log_p_ctavr", "log_p_cvr", "log_p_ctcvr")})
    return outputs, aux
