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
