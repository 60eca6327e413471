"""mtjax: gradient-level multi-task learning in JAX.

Per-task gradients in (``mtjax.task_grads``), one update out (optax transforms such as
``mtjax.pcgrad``), Flax MTL architectures (``mtjax.models``), losses and metrics, data,
training (``mtjax.training``), experiments (``mtjax.experiment``, the ``mtjax`` command) and
gradient analysis (``mtjax.analysis``).
"""

from mtjax import analysis
from mtjax import data
from mtjax import losses
from mtjax import metrics
from mtjax import models
from mtjax import training
from mtjax._src.config import runtime_checks
from mtjax._src.config import runtime_checks_enabled
from mtjax._src.config import set_runtime_checks
from mtjax._src.task_grads import default_strategy
from mtjax._src.task_grads import multi_input_task_grads
from mtjax._src.sparse import SparseRows
from mtjax._src.sparse import densify
from mtjax._src.sparse import embedding_lookup
from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax._src.task_grads import RepJacobian
from mtjax._src.task_grads import SharedJacobian
from mtjax._src.task_grads import TaskJacobian
from mtjax._src.task_grads import task_grads
from mtjax._src.task_grads import check_task_views
from mtjax._src.partition import infer_shared
from mtjax._src.tree import shared_mask
from mtjax._src.weighting import WeightingInputs
from mtjax._src.weighting import gram_weighting
from mtjax.transforms import AmortizedState
from mtjax.transforms import DWAState
from mtjax.transforms import amortized
from mtjax.transforms import GradNormState
from mtjax.transforms import GradVacState
from mtjax.transforms import LinearState
from mtjax.transforms import MGDAState
from mtjax.transforms import PCGradState
from mtjax.transforms import ParetoLTRState
from mtjax.transforms import UncertaintyState
from mtjax.transforms import dwa
from mtjax.transforms import gradnorm
from mtjax.transforms import gradvac
from mtjax.transforms import linear
from mtjax.transforms import mgda
from mtjax.transforms import pareto_ltr
from mtjax.transforms import pcgrad
from mtjax.transforms import uncertainty
from mtjax.transforms import uncertainty_objective
from mtjax.transforms import AlignedMTLState
from mtjax.transforms import CAGradState
from mtjax.transforms import ConFIGState
from mtjax.transforms import DualProjState
from mtjax.transforms import FairGradState
from mtjax.transforms import GradDropState
from mtjax.transforms import IMTLState
from mtjax.transforms import NashMTLState
from mtjax.transforms import RLWState
from mtjax.transforms import UPGradState
from mtjax.transforms import aligned_mtl
from mtjax.transforms import cagrad
from mtjax.transforms import config
from mtjax.transforms import dualproj
from mtjax.transforms import fairgrad
from mtjax.transforms import graddrop
from mtjax.transforms import imtl
from mtjax.transforms import nash_mtl
from mtjax.transforms import rlw
from mtjax.transforms import upgrad
# -- 2022-2026 methods, group A --
# -- 2022-2026 methods, group B --
# -- 2022-2026 methods, group C --
# -- 2022-2026 methods, group D --
# -- 2022-2026 methods, group E --

__version__ = "0.1.0"

__all__ = (
    # per-task gradients and the weighting core
    "task_grads",
    "TaskJacobian",
    "RepJacobian",
    "SharedJacobian",
    "SparseRows",
    "densify",
    "embedding_lookup",
    "representation",
    "task_view",
    "check_task_views",
    "multi_input_task_grads",
    "default_strategy",
    "shared_mask",
    "gram_weighting",
    "WeightingInputs",
    "runtime_checks",
    "runtime_checks_enabled",
    "set_runtime_checks",
    # transforms
    "linear",
    "LinearState",
    "pcgrad",
    "PCGradState",
    "gradvac",
    "GradVacState",
    "mgda",
    "MGDAState",
    "pareto_ltr",
    "ParetoLTRState",
    "gradnorm",
    "GradNormState",
    "dwa",
    "DWAState",
    "uncertainty",
    "UncertaintyState",
    "uncertainty_objective",
    # transforms beyond the required set
    "cagrad",
    "CAGradState",
    "imtl",
    "IMTLState",
    "aligned_mtl",
    "AlignedMTLState",
    "upgrad",
    "UPGradState",
    "dualproj",
    "DualProjState",
    "config",
    "ConFIGState",
    "fairgrad",
    "FairGradState",
    "nash_mtl",
    "NashMTLState",
    "rlw",
    "RLWState",
    "graddrop",
    "GradDropState",
    "amortized",
    "AmortizedState",
    # methods of 2022-2026
    # -- group A --
    # -- group B --
    # -- group C --
    # -- group D --
    # -- group E --
    # subpackages
    "analysis",
    "data",
    "losses",
    "metrics",
    "models",
    "training",
)
