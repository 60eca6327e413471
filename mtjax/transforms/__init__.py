"""Multi-task gradient transformations (optax ``GradientTransformationExtraArgs``)."""

from mtjax.transforms._linear import LinearState
from mtjax.transforms._linear import linear
from mtjax.transforms._gradvac import GradVacState
from mtjax.transforms._gradvac import gradvac
from mtjax.transforms._pcgrad import PCGradState
from mtjax.transforms._pcgrad import pcgrad
from mtjax.transforms._gradnorm import GradNormState
from mtjax.transforms._gradnorm import gradnorm
from mtjax.transforms._dwa import DWAState
from mtjax.transforms._dwa import dwa
from mtjax.transforms._uncertainty import UncertaintyState
from mtjax.transforms._uncertainty import uncertainty
from mtjax.transforms._uncertainty import uncertainty_objective
from mtjax.transforms._mgda import MGDAState
from mtjax.transforms._mgda import mgda
from mtjax.transforms._pareto_ltr import ParetoLTRState
from mtjax.transforms._pareto_ltr import pareto_ltr
from mtjax.transforms._cagrad import CAGradState
from mtjax.transforms._cagrad import cagrad
from mtjax.transforms._imtl import IMTLState
from mtjax.transforms._imtl import imtl
from mtjax.transforms._aligned_mtl import AlignedMTLState
from mtjax.transforms._aligned_mtl import aligned_mtl
from mtjax.transforms._upgrad import UPGradState
from mtjax.transforms._upgrad import upgrad
from mtjax.transforms._dualproj import DualProjState
from mtjax.transforms._dualproj import dualproj
from mtjax.transforms._config import ConFIGState
from mtjax.transforms._config import config
from mtjax.transforms._fairgrad import FairGradState
from mtjax.transforms._fairgrad import fairgrad
from mtjax.transforms._nash_mtl import NashMTLState
from mtjax.transforms._nash_mtl import nash_mtl
from mtjax.transforms._rlw import RLWState
from mtjax.transforms._rlw import rlw
from mtjax.transforms._graddrop import GradDropState
from mtjax.transforms._graddrop import graddrop
from mtjax.transforms._amortized import AmortizedState
from mtjax.transforms._amortized import amortized
# -- 2022-2026 methods, group A --
# -- 2022-2026 methods, group B --
# -- 2022-2026 methods, group C --
# -- 2022-2026 methods, group D --
# -- 2022-2026 methods, group E --
