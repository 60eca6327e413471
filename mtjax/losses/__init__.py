"""Multi-task losses: per-sample losses, masked per-task means, RankNet and ``make_loss_fn``."""

from mtjax.losses._basic import LossSpec
from mtjax.losses._basic import bce_with_logits
from mtjax.losses._basic import make_loss_fn
from mtjax.losses._basic import masked_mean
from mtjax.losses._basic import mse
from mtjax.losses._basic import multi_behavior_bpr
from mtjax.losses._basic import per_task_loss
from mtjax.losses._basic import ranknet
from mtjax.losses._funnel import aitm_calibrator
from mtjax.losses._funnel import aitm_loss
from mtjax.losses._funnel import escm2_loss
from mtjax.losses._funnel import esm2_composite_logits
from mtjax.losses._funnel import esm2_log_probs
from mtjax.losses._funnel import esm2_loss
from mtjax.losses._funnel import esmm_log_probs
from mtjax.losses._funnel import esmm_loss

__all__ = (
  "LossSpec",
  "aitm_calibrator",
  "aitm_loss",
  "bce_with_logits",
  "esm2_composite_logits",
  "esm2_log_probs",
  "esm2_loss",
  "escm2_loss",
  "esmm_log_probs",
  "esmm_loss",
  "make_loss_fn",
  "masked_mean",
  "mse",
  "multi_behavior_bpr",
  "per_task_loss",
  "ranknet",
)
