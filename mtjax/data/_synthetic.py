"""Synthetic multi-task data with known structure: controlled task correlation, a click ->
conversion funnel with sample-selection bias, clicks biased by the display position, and conflicting
binary tasks."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

from mtjax.data._dataset import MultiTaskDataset
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import FeatureSpec


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def _sines(z: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
  """``sum_i sin(alpha_i z + beta_i)`` elementwise over ``z``."""
  out = np.zeros_like(z)
  for a, b in zip(alpha, beta):
    out += np.sin(a * z + b)
  return out


def mmoe_synthetic(
  num_samples: int,
  correlation: float,
  *,
  dim: int = 100,
  scale: float = 1.0,
  num_sines: int = 10,
  noise: float = 0.01,
  seed: int = 0,
) -> MultiTaskDataset:
  r"""Two regression tasks whose correlation is controlled (the MMoE paper's synthetic data).

  .. math::
    w_1 = c\, u_1, \qquad w_2 = c\,(p\, u_1 + \sqrt{1 - p^2}\, u_2), \qquad x \sim \mathcal N(0, I_d),

    y_k = w_k^\top x + \sum_{i=1}^{m} \sin(\alpha_i w_k^\top x + \beta_i) + \epsilon_k,
    \qquad \epsilon_k \sim \mathcal N(0, \sigma^2),

  with orthonormal :math:`u_1, u_2 \in \mathbb R^d` (QR of a Gaussian matrix) and
  :math:`\alpha_i, \beta_i \sim \mathcal N(0, 1)` shared by both tasks. ``p`` is the cosine of
  :math:`w_1, w_2`; the Pearson correlation of :math:`y_1, y_2` falls as ``p`` falls. The paper
  leaves ``c, m, alpha, beta`` and the size open; the defaults here are
  ``d = 100, c = 1, m = 10, sigma = 0.01``. It writes the noise as :math:`\mathcal N(0, 0.01)`,
  which in the usual notation is a variance (``noise=0.1``); the default takes 0.01 as the standard
  deviation. Either is small next to the label variance, which is not normalized: its mean
  :math:`\sum_i \sin(\beta_i) e^{-\alpha_i^2 c^2 / 2}` and its variance (about 1 to 6 with the
  defaults) vary from seed to seed. All draws come from ``np.random.default_rng(seed)`` in this
  order: ``u`` (``[d, 2]`` Gaussian), ``alpha``, ``beta``, ``x``, the noise, so one seed gives the
  same ``u, alpha, beta, x`` and noise, hence the same task-1 labels, at every ``p``.

  Features are one dense float32 array ``[N, d]`` (``spec`` is None), labels ``[2, N]``
  (``task_types = ('regression', 'regression')``); ``metadata`` holds ``w [2, d]``, ``alpha``,
  ``beta`` and the constants.

  Examples:
    >>> from mtjax import data
    >>> ds = data.mmoe_synthetic(1000, 0.5, seed=0)
    >>> ds.features.shape, ds.labels.shape, ds.task_types
    ((1000, 100), (2, 1000), ('regression', 'regression'))

  Args:
    num_samples: ``N``.
    correlation: ``p`` in ``[-1, 1]``, the cosine between the two task weight vectors.
    dim: input dimension ``d`` (>= 2).
    scale: ``c``.
    num_sines: ``m``.
    noise: noise standard deviation ``sigma``.
    seed: seed of ``np.random.default_rng``.

  Returns:
    A :class:`MultiTaskDataset` with tasks ``('task_1', 'task_2')``.

  References:
    Ma, Zhao, Yi, Chen, Hong, Chi, *Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts*, KDD 2018.
  """
  p = float(correlation)
  if not -1.0 <= p <= 1.0:
    raise ValueError(f"mtjax: mmoe_synthetic correlation must be in [-1, 1], got {correlation}.")
  if dim < 2 or num_samples < 1 or num_sines < 0 or noise < 0:
    raise ValueError(
      f"mtjax: mmoe_synthetic needs dim >= 2, num_samples >= 1, num_sines >= 0, noise >= 0; "
      f"got dim={dim}, num_samples={num_samples}, num_sines={num_sines}, noise={noise}."
    )
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
  u1, u2 = q[:, 0], q[:, 1]
  w = scale * np.stack([u1, p * u1 + np.sqrt(1.0 - p * p) * u2])  # [2, d]
  alpha = rng.standard_normal(num_sines)
  beta = rng.standard_normal(num_sines)
  x = rng.standard_normal((num_samples, dim))
  z = w @ x.T  # [2, N]
  y = z + _sines(z, alpha, beta) + noise * rng.standard_normal(z.shape)
  return MultiTaskDataset(
    features=x.astype(np.float32),
    labels=y.astype(np.float32),
    task_names=("task_1", "task_2"),
    task_types=("regression", "regression"),
    metadata={
      "name": "mmoe_synthetic",
      "w": w,
      "alpha": alpha,
      "beta": beta,
      "correlation": p,
      "scale": scale,
      "noise": noise,
      "seed": seed,
    },
  )


def _calibrate_intercept(scores: np.ndarray, rate: float) -> float:
  """The ``b`` with ``mean(sigmoid(b + scores)) = rate`` (bisection; the mean is increasing in b)."""
  lo, hi = -40.0, 40.0
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    if _sigmoid(mid + scores).mean() < rate:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def funnel_synthetic(
  num_samples: int = 10000,
  *,
  num_users: int = 200,
  num_items: int = 500,
  num_positions: int = 5,
  dense_dim: int = 4,
  latent_dim: int = 8,
  ctr_rate: float = 0.1,
  cvr_rate: float = 0.2,
  correlation: float = 0.5,
  signal: float = 1.5,
  position_bias: float = 0.3,
  seed: int = 0,
  embed_dim: int = 8,
) -> MultiTaskDataset:
  r"""Impressions -> clicks -> conversions, with the sample-selection bias of real funnels.

  Every impression has a user, an item, a display position (categorical) and ``dense_dim``
  dense values :math:`d \sim \mathcal N(0, I)`. With latent user/item vectors whose entries are
  :math:`\mathcal N(0, 1/\sqrt k)` and unit-norm dense weights, the two unit-variance base scores are

  .. math::
    s = (u_a^\top i_a + a^\top d)/\sqrt 2, \qquad s' = (u_b^\top i_b + b^\top d)/\sqrt 2,

  (``a, u_a, i_a`` and ``b, u_b, i_b`` independent), and

  .. math::
    \mathrm{pCTR} = \sigma(b_c + \gamma s - \lambda\, \mathrm{pos}), \qquad
    \mathrm{pCVR} = \sigma(b_v + \gamma (\rho s + \sqrt{1 - \rho^2}\, s')),

  where :math:`\gamma` is ``signal``, :math:`\lambda` ``position_bias`` (position affects clicks
  only) and :math:`\rho` ``correlation`` (how much the click and conversion propensities agree;
  with :math:`\rho \neq 0` the clicked population is not representative of all impressions, the
  sample-selection bias that ESMM addresses). The intercepts :math:`b_c, b_v` are solved by
  bisection so that the expected rates over the feature distribution (estimated on 65,536
  extra draws) are ``ctr_rate`` and ``cvr_rate``. Then ``click ~ Bernoulli(pCTR)``, an independent
  ``conversion_if_clicked ~ Bernoulli(pCVR)``, and the observed ``conversion = click AND
  conversion_if_clicked``.

  Layout: features ``user``, ``item``, ``position`` (int32 ids) and ``dense`` (``[N, dense_dim]``);
  tasks ``('click', 'conversion')`` with ``labels[1]`` the click-and-convert (CTCVR) label over
  all impressions; ``masks[0]`` all True and ``masks[1] = click`` (where ``labels[1]`` is the CVR
  label, for masked CVR losses; ESMM uses all impressions and ignores the mask). ``extras``:
  the ground truth ``true_ctr``, ``true_cvr``, ``true_ctcvr`` and ``conversion_if_clicked``
  (float32 ``[N]``) to evaluate CVR over the entire impression space, and ``user_id``.

  Examples:
    >>> from mtjax import data
    >>> ds = data.funnel_synthetic(2000, seed=0)
    >>> ds.task_names, sorted(ds.features)
    (('click', 'conversion'), ['dense', 'item', 'position', 'user'])
    >>> bool((ds.labels[1] <= ds.labels[0]).all())   # no conversion without a click
    True

  Args:
    num_samples: number of impressions.
    num_users, num_items, num_positions: vocabulary sizes.
    dense_dim: width of the dense feature.
    latent_dim: ``k``, the width of the latent user/item vectors.
    ctr_rate, cvr_rate: expected click rate and conversion-given-click rate, in ``(0, 1)``.
    correlation: ``rho`` in ``[-1, 1]``.
    signal: ``gamma`` (how predictable clicks and conversions are).
    position_bias: ``lambda``.
    seed: the generator seed (sub-streams ``(seed, 0)`` model, ``(seed, 1)`` calibration,
      ``(seed, 2)`` samples).
    embed_dim: embedding width put in the spec.
    task_types: ``"binary"`` or ``"regression"`` per task (default: all binary).
    regression_scale: ``s`` of regression tasks.
    regression_noise: ``sigma`` of regression tasks (noise relative to the signal, before scaling).

  Returns:
    A :class:`MultiTaskDataset`.

  References:
    Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, *Entire Space Multi-Task Model: An Effective Approach
    for Estimating Post-Click Conversion Rate*, SIGIR 2018.
  """
  rho = float(correlation)
  if not (0 < ctr_rate < 1 and 0 < cvr_rate < 1 and -1 <= rho <= 1):
    raise ValueError(
      f"mtjax: funnel_synthetic needs ctr_rate, cvr_rate in (0, 1) and correlation in [-1, 1]; "
      f"got {ctr_rate}, {cvr_rate}, {correlation}."
    )
  if min(num_samples, num_users, num_items, num_positions, dense_dim, latent_dim) < 1:
    raise ValueError(
      "mtjax: funnel_synthetic sizes (num_samples, num_users, num_items, num_positions, "
      "dense_dim, latent_dim) must all be >= 1."
    )
  model = np.random.default_rng((seed, 0))
  k4 = latent_dim**0.25
  ua, ub = model.standard_normal((2, num_users, latent_dim)) / k4
  ia, ib = model.standard_normal((2, num_items, latent_dim)) / k4
  a, b = model.standard_normal((2, dense_dim))
  a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)

  def draw(rng, n):
    return (
      rng.integers(num_users, size=n),
      rng.integers(num_items, size=n),
      rng.integers(num_positions, size=n),
      rng.standard_normal((n, dense_dim)),
    )

  def raw_scores(user, item, pos, dense):
    s = (np.einsum("nk,nk->n", ua[user], ia[item]) + dense @ a) / np.sqrt(2.0)
    s2 = (np.einsum("nk,nk->n", ub[user], ib[item]) + dense @ b) / np.sqrt(2.0)
    click = signal * s - position_bias * pos
    conv = signal * (rho * s + np.sqrt(1.0 - rho * rho) * s2)
    return click, conv

  calib_click, calib_conv = raw_scores(*draw(np.random.default_rng((seed, 1)), 65536))
  b_click = _calibrate_intercept(calib_click, ctr_rate)
  b_conv = _calibrate_intercept(calib_conv, cvr_rate)

  rng = np.random.default_rng((seed, 2))
  user, item, pos, dense = draw(rng, num_samples)
  s_click, s_conv = raw_scores(user, item, pos, dense)
  p_ctr = _sigmoid(b_click + s_click)
  p_cvr = _sigmoid(b_conv + s_conv)
  click = rng.random(num_samples) < p_ctr
  conv_if_clicked = rng.random(num_samples) < p_cvr
  conversion = click & conv_if_clicked
  spec = FeatureSpec(
    categorical=(
      Categorical("user", num_users, embed_dim),
      Categorical("item", num_items, embed_dim),
      Categorical("position", num_positions, embed_dim),
    ),
    dense=(Dense("dense", dense_dim),),
  )
  return MultiTaskDataset(
    features={
      "user": user.astype(np.int32),
      "item": item.astype(np.int32),
      "position": pos.astype(np.int32),
      "dense": dense.astype(np.float32),
    },
    labels=np.stack([click, conversion]).astype(np.float32),
    masks=np.stack([np.ones_like(click), click]),
    task_names=("click", "conversion"),
    spec=spec,
    extras={
      "true_ctr": p_ctr.astype(np.float32),
      "true_cvr": p_cvr.astype(np.float32),
      "true_ctcvr": (p_ctr * p_cvr).astype(np.float32),
      "conversion_if_clicked": conv_if_clicked.astype(np.float32),
      "user_id": user.astype(np.int64),
    },
    metadata={
      "name": "funnel_synthetic",
      "intercepts": (b_click, b_conv),
      "ctr_rate": ctr_rate,
      "cvr_rate": cvr_rate,
      "correlation": rho,
      "signal": signal,
      "position_bias": position_bias,
      "seed": seed,
    },
  )


def position_bias_synthetic(
  num_samples: int = 20000,
  *,
  num_users: int = 300,
  num_items: int = 600,
  num_positions: int = 8,
  num_devices: int = 2,
  dense_dim: int = 4,
  latent_dim: int = 8,
  click_rate: float = 0.2,
  satisfaction_rate: float = 0.3,
  signal: float = 2.0,
  position_bias: float = 0.4,
  device_effect: float = 1.0,
  promotion: float = 1.0,
  policy_relevance: float = 0.5,
  item_quality: float = 1.0,
  satisfaction_correlation: float = 0.6,
  seed: int = 0,
  embed_dim: int = 8,
) -> MultiTaskDataset:
  r"""Logged impressions whose clicks depend on the display position that an earlier ranker chose.

  The data of the position-debiasing experiment of Zhao et al. (2019): a click task biased by the
  position and a satisfaction task that is not. Every impression has a user, an item, ``dense_dim``
  dense values :math:`d \sim \mathcal N(0, I)`, a device :math:`v` (uniform) and a position. With
  latent user/item vectors (entries :math:`\mathcal N(0, 1/\sqrt k)`), a per-item quality
  :math:`c_i \sim \mathcal N(0, 1)` and unit-norm dense weights, the unit-variance relevance and
  second score are

  .. math::
    r = \frac{\kappa c_i + u_a^\top i_a + a^\top d}{\sqrt{2 + \kappa^2}}, \qquad
    r' = (u_b^\top i_b + b^\top d)/\sqrt 2 ,

  with :math:`\kappa` ``item_quality`` (how much of the relevance is the item's alone).

  The logging policy (the ranker that chose the positions) prefers some items for reasons
  unrelated to relevance (a per-item promotion score :math:`\pi_i \sim \mathcal N(0, 1)`):
  :math:`q = \beta r + \mu \pi_i + \epsilon`, :math:`\epsilon \sim \mathcal N(0, 1)`, and the
  position is the bucket of :math:`q`'s quantile, 0 at the top:
  :math:`\mathrm{pos} = \lfloor P\,(1 - \Phi(q / \mathrm{sd}(q))) \rfloor`. Then

  .. math::
    \mathrm{pCTR} = \sigma(b_c + \gamma r - \lambda_v\, \mathrm{pos}), \quad
    \lambda_v = \lambda \Big(1 + \delta \frac{v}{\max(V - 1, 1)}\Big), \qquad
    \mathrm{pSat} = \sigma\big(b_s + \gamma(\rho r + \sqrt{1 - \rho^2}\, r')\big),

  with :math:`\gamma` ``signal``, :math:`\lambda` ``position_bias``, :math:`\delta` ``device_effect``
  (the position matters more on some devices), :math:`\beta` ``policy_relevance``, :math:`\mu`
  ``promotion`` and :math:`\rho` ``satisfaction_correlation``; ``click ~ Bernoulli(pCTR)``,
  ``satisfaction ~ Bernoulli(pSat)``. The intercepts are solved (by bisection, on 65,536 extra
  draws) so that the logged click rate is ``click_rate`` and the satisfaction rate
  ``satisfaction_rate``.

  A model that learns the logged clicks without the position learns :math:`E[\mathrm{click} | x]`,
  which mixes relevance with the promotion :math:`\pi_i` (promoted items were shown higher, so
  clicked more); the unbiased click-through :math:`\sigma(b_c + \gamma r)` (the click probability
  at the top position) ranks by relevance alone. ``extras`` holds that ground truth:
  ``unbiased_ctr`` and a counterfactual label ``unbiased_click ~ Bernoulli(unbiased_ctr)`` (an
  independent draw), ``relevance`` (:math:`r`), ``promotion`` (:math:`\pi_i`), ``true_ctr``
  (the logged pCTR) and ``true_satisfaction``, all float32 ``[N]``.

  Layout: features ``user``, ``item``, ``position``, ``device`` (int32 ids) and ``dense``
  (``[N, dense_dim]``); tasks ``('click', 'satisfaction')``, every label observed.

  Examples:
    >>> from mtjax import data
    >>> ds = data.position_bias_synthetic(4000, seed=0)
    >>> ds.task_names, sorted(ds.features)
    (('click', 'satisfaction'), ['dense', 'device', 'item', 'position', 'user'])
    >>> import numpy as np
    >>> ctr = [ds.labels[0][ds.features['position'] == p].mean() for p in (0, 7)]
    >>> bool(ctr[0] > 2 * ctr[1])   # the top position is clicked much more often
    True

  Args:
    num_samples: number of impressions.
    num_users, num_items, num_positions, num_devices: vocabulary sizes (``P``, ``V``).
    dense_dim: width of the dense feature.
    latent_dim: ``k``, the width of the latent user/item vectors.
    click_rate, satisfaction_rate: the logged click rate and the satisfaction rate, in ``(0, 1)``.
    signal: ``gamma``.
    position_bias: ``lambda`` >= 0, the logit lost per position on device 0.
    device_effect: ``delta`` >= 0.
    promotion: ``mu`` >= 0, how much the logging policy promotes items regardless of relevance.
    policy_relevance: ``beta``, how much it ranked by relevance.
    item_quality: ``kappa`` >= 0.
    satisfaction_correlation: ``rho`` in ``[-1, 1]``.
    seed: the generator seed (sub-streams ``(seed, 0)`` model, ``(seed, 1)`` calibration,
      ``(seed, 2)`` samples).
    embed_dim: embedding width put in the spec.

  Returns:
    A :class:`MultiTaskDataset`.

  References:
    Zhao, Hong, Wei, Chen, Nath, Andrews, Kumthekar, Sathiamoorthy, Yi, Chi, *Recommending What
    Video to Watch Next: A Multitask Ranking System*, RecSys 2019.
  """
  rho = float(satisfaction_correlation)
  if not (0 < click_rate < 1 and 0 < satisfaction_rate < 1 and -1 <= rho <= 1):
    raise ValueError(
      "mtjax: position_bias_synthetic needs click_rate, satisfaction_rate in (0, 1) and "
      f"satisfaction_correlation in [-1, 1]; got {click_rate}, {satisfaction_rate}, {satisfaction_correlation}."
    )
  if min(position_bias, device_effect, promotion, item_quality) < 0:
    raise ValueError(
      "mtjax: position_bias_synthetic needs position_bias, device_effect, promotion and item_quality >= 0; "
      f"got {position_bias}, {device_effect}, {promotion}, {item_quality}."
    )
  if min(num_samples, num_users, num_items, num_positions, num_devices, dense_dim, latent_dim) < 1:
    raise ValueError(
      "mtjax: position_bias_synthetic sizes (num_samples, num_users, num_items, num_positions, "
      "num_devices, dense_dim, latent_dim) must all be >= 1."
    )
  phi = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))), otypes=[np.float64])
  model = np.random.default_rng((seed, 0))
  k4 = latent_dim**0.25
  ua, ub = model.standard_normal((2, num_users, latent_dim)) / k4
  ia, ib = model.standard_normal((2, num_items, latent_dim)) / k4
  a, b = model.standard_normal((2, dense_dim))
  a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
  promo = model.standard_normal(num_items)
  quality = model.standard_normal(num_items)
  slope = position_bias * (1.0 + device_effect * np.arange(num_devices) / max(num_devices - 1, 1))
  q_sd = np.sqrt(policy_relevance**2 + promotion**2 + 1.0)

  def draw(rng, n):
    user, item = rng.integers(num_users, size=n), rng.integers(num_items, size=n)
    dense = rng.standard_normal((n, dense_dim))
    device = rng.integers(num_devices, size=n)
    r = (item_quality * quality[item] + np.einsum("nk,nk->n", ua[user], ia[item]) + dense @ a) / np.sqrt(
      2.0 + item_quality**2
    )
    r2 = (np.einsum("nk,nk->n", ub[user], ib[item]) + dense @ b) / np.sqrt(2.0)
    q = policy_relevance * r + promotion * promo[item] + rng.standard_normal(n)
    pos = np.minimum(np.floor(num_positions * (1.0 - phi(q / q_sd))), num_positions - 1).astype(np.int64)
    click = signal * r - slope[device] * pos
    sat = signal * (rho * r + np.sqrt(1.0 - rho * rho) * r2)
    return user, item, dense, device, pos, r, click, sat

  *_, calib_click, calib_sat = draw(np.random.default_rng((seed, 1)), 65536)
  b_click = _calibrate_intercept(calib_click, click_rate)
  b_sat = _calibrate_intercept(calib_sat, satisfaction_rate)

  rng = np.random.default_rng((seed, 2))
  user, item, dense, device, pos, r, s_click, s_sat = draw(rng, num_samples)
  p_ctr, p_sat = _sigmoid(b_click + s_click), _sigmoid(b_sat + s_sat)
  unbiased = _sigmoid(b_click + signal * r)
  click = rng.random(num_samples) < p_ctr
  sat = rng.random(num_samples) < p_sat
  unbiased_click = rng.random(num_samples) < unbiased
  spec = FeatureSpec(
    categorical=(
      Categorical("user", num_users, embed_dim),
      Categorical("item", num_items, embed_dim),
      Categorical("position", num_positions, embed_dim),
      Categorical("device", num_devices, embed_dim),
    ),
    dense=(Dense("dense", dense_dim),),
  )
  f32 = lambda v: np.asarray(v, np.float32)
  return MultiTaskDataset(
    features={
      "user": user.astype(np.int32),
      "item": item.astype(np.int32),
      "position": pos.astype(np.int32),
      "device": device.astype(np.int32),
      "dense": dense.astype(np.float32),
    },
    labels=np.stack([click, sat]).astype(np.float32),
    masks=np.ones((2, num_samples), bool),
    task_names=("click", "satisfaction"),
    spec=spec,
    extras={
      "unbiased_ctr": f32(unbiased),
      "unbiased_click": f32(unbiased_click),
      "relevance": f32(r),
      "promotion": f32(promo[item]),
      "true_ctr": f32(p_ctr),
      "true_satisfaction": f32(p_sat),
    },
    metadata={
      "name": "position_bias_synthetic",
      "intercepts": (b_click, b_sat),
      "click_rate": click_rate,
      "satisfaction_rate": satisfaction_rate,
      "position_bias": position_bias,
      "device_effect": device_effect,
      "promotion": promotion,
      "policy_relevance": policy_relevance,
      "item_quality": item_quality,
      "satisfaction_correlation": rho,
      "signal": signal,
      "seed": seed,
    },
  )


def _default_cosines(num_tasks: int) -> np.ndarray:
  """Tasks ``0..T-2`` agree (cosine 0.5); the last task conflicts with each of them (-0.5)."""
  c = np.full((num_tasks, num_tasks), 0.5)
  c[-1, :] = c[:, -1] = -0.5
  np.fill_diagonal(c, 1.0)
  return c


def conflicting_tasks(
  num_samples: int = 4000,
  num_tasks: int = 3,
  *,
  task_cosines: Union[None, float, Sequence[Sequence[float]], np.ndarray] = None,
  vocab_sizes: Sequence[int] = (20, 50, 100),
  dense_dim: int = 8,
  latent_dim: int = 4,
  nonlinearity: float = 0.5,
  num_sines: int = 5,
  signal: float = 3.0,
  seed: int = 0,
  embed_dim: int = 8,
  task_types: Optional[Sequence[str]] = None,
  regression_scale: float = 10.0,
  regression_noise: float = 0.5,
) -> MultiTaskDataset:
  r"""``T`` tasks on shared categorical + dense inputs, with controlled (partly conflicting) task directions.

  Each categorical value has a fixed latent vector (``latent_dim`` entries ~ N(0, 1)); a sample's
  latent input :math:`h \in \mathbb R^D` is the concatenation of its fields' latent vectors and
  its dense values (~ N(0, 1)), so :math:`\mathrm{Cov}(h) \approx I`. Unit task directions
  :math:`w_t` with :math:`w_i^\top w_j = C_{ij}` (``task_cosines``; built as :math:`W = L Q^\top`,
  :math:`C = L L^\top`, :math:`Q` orthonormal) give :math:`z_t = w_t^\top h` with
  :math:`\mathrm{Corr}(z_i, z_j) \approx C_{ij}`, and

  .. math::
    \mathrm{logit}_t = \gamma \Big(z_t + \frac{\eta}{\sqrt m} \sum_{i=1}^m \sin(\alpha_i z_t + \beta_i)\Big),
    \qquad y_t \sim \mathrm{Bernoulli}(\sigma(\mathrm{logit}_t)),

  with a shared nonlinearity (:math:`\alpha_i, \beta_i \sim \mathcal N(0, 1)`, as in the MMoE
  generator), :math:`\eta` = ``nonlinearity``, :math:`\gamma` = ``signal``. Negative cosines make
  tasks pull the shared representation in opposite directions: their gradients conflict.

  A task of type ``"regression"`` (``task_types``) is instead a real-valued target on another
  scale, like watch time next to clicks:

  .. math::
    y_t = s \, (g_t + \sigma \epsilon), \qquad \epsilon \sim \mathcal N(0, 1),

  with :math:`g_t` the bracket above, :math:`s` = ``regression_scale`` and :math:`\sigma` =
  ``regression_noise`` (so the Bayes MSE is :math:`(s \sigma)^2`). Its squared-error gradients
  are about :math:`s^2` times larger than the binary tasks' cross-entropy ones: with plain
  summed losses it dominates the shared parameters, the classic case for gradient balancing.

  Default ``task_cosines``: tasks ``0 .. T-2`` agree with each other (0.5) and the last task
  conflicts with all of them (-0.5). With ``signal = 3`` and ``nonlinearity = 0.5`` the true
  probabilities reach an AUC of about 0.9 per binary task and the label correlations are about
  +0.2 (tasks 0, 1) and -0.2 (either with task 2). ``mtjax compare``'s embedded default is
  20,000 samples with ``task_types=("binary", "binary", "regression")``: two click-like tasks and
  a conflicting watch-time-like one at 10x scale (Bayes MSE 25).

  Layout: features ``cat_0 .. cat_{F-1}`` (int32 ids) and ``dense`` (``[N, dense_dim]``);
  tasks ``task_0 .. task_{T-1}``; ``extras['true_probability']`` is ``[N, T]`` (the Bernoulli
  probability of binary tasks, ``sigmoid(signal * g_t)`` for regression ones) and
  ``extras['true_mean']`` ``[N, T]`` the noise-free regression target ``s g_t`` (0 for binary tasks);
  ``metadata`` holds ``w [T, D]``, ``task_cosines``, ``alpha``, ``beta`` and the latent tables.

  Examples:
    >>> from mtjax import data
    >>> ds = data.conflicting_tasks(seed=0)
    >>> len(ds), ds.task_names
    (4000, ('task_0', 'task_1', 'task_2'))
    >>> ds.spec.names
    ('cat_0', 'cat_1', 'cat_2', 'dense')

  Args:
    num_samples: ``N``.
    num_tasks: ``T``.
    task_cosines: None (default above), a float (the same cosine for every pair, in
      ``[-1/(T-1), 1]``) or a ``[T, T]`` correlation matrix (symmetric, unit diagonal, PSD).
    vocab_sizes: vocabulary size of each categorical field.
    dense_dim: width of the dense field.
    latent_dim: latent width of a categorical value.
    nonlinearity: ``eta``.
    num_sines: ``m``.
    signal: ``gamma``.
    seed: seed of ``np.random.default_rng``.
    embed_dim: embedding width put in the spec.
    task_types: ``"binary"`` or ``"regression"`` per task (default: all binary).
    regression_scale: ``s`` of regression tasks.
    regression_noise: ``sigma`` of regression tasks (noise relative to the signal, before scaling).

  Returns:
    A :class:`MultiTaskDataset`.

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, *Gradient Surgery for Multi-Task Learning*,
    NeurIPS 2020 (conflicting task gradients); Ma et al., *Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts*, KDD 2018 (the sine construction).
  """
  if num_tasks < 1 or num_samples < 1:
    raise ValueError(
      f"mtjax: conflicting_tasks needs num_tasks >= 1 and num_samples >= 1, got {num_tasks}, {num_samples}."
    )
  if task_cosines is None:
    cos = _default_cosines(num_tasks)
  elif np.ndim(task_cosines) == 0:
    cos = np.full((num_tasks, num_tasks), float(task_cosines))
    np.fill_diagonal(cos, 1.0)
  else:
    cos = np.asarray(task_cosines, np.float64)
  if (
    cos.shape != (num_tasks, num_tasks)
    or not np.allclose(cos, cos.T)
    or not np.allclose(np.diag(cos), 1.0)
    or np.linalg.eigvalsh(cos).min() < -1e-9
  ):
    raise ValueError(
      f"mtjax: task_cosines must be a symmetric [T, T] = [{num_tasks}, {num_tasks}] matrix with unit "
      "diagonal that is positive semi-definite (a scalar must lie in [-1/(T-1), 1]); got "
      f"{np.asarray(task_cosines).tolist()}."
    )
  types = ("binary",) * num_tasks if task_types is None else tuple(task_types)
  if len(types) != num_tasks or any(t not in ("binary", "regression") for t in types):
    raise ValueError(
      f"mtjax: conflicting_tasks: task_types must be {num_tasks} of 'binary' / 'regression', got {task_types!r}."
    )
  if not regression_scale > 0 or not regression_noise >= 0:
    raise ValueError(
      f"mtjax: conflicting_tasks needs regression_scale > 0 and regression_noise >= 0, got "
      f"{regression_scale}, {regression_noise}."
    )
  vocab_sizes = tuple(int(v) for v in vocab_sizes)
  dim = len(vocab_sizes) * latent_dim + dense_dim
  if dim < num_tasks or min(vocab_sizes, default=1) < 1:
    raise ValueError(
      f"mtjax: conflicting_tasks needs len(vocab_sizes) * latent_dim + dense_dim >= num_tasks "
      f"(got {dim} < {num_tasks}) and vocab sizes >= 1."
    )

  rng = np.random.default_rng(seed)
  evals, evecs = np.linalg.eigh(cos)
  root = evecs * np.sqrt(np.clip(evals, 0.0, None))  # C = root root^T
  q, _ = np.linalg.qr(rng.standard_normal((dim, num_tasks)))
  w = root @ q.T  # [T, D], w w^T = C
  alpha = rng.standard_normal(num_sines)
  beta = rng.standard_normal(num_sines)
  tables = [rng.standard_normal((v, latent_dim)) for v in vocab_sizes]
  ids = [rng.integers(v, size=num_samples) for v in vocab_sizes]
  dense = rng.standard_normal((num_samples, dense_dim))
  h = np.concatenate([t[i] for t, i in zip(tables, ids)] + [dense], axis=1)  # [N, D]
  z = w @ h.T  # [T, N]
  g = z + (nonlinearity / np.sqrt(max(num_sines, 1))) * _sines(z, alpha, beta)
  prob = _sigmoid(signal * g)
  labels = (rng.random(prob.shape) < prob).astype(np.float64)
  regression = np.array([t == "regression" for t in types])
  true_mean = np.where(regression[:, None], regression_scale * g, 0.0)
  if regression.any():  # drawn after the binary labels: binary tasks do not change with task_types
    noisy = regression_scale * (g + regression_noise * rng.standard_normal(g.shape))
    labels = np.where(regression[:, None], noisy, labels)

  names = tuple(f"cat_{f}" for f in range(len(vocab_sizes)))
  feats: dict[str, np.ndarray] = {n: i.astype(np.int32) for n, i in zip(names, ids)}
  feats["dense"] = dense.astype(np.float32)
  spec = FeatureSpec(
    categorical=tuple(Categorical(n, v, embed_dim) for n, v in zip(names, vocab_sizes)),
    dense=(Dense("dense", dense_dim),),
  )
  return MultiTaskDataset(
    features=feats,
    labels=labels.astype(np.float32),
    task_names=tuple(f"task_{t}" for t in range(num_tasks)),
    spec=spec,
    task_types=types,
    extras={"true_probability": prob.T.astype(np.float32), "true_mean": true_mean.T.astype(np.float32)},
    metadata={
      "name": "conflicting_tasks",
      "w": w,
      "task_cosines": cos,
      "alpha": alpha,
      "beta": beta,
      "tables": tables,
      "nonlinearity": nonlinearity,
      "signal": signal,
      "seed": seed,
      "regression_scale": regression_scale,
      "regression_noise": regression_noise,
    },
  )
