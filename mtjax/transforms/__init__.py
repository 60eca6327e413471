"""Multi-task gradient transformations (optax ``GradientTransformationExtraArgs``)."""

from mtjax.transforms._accumulate import AccumulateState
from mtjax.transforms._accumulate import accumulate
from mtjax.transforms._aligned_mtl import AlignedMTLState
from mtjax.transforms._aligned_mtl import aligned_mtl
from mtjax.transforms._amortized import AmortizedState
from mtjax.transforms._amortized import amortized
from mtjax.transforms._auto_lambda import AutoLambdaState
from mtjax.transforms._auto_lambda import auto_lambda
from mtjax.transforms._cagrad import CAGradState
from mtjax.transforms._cagrad import cagrad
from mtjax.transforms._config import ConFIGState
from mtjax.transforms._config import config
from mtjax.transforms._db_mtl import DBMTLState
from mtjax.transforms._db_mtl import db_mtl
from mtjax.transforms._dualproj import DualProjState
from mtjax.transforms._dualproj import dualproj
from mtjax.transforms._dwa import DWAState
from mtjax.transforms._dwa import dwa
from mtjax.transforms._excess_mtl import ExcessMTLState
from mtjax.transforms._excess_mtl import excess_mtl
from mtjax.transforms._fairgrad import FairGradState
from mtjax.transforms._fairgrad import fairgrad
from mtjax.transforms._famo import FAMOState
from mtjax.transforms._famo import famo
from mtjax.transforms._gls import GLSState
from mtjax.transforms._gls import gls
from mtjax.transforms._graddrop import GradDropState
from mtjax.transforms._graddrop import graddrop
from mtjax.transforms._gradnorm import GradNormState
from mtjax.transforms._gradnorm import gradnorm
from mtjax.transforms._gradvac import GradVacState
from mtjax.transforms._gradvac import gradvac
from mtjax.transforms._imtl import IMTLLossState
from mtjax.transforms._imtl import IMTLState
from mtjax.transforms._imtl import imtl
from mtjax.transforms._inject import inject_hyperparams
from mtjax.transforms._linear import LinearState
from mtjax.transforms._linear import linear
from mtjax.transforms._m_config import MConFIGState
from mtjax.transforms._m_config import m_config
from mtjax.transforms._metabalance import MetaBalanceState
from mtjax.transforms._metabalance import metabalance
from mtjax.transforms._mgda import MGDAState
from mtjax.transforms._mgda import mgda
from mtjax.transforms._moco import MoCoState
from mtjax.transforms._moco import moco
from mtjax.transforms._modo import MoDoState
from mtjax.transforms._modo import modo
from mtjax.transforms._nash_mtl import NashMTLState
from mtjax.transforms._nash_mtl import nash_mtl
from mtjax.transforms._normalize import NormalizeState
from mtjax.transforms._normalize import normalize
from mtjax.transforms._pareto_ltr import ParetoLTRState
from mtjax.transforms._pareto_ltr import pareto_ltr
from mtjax.transforms._pcgrad import PCGradState
from mtjax.transforms._pcgrad import pcgrad
from mtjax.transforms._rlw import RLWState
from mtjax.transforms._rlw import rlw
from mtjax.transforms._scale_invariant import ScaleInvariantState
from mtjax.transforms._scale_invariant import scale_invariant
from mtjax.transforms._sdmgrad import SDMGradState
from mtjax.transforms._sdmgrad import sdmgrad
from mtjax.transforms._stch import STCHState
from mtjax.transforms._stch import stch
from mtjax.transforms._stch import stch_objective
from mtjax.transforms._uncertainty import UncertaintyState
from mtjax.transforms._uncertainty import uncertainty
from mtjax.transforms._uncertainty import uncertainty_objective
from mtjax.transforms._upgrad import UPGradState
from mtjax.transforms._upgrad import upgrad

__all__ = (
  "AccumulateState",
  "AlignedMTLState",
  "AmortizedState",
  "AutoLambdaState",
  "CAGradState",
  "ConFIGState",
  "DBMTLState",
  "DWAState",
  "DualProjState",
  "ExcessMTLState",
  "FAMOState",
  "FairGradState",
  "GLSState",
  "GradDropState",
  "GradNormState",
  "GradVacState",
  "IMTLLossState",
  "IMTLState",
  "LinearState",
  "MConFIGState",
  "MGDAState",
  "MetaBalanceState",
  "MoCoState",
  "MoDoState",
  "NashMTLState",
  "NormalizeState",
  "PCGradState",
  "ParetoLTRState",
  "RLWState",
  "SDMGradState",
  "STCHState",
  "ScaleInvariantState",
  "UPGradState",
  "UncertaintyState",
  "accumulate",
  "aligned_mtl",
  "amortized",
  "auto_lambda",
  "cagrad",
  "config",
  "db_mtl",
  "dualproj",
  "dwa",
  "excess_mtl",
  "fairgrad",
  "famo",
  "gls",
  "graddrop",
  "gradnorm",
  "gradvac",
  "imtl",
  "inject_hyperparams",
  "linear",
  "m_config",
  "metabalance",
  "mgda",
  "moco",
  "modo",
  "nash_mtl",
  "normalize",
  "pareto_ltr",
  "pcgrad",
  "rlw",
  "scale_invariant",
  "sdmgrad",
  "stch",
  "stch_objective",
  "uncertainty",
  "uncertainty_objective",
  "upgrad",
)
