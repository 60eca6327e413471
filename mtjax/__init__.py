"""mtjax: gradient-level multi-task learning in JAX.

Per-task gradients in (``mtjax.task_grads``), one update out (optax transforms such as
``mtjax.pcgrad``), Flax MTL architectures (``mtjax.models``) and gradient analysis.
"""

from mtjax._src.task_grads import default_strategy
from mtjax._src.task_grads import multi_input_task_grads
from mtjax._src.task_grads import task_grads
from mtjax._src.tree import shared_mask
from mtjax._src.weighting import WeightingInputs
from mtjax._src.weighting import gram_weighting
from mtjax import losses
from mtjax import metrics
from mtjax.transforms import GradVacState
from mtjax.transforms import LinearState
from mtjax.transforms import PCGradState
from mtjax.transforms import gradvac
from mtjax.transforms import linear
from mtjax.transforms import pcgrad
from mtjax.transforms import GradNormState
from mtjax.transforms import gradnorm
from mtjax.transforms import DWAState
from mtjax.transforms import dwa
from mtjax.transforms import UncertaintyState
from mtjax.transforms import uncertainty
from mtjax.transforms import uncertainty_objective
from mtjax.transforms import MGDAState
from mtjax.transforms import mgda
from mtjax.transforms import ParetoLTRState
from mtjax.transforms import pareto_ltr

__version__ = "0.1.0"

__all__ = (
    "GradVacState",
    "LinearState",
    "PCGradState",
    "WeightingInputs",
    "default_strategy",
    "gradvac",
    "gram_weighting",
    "linear",
    "multi_input_task_grads",
    "pcgrad",
    "shared_mask",
    "task_grads",
    "GradNormState",
    "gradnorm",
    "DWAState",
    "dwa",
    "UncertaintyState",
    "uncertainty",
    "uncertainty_objective",
    "MGDAState",
    "mgda",
    "ParetoLTRState",
    "pareto_ltr",
)
