r"""Entire-space funnel losses: ESMM, ESM^2 and AITM (with its behavioural calibrator).

Every composite probability is built in log space from logits, and so is its complement:

.. math::
  \log p_{\mathrm{CTCVR}} = \log\sigma(a) + \log\sigma(b), \qquad
  \log(1 - p_{\mathrm{CTCVR}}) = \operatorname{logaddexp}\bigl(\log\sigma(-a),\
      \log\sigma(a) + \log\sigma(-b)\bigr),

using :math:`1 - \sigma(a)\sigma(b) = (1 - \sigma(a)) + \sigma(a)(1 - \sigma(b))`. Both logs are
exact sums of finite terms, so the binary cross-entropy
:math:`-y \log p - (1 - y)\log(1 - p)` is finite (and accurate) for logits of any finite size
(e.g. :math:`\pm 50`, where ``log(sigmoid(a) * sigmoid(b))`` in float32 would give ``log(0)``).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from mtjax.losses._basic import bce_with_logits
from mtjax.losses._basic import masked_mean

_log_sigmoid = jax.nn.log_sigmoid


def _as_float(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _check_rows(name: str, what: str, x: jax.Array, rows: int, meaning: str) -> None:
  if x.ndim != 2 or x.shape[0] != rows:
    raise ValueError(f"mtjax: {name}: {what} must be [{rows}, B] ({meaning}), got shape {x.shape}.")


def _bce_from_log_probs(labels: jax.Array, log_p: jax.Array, log_1mp: jax.Array) -> jax.Array:
  """Per-sample ``-y log p - (1 - y) log(1 - p)`` from both logs (each finite, so no 0 * inf)."""
  return -(labels * log_p + (1 - labels) * log_1mp)


def _row_mask(mask: Optional[jax.Array], row: int) -> Optional[jax.Array]:
  return None if mask is None else jnp.asarray(mask)[row]


def esmm_log_probs(logits: jax.Array) -> Dict[str, jax.Array]:
  r"""Log-probabilities of ESMM's funnel from its ``[2, B]`` (CTR, CVR) logits ``(a, b)``.

  Returns a dict of ``[B]`` arrays: ``log_p_ctr`` :math:`=\log\sigma(a)`, ``log_p_cvr``
  :math:`=\log\sigma(b)`, ``log_p_ctcvr`` :math:`=\log\sigma(a) + \log\sigma(b)` and the
  complements ``log_1m_ctr``, ``log_1m_cvr``, ``log_1m_ctcvr`` (see the module docstring).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> lp = losses.esmm_log_probs(jnp.array([[0.0], [0.0]]))
    >>> float(jnp.exp(lp['log_p_ctcvr'][0])), float(jnp.exp(lp['log_1m_ctcvr'][0]))
    (0.25, 0.75)
  """
  logits = _as_float(logits)
  _check_rows("esmm_log_probs", "logits", logits, 2, "CTR logit, CVR logit")
  a, b = logits[0], logits[1]
  log_ctr, log_1m_ctr = _log_sigmoid(a), _log_sigmoid(-a)
  log_cvr, log_1m_cvr = _log_sigmoid(b), _log_sigmoid(-b)
  return {
    "log_p_ctr": log_ctr,
    "log_1m_ctr": log_1m_ctr,
    "log_p_cvr": log_cvr,
    "log_1m_cvr": log_1m_cvr,
    "log_p_ctcvr": log_ctr + log_cvr,
    "log_1m_ctcvr": jnp.logaddexp(log_1m_ctr, log_ctr + log_1m_cvr),
  }


def esm2_log_probs(head_logits: jax.Array) -> Dict[str, jax.Array]:
  r"""Log-probabilities of the ESM^2 funnel from its ``[4, B]`` head logits.

  Heads: :math:`Y_1 = p(\text{click})`, :math:`Y_2 = p(\text{DAction} \mid \text{click})`,
  :math:`Y_3 = p(\text{buy} \mid \text{DAction})`, :math:`Y_4 = p(\text{buy} \mid \text{OAction})`.

  .. math::
    p_{\mathrm{CTAVR}} = Y_1 Y_2, \quad p_{\mathrm{CVR}} = (1 - Y_2) Y_4 + Y_2 Y_3, \quad
    p_{\mathrm{CTCVR}} = Y_1\, p_{\mathrm{CVR}},

  computed as log-sum-exps of log-sigmoids, with the complements from
  :math:`1 - p_{\mathrm{CVR}} = (1 - Y_2)(1 - Y_4) + Y_2 (1 - Y_3)`.

  Returns a dict of ``[B]`` arrays ``log_p_ctr``, ``log_p_ctavr``, ``log_p_cvr``,
  ``log_p_ctcvr`` and the matching ``log_1m_*`` complements.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> lp = losses.esm2_log_probs(jnp.zeros((4, 1)))  # every head 0.5
    >>> [round(float(jnp.exp(lp[k][0])), 4) for k in ('log_p_ctavr', 'log_p_cvr', 'log_p_ctcvr')]
    [0.25, 0.5, 0.25]
  """
  head_logits = _as_float(head_logits)
  _check_rows("esm2_log_probs", "head_logits", head_logits, 4, "Y1..Y4 logits")
  y1, y2, y3, y4 = (head_logits[i] for i in range(4))
  l1, m1 = _log_sigmoid(y1), _log_sigmoid(-y1)
  l2, m2 = _log_sigmoid(y2), _log_sigmoid(-y2)
  l3, m3 = _log_sigmoid(y3), _log_sigmoid(-y3)
  l4, m4 = _log_sigmoid(y4), _log_sigmoid(-y4)
  log_cvr = jnp.logaddexp(m2 + l4, l2 + l3)
  log_1m_cvr = jnp.logaddexp(m2 + m4, l2 + m3)
  return {
    "log_p_ctr": l1,
    "log_1m_ctr": m1,
    "log_p_ctavr": l1 + l2,
    "log_1m_ctavr": jnp.logaddexp(m1, l1 + m2),
    "log_p_cvr": log_cvr,
    "log_1m_cvr": log_1m_cvr,
    "log_p_ctcvr": l1 + log_cvr,
    "log_1m_ctcvr": jnp.logaddexp(m1, l1 + log_1m_cvr),
  }


def esm2_composite_logits(head_logits: jax.Array) -> jax.Array:
  r"""``[3, B]`` logits of :math:`(p_{\mathrm{CTR}}, p_{\mathrm{CTAVR}}, p_{\mathrm{CTCVR}})`.

  Each is :math:`\log p - \log(1 - p)` from :func:`esm2_log_probs` (exact in log space), so a
  plain BCE-with-logits on them is the BCE on the composite probability. These are the outputs
  of :class:`mtjax.models.ESM2`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> losses.esm2_composite_logits(jnp.zeros((4, 1)))[:, 0]
    Array([ 0.       , -1.0986123, -1.0986123], dtype=float32)
  """
  lp = esm2_log_probs(head_logits)
  return jnp.stack([lp[f"log_p_{k}"] - lp[f"log_1m_{k}"] for k in ("ctr", "ctavr", "ctcvr")])


def esmm_loss(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  r"""ESMM's entire-space loss as a ``[2]`` vector (CTR term, CTCVR term).

  .. math::
    L_{\mathrm{CTR}} = \frac{1}{N}\sum_i \mathrm{BCE}(c_i,\ \sigma(a_i)), \qquad
    L_{\mathrm{CTCVR}} = \frac{1}{N}\sum_i \mathrm{BCE}(c_i v_i,\ \sigma(a_i)\sigma(b_i)),

  over all impressions, with click :math:`c`, conversion :math:`v`, CTR logit :math:`a` and CVR
  logit :math:`b`; the paper's loss is the sum of the two entries. There is no loss on
  :math:`p_{\mathrm{CVR}}`: the CVR tower is trained only through :math:`p_{\mathrm{CTCVR}}`.
  The product is taken in log space (see the module docstring), finite for any finite logits.
  Use with ``mtjax.losses.make_loss_fn(model, multi_task_loss=esmm_loss)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> logits = jnp.array([[0.0, 50.0], [0.0, -50.0]])   # [2, B]: (CTR, CVR) logits
    >>> labels = jnp.array([[1.0, 1.0], [1.0, 0.0]])      # [2, B]: (click, conversion)
    >>> losses.esmm_loss(logits, labels)
    Array([0.3465736, 0.6931472], dtype=float32)

  Args:
    logits: ``[2, B]`` (CTR logit, CVR logit), as returned by :class:`mtjax.models.ESMM`.
    labels: ``[2, B]`` (click, conversion); the CTCVR label is ``click * conversion``.
    mask: optional ``[2, B]`` (or ``[B]``) validity weights (e.g. padding); each term is the
      masked mean over its row.

  Returns:
    ``[2]``: (CTR loss, CTCVR loss).

  References:
    Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, *Entire Space Multi-Task Model: An Effective Approach
    for Estimating Post-Click Conversion Rate*, SIGIR 2018.
  """
  logits = _as_float(logits)
  labels = jnp.asarray(labels).astype(logits.dtype)
  _check_rows("esmm_loss", "logits", logits, 2, "CTR logit, CVR logit")
  _check_rows("esmm_loss", "labels", labels, 2, "click, conversion")
  mask = _broadcast_mask("esmm_loss", mask, labels.shape)
  click, ctcvr_label = labels[0], labels[0] * labels[1]
  lp = esmm_log_probs(logits)
  ctr = masked_mean(_bce_from_log_probs(click, lp["log_p_ctr"], lp["log_1m_ctr"]), _row_mask(mask, 0))
  ctcvr = masked_mean(_bce_from_log_probs(ctcvr_label, lp["log_p_ctcvr"], lp["log_1m_ctcvr"]), _row_mask(mask, 1))
  return jnp.stack([ctr, ctcvr])


def esm2_loss(
  outputs: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None, *, weights: Optional[Sequence[float]] = None
) -> jax.Array:
  r"""ESM^2's three entire-space losses as a weighted ``[3]`` vector.

  .. math::
    L = w_1 \mathrm{BCE}(c, p_{\mathrm{CTR}}) + w_2 \mathrm{BCE}(c\, d, p_{\mathrm{CTAVR}})
      + w_3 \mathrm{BCE}(c\, b, p_{\mathrm{CTCVR}}),

  each a mean over all impressions, with click :math:`c`, DAction :math:`d` (cart / wish) and buy
  :math:`b`. The heads :math:`Y_2, Y_3, Y_4` are never supervised directly. Entry ``k`` of the
  result is :math:`w_k` times the k-th BCE, so the sum is the paper's loss.

  ``outputs`` are the composite logits of :class:`mtjax.models.ESM2` (see
  :func:`esm2_composite_logits`, exact in log space), so the BCE is evaluated stably from logits.
  Use with ``make_loss_fn(model, multi_task_loss=esm2_loss)`` (``functools.partial`` for weights).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> outputs = losses.esm2_composite_logits(jnp.zeros((4, 2)))
    >>> labels = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # click, DAction, buy
    >>> [round(float(v), 4) for v in losses.esm2_loss(outputs, labels, weights=(1.0, 1.0, 0.5))]
    [0.6931, 0.837, 0.1438]

  Args:
    outputs: ``[3, B]`` logits of (pCTR, pCTAVR, pCTCVR).
    labels: ``[3, B]`` (click, DAction, buy); the targets are ``click``, ``click * DAction`` and
      ``click * buy``.
    mask: optional ``[3, B]`` (or ``[B]``) validity weights.
    weights: the three loss weights (default ``(1, 1, 1)``; traceable).

  Returns:
    ``[3]``: the weighted (CTR, CTAVR, CTCVR) losses.

  References:
    Wen, Zhang, Lin, Yang, Feng, Lin, Zhang, *Entire Space Multi-Task Modeling via Post-Click
    Behavior Decomposition for Conversion Rate Prediction*, SIGIR 2020.
  """
  outputs = _as_float(outputs)
  labels = jnp.asarray(labels).astype(outputs.dtype)
  _check_rows("esm2_loss", "outputs", outputs, 3, "pCTR, pCTAVR, pCTCVR logits")
  _check_rows("esm2_loss", "labels", labels, 3, "click, DAction, buy")
  mask = _broadcast_mask("esm2_loss", mask, labels.shape)
  click = labels[0]
  targets = jnp.stack([click, click * labels[1], click * labels[2]])
  per_sample = bce_with_logits(outputs, targets)
  losses = jnp.stack([masked_mean(per_sample[k], _row_mask(mask, k)) for k in range(3)])
  if weights is not None:
    w = jnp.asarray(weights, losses.dtype)
    if w.shape != (3,):
      raise ValueError(f"mtjax: esm2_loss: weights must have 3 entries (CTR, CTAVR, CTCVR), got shape {w.shape}.")
    losses = w * losses
  return losses


def aitm_calibrator(logits: jax.Array, mask: Optional[jax.Array] = None, *, alpha: float = 0.6) -> jax.Array:
  r"""AITM's behavioural expectation calibrator, one entry per task (entry 0 is 0).

  .. math::
    L_{lc}^{(t)} = \alpha \, \frac{1}{N} \sum_i \max\bigl(\hat y_t(x_i) - \hat y_{t-1}(x_i),\ 0\bigr),
    \qquad t = 2..T,

  on the predicted probabilities :math:`\hat y_t = \sigma(\text{logit}_t)`: a later step of the
  funnel should not be predicted likelier than the one before it. The paper's calibrator is the
  sum of the entries.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> losses.aitm_calibrator(jnp.array([[0.0, 0.0], [50.0, -50.0]]))
    Array([0.  , 0.15], dtype=float32)

  Args:
    logits: ``[T, B]`` task logits in funnel order.
    mask: optional ``[T, B]`` (or ``[B]``) validity weights; term ``t`` averages over samples
      valid for both tasks ``t - 1`` and ``t``.
    alpha: the calibrator weight (0.6 in the paper; traceable).

  Returns:
    ``[T]`` calibrator terms.

  References:
    Xi, Chen, Liu, Zhao, Luo, Li, *Modeling the Sequential Dependence among Audience Multi-step
    Conversions with Multi-task Learning in Targeted Display Advertising*, KDD 2021.
  """
  logits = _as_float(logits)
  if logits.ndim != 2:
    raise ValueError(f"mtjax: aitm_calibrator: logits must be [T, B], got shape {logits.shape}.")
  mask = _broadcast_mask("aitm_calibrator", mask, logits.shape)
  probs = jax.nn.sigmoid(logits)
  terms = [jnp.zeros((), logits.dtype)]
  for t in range(1, logits.shape[0]):
    pair_mask = None if mask is None else mask[t] * mask[t - 1]
    terms.append(alpha * masked_mean(jax.nn.relu(probs[t] - probs[t - 1]), pair_mask))
  return jnp.stack(terms).astype(logits.dtype)


def aitm_loss(
  logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None, *, alpha: float = 0.6
) -> jax.Array:
  r"""AITM's loss as a ``[T]`` vector: per-task BCE plus the calibrator term of that task.

  .. math::
    L_t = \frac{1}{N}\sum_i \mathrm{BCE}(y_{t,i}, \hat y_{t,i}) + L_{lc}^{(t)},

  with :math:`L_{lc}^{(t)}` from :func:`aitm_calibrator` (``0`` for the first task). The sum over
  tasks is the paper's :math:`L_{ce} + L_{lc}`; the calibrator of the pair ``(t - 1, t)`` is
  attributed to the later task ``t``. Every label is on the entire impression space.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> logits = jnp.array([[0.0, 0.0], [50.0, -50.0]])
    >>> labels = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    >>> losses.aitm_loss(logits, labels)
    Array([0.6931472, 0.15     ], dtype=float32)

  Args:
    logits: ``[T, B]`` task logits in funnel order (:class:`mtjax.models.AITM` outputs).
    labels: ``[T, B]`` binary labels.
    mask: optional ``[T, B]`` (or ``[B]``) validity weights.
    alpha: calibrator weight (0.6).

  Returns:
    ``[T]`` task losses.

  References:
    Xi, Chen, Liu, Zhao, Luo, Li, *Modeling the Sequential Dependence among Audience Multi-step
    Conversions with Multi-task Learning in Targeted Display Advertising*, KDD 2021.
  """
  logits = _as_float(logits)
  labels = jnp.asarray(labels).astype(logits.dtype)
  if logits.ndim != 2 or labels.shape != logits.shape:
    raise ValueError(f"mtjax: aitm_loss: logits and labels must both be [T, B]; got {logits.shape} and {labels.shape}.")
  mask = _broadcast_mask("aitm_loss", mask, logits.shape)
  per_sample = bce_with_logits(logits, labels)
  bce = jnp.stack([masked_mean(per_sample[t], _row_mask(mask, t)) for t in range(logits.shape[0])])
  return bce + aitm_calibrator(logits, mask, alpha=alpha)


def escm2_loss(
  logits: jax.Array,
  labels: jax.Array,
  mask: Optional[jax.Array] = None,
  *,
  aux: Optional[Mapping] = None,
  mode: str = "ips",
  counterfactual_weight: float = 0.5,
  global_weight: float = 0.5,
  min_propensity: float = 1e-6,
  max_weight: Optional[float] = None,
) -> jax.Array:
  r"""ESCM²'s loss over ESMM's outputs: ESMM plus a counterfactual CVR risk, as a ``[2]`` vector.

  .. math::
    L = L_{\mathrm{CTR}} + \lambda_c R_{\mathrm{CVR}} + \lambda_g L_{\mathrm{CTCVR}},

  with :math:`L_{\mathrm{CTR}}` and :math:`L_{\mathrm{CTCVR}}` ESMM's entire-space BCEs
  (:func:`esmm_loss`), :math:`e_i` the CVR BCE of sample ``i`` (conversion label, pCVR),
  :math:`o_i` its click and :math:`\hat o_i` = pCTR, the propensity (clipped below at
  ``min_propensity``, a constant for the gradient, its inverse optionally capped at ``max_weight``):

  .. math::
    R_{\mathrm{IPS}} = \frac{1}{N} \sum_i \frac{o_i e_i}{\hat o_i}, \qquad
    R_{\mathrm{DR}} = \frac{1}{N} \sum_i \Big(\hat e_i + \frac{o_i (e_i - \hat e_i)}{\hat o_i}\Big)
      + \frac{1}{N} \sum_i \frac{o_i (e_i - \hat e_i)^2}{\hat o_i},

  where DR's imputed errors :math:`\hat e` come from the model's imputation tower
  (``aux["imputation"]``, :class:`mtjax.models.ESCM2`) and its second sum trains them. Over every
  impression (the mask's first row: padding only). Returns ``(L_CTR, lambda_c R + lambda_g L_CTCVR)``:
  the click task and the conversion task (the CTR tower also learns from the latter through pCTCVR).
  The defaults ``lambda_c = lambda_g = 0.5`` are those of PaddleRec's ESCM² configuration.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mtjax import losses
    >>> logits = jnp.array([[0.0, 0.0], [0.0, 0.0]])     # pCTR = pCVR = 0.5
    >>> labels = jnp.array([[1.0, 0.0], [1.0, 0.0]])     # click & convert, no click
    >>> # R_IPS = (log 2 / 0.5 + 0) / 2 = log 2; L_CTCVR = (log 4 + log 4/3) / 2
    >>> losses.escm2_loss(logits, labels).round(4)
    Array([0.6931, 0.7651], dtype=float32)

  Args:
    logits: ``[2, B]`` (CTR logit, CVR logit), as :class:`mtjax.models.ESMM` / ``ESCM2`` return.
    labels: ``[2, B]`` (click, conversion).
    mask: optional ``[2, B]`` or ``[B]``; its first row marks the valid impressions.
    aux: the model's aux dict (``make_loss_fn`` passes it); DR reads ``aux["imputation"]`` ``[B]``.
    mode: ``"ips"`` or ``"dr"``.
    counterfactual_weight: :math:`\lambda_c`.
    global_weight: :math:`\lambda_g`.
    min_propensity: the propensity's lower clip.
    max_weight: an upper cap on :math:`1/\hat o_i` (``None``: none).

  Returns:
    ``[2]``: (CTR loss, counterfactual CVR risk and CTCVR loss, weighted).

  References:
    Wang, Chang, Liu, Huang, Chen, Yu, Li, Chu, *ESCM²: Entire Space Counterfactual Multi-Task Model
    for Post-Click Conversion Rate Estimation*, SIGIR 2022.
  """
  if mode not in ("ips", "dr"):
    raise ValueError(f"mtjax: escm2_loss: mode must be 'ips' or 'dr', got {mode!r}.")
  logits = _as_float(logits)
  labels = jnp.asarray(labels).astype(logits.dtype)
  _check_rows("escm2_loss", "logits", logits, 2, "CTR logit, CVR logit")
  _check_rows("escm2_loss", "labels", labels, 2, "click, conversion")
  mask = _broadcast_mask("escm2_loss", mask, labels.shape)
  valid = None if mask is None else mask[0]
  click, conversion = labels[0], labels[1]
  lp = esmm_log_probs(logits)
  ctr = masked_mean(_bce_from_log_probs(click, lp["log_p_ctr"], lp["log_1m_ctr"]), valid)
  ctcvr = masked_mean(_bce_from_log_probs(click * conversion, lp["log_p_ctcvr"], lp["log_1m_ctcvr"]), valid)
  error = _bce_from_log_probs(conversion, lp["log_p_cvr"], lp["log_1m_cvr"])  # e_i, per sample
  propensity = jax.lax.stop_gradient(jnp.maximum(jnp.exp(lp["log_p_ctr"]), min_propensity))
  inverse = 1.0 / propensity
  if max_weight is not None:
    inverse = jnp.minimum(inverse, max_weight)
  observed = click * inverse  # o_i / o_hat_i
  if mode == "ips":
    risk = masked_mean(observed * error, valid)
  else:
    if aux is None or "imputation" not in aux:
      raise ValueError(
        "mtjax: escm2_loss(mode='dr') needs the imputed errors aux['imputation'] [B] of an ESCM2 model "
        "(mtjax.models.ESCM2(counterfactual='dr')); make_loss_fn passes the model's aux."
      )
    imputed = jnp.asarray(aux["imputation"]).astype(logits.dtype)
    if imputed.shape != error.shape:
      raise ValueError(f"mtjax: escm2_loss: aux['imputation'] must be [B] = {error.shape}, got {imputed.shape}.")
    residual = error - imputed
    risk = masked_mean(imputed + observed * residual, valid) + masked_mean(observed * residual**2, valid)
  return jnp.stack([ctr, counterfactual_weight * risk + global_weight * ctcvr])


def _broadcast_mask(name: str, mask: Optional[jax.Array], shape) -> Optional[jax.Array]:
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape == tuple(shape[1:]):
    mask = jnp.broadcast_to(mask[None], tuple(shape))
  if mask.shape != tuple(shape):
    raise ValueError(
      f"mtjax: {name}: mask must be [{shape[0]}, B] or [B] matching {tuple(shape)}, got shape {mask.shape}."
    )
  return mask
