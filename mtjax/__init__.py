"""mtjax: gradient-level multi-task learning in JAX.

Per-task gradients in (``mtjax.task_grads``), one update out (optax transforms such as
``mtjax.pcgrad``), Flax MTL architectures (``mtjax.models``), losses and metrics, data,
training (``mtjax.training``), experiments (``mtjax.experiment``, the ``mtjax`` command) and
gradient analysis (``mtjax.analysis``).
"""

from mtjax import analysis
from mtjax import data
from mtjax import fusion
from mtjax import losses
from mtjax import metrics
from mtjax import models
from mtjax import training
from mtjax import transforms
from mtjax._src.config import runtime_checks
from mtjax._src.config import runtime_checks_enabled
from mtjax._src.config import set_runtime_checks
from mtjax._src.partition import infer_shared
from mtjax._src.sparse import SparseRows
from mtjax._src.sparse import densify
from mtjax._src.sparse import embedding_lookup
from mtjax._src.sparse import linear_einsum
from mtjax._src.sparse import representation
from mtjax._src.sparse import task_view
from mtjax._src.task_grads import RepJacobian
from mtjax._src.task_grads import SharedJacobian
from mtjax._src.task_grads import TaskJacobian
from mtjax._src.task_grads import check_task_views
from mtjax._src.task_grads import default_strategy
from mtjax._src.task_grads import micro_batch_task_grads
from mtjax._src.task_grads import multi_input_task_grads
from mtjax._src.task_grads import task_grads
from mtjax._src.tree import shared_mask
from mtjax._src.weighting import WeightingInputs
from mtjax._src.weighting import gram_weighting
from mtjax.transforms import AccumulateState
from mtjax.transforms import AlignedMTLState
from mtjax.transforms import AmortizedState
from mtjax.transforms import AutoLambdaState
from mtjax.transforms import CAGradState
from mtjax.transforms import ConFIGState
from mtjax.transforms import DBMTLState
from mtjax.transforms import DualProjState
from mtjax.transforms import DWAState
from mtjax.transforms import ExcessMTLState
from mtjax.transforms import FairGradState
from mtjax.transforms import FAMOState
from mtjax.transforms import GLSState
from mtjax.transforms import GradDropState
from mtjax.transforms import GradNormState
from mtjax.transforms import GradVacState
from mtjax.transforms import IMTLLossState
from mtjax.transforms import IMTLState
from mtjax.transforms import LinearState
from mtjax.transforms import MConFIGState
from mtjax.transforms import MetaBalanceState
from mtjax.transforms import MGDAState
from mtjax.transforms import MoCoState
from mtjax.transforms import MoDoState
from mtjax.transforms import NashMTLState
from mtjax.transforms import NormalizeState
from mtjax.transforms import ParetoLTRState
from mtjax.transforms import PCGradState
from mtjax.transforms import RLWState
from mtjax.transforms import ScaleInvariantState
from mtjax.transforms import SDMGradState
from mtjax.transforms import STCHState
from mtjax.transforms import UncertaintyState
from mtjax.transforms import UPGradState
from mtjax.transforms import accumulate
from mtjax.transforms import aligned_mtl
from mtjax.transforms import amortized
from mtjax.transforms import auto_lambda
from mtjax.transforms import cagrad
from mtjax.transforms import config
from mtjax.transforms import db_mtl
from mtjax.transforms import dualproj
from mtjax.transforms import dwa
from mtjax.transforms import excess_mtl
from mtjax.transforms import fairgrad
from mtjax.transforms import famo
from mtjax.transforms import gls
from mtjax.transforms import graddrop
from mtjax.transforms import gradnorm
from mtjax.transforms import gradvac
from mtjax.transforms import imtl
from mtjax.transforms import inject_hyperparams
from mtjax.transforms import linear
from mtjax.transforms import m_config
from mtjax.transforms import metabalance
from mtjax.transforms import mgda
from mtjax.transforms import moco
from mtjax.transforms import modo
from mtjax.transforms import nash_mtl
from mtjax.transforms import normalize
from mtjax.transforms import pareto_ltr
from mtjax.transforms import pcgrad
from mtjax.transforms import rlw
from mtjax.transforms import scale_invariant
from mtjax.transforms import sdmgrad
from mtjax.transforms import stch
from mtjax.transforms import stch_objective
from mtjax.transforms import uncertainty
from mtjax.transforms import uncertainty_objective
from mtjax.transforms import upgrad

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
  "linear_einsum",
  "check_task_views",
  "multi_input_task_grads",
  "default_strategy",
  "shared_mask",
  "infer_shared",
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
  "IMTLLossState",
  "famo",
  "FAMOState",
  "stch",
  "STCHState",
  "stch_objective",
  "gls",
  "GLSState",
  "scale_invariant",
  "ScaleInvariantState",
  "db_mtl",
  "DBMTLState",
  "metabalance",
  "MetaBalanceState",
  "excess_mtl",
  "ExcessMTLState",
  "normalize",
  "NormalizeState",
  "moco",
  "MoCoState",
  "m_config",
  "MConFIGState",
  "micro_batch_task_grads",
  "modo",
  "MoDoState",
  "sdmgrad",
  "SDMGradState",
  "AutoLambdaState",
  "auto_lambda",
  # composing with optax
  "accumulate",
  "AccumulateState",
  "inject_hyperparams",
  # subpackages
  "analysis",
  "data",
  "fusion",
  "losses",
  "metrics",
  "models",
  "training",
  "transforms",
)
