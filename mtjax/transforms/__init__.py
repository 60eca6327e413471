"""Multi-task gradient transformations (optax ``GradientTransformationExtraArgs``)."""

from mtjax.transforms._linear import LinearState
from mtjax.transforms._linear import linear
