"""Gradient analysis: task-gradient similarity, conflict and norms, in-step tracking and plots."""

from mtjax.analysis._plotting import plot_similarity_heatmaps
from mtjax.analysis._plotting import plot_similarity_over_steps
from mtjax.analysis._similarity import SimilarityHistory
from mtjax.analysis._similarity import conflict_fraction
from mtjax.analysis._similarity import cosine_similarity
from mtjax.analysis._similarity import gradient_norms
from mtjax.analysis._similarity import group_names
from mtjax.analysis._similarity import norm_ratio
from mtjax.analysis._similarity import track
from mtjax.analysis._similarity import update_alignment

__all__ = (
  "SimilarityHistory",
  "conflict_fraction",
  "cosine_similarity",
  "gradient_norms",
  "group_names",
  "norm_ratio",
  "plot_similarity_heatmaps",
  "plot_similarity_over_steps",
  "track",
  "update_alignment",
)
