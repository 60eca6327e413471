"""Flax linen multi-task architectures, feature specs and the model registry.

Every model is ``__call__(x, *, train=False) -> (outputs [T, B], aux dict)``; build one by
class or by name with ``mtjax.models.get(name, **config)``.
"""

from mtjax.models._adatt import AdaTT
from mtjax.models._aitm import AITM
from mtjax.models._cross_stitch import CrossStitch
from mtjax.models._cross_stitch import CrossStitchUnit
from mtjax.models._deepmcp import DeepMCP
from mtjax.models._dependent import DBMTL
from mtjax.models._dependent import NMTR
from mtjax.models._dselect_k import DSelectK
from mtjax.models._dselect_k import DSelectKGate
from mtjax.models._dselect_k import smooth_step
from mtjax.models._dupn import DUPN
from mtjax.models._dupn import masked_lstm
from mtjax.models._esmm import ESCM2
from mtjax.models._esmm import ESM2
from mtjax.models._esmm import ESMM
from mtjax.models._experts import Experts
from mtjax.models._experts import Gate
from mtjax.models._experts import gate_dropout
from mtjax.models._features import Categorical
from mtjax.models._features import Dense
from mtjax.models._features import Embed
from mtjax.models._features import FeatureEmbedding
from mtjax.models._features import FeatureSpec
from mtjax.models._features import IdSequence
from mtjax.models._features import mask_key
from mtjax.models._features import sequence_key
from mtjax.models._hmoe import HMoE
from mtjax.models._layers import MLP
from mtjax.models._layers import InputLayer
from mtjax.models._mmoe import MMoE
from mtjax.models._mmoe import OMoE
from mtjax.models._pepnet import GateNU
from mtjax.models._pepnet import PEPNet
from mtjax.models._ple import CGC
from mtjax.models._ple import PLE
from mtjax.models._ple import ExtractionLevel
from mtjax.models._registry import available
from mtjax.models._registry import get
from mtjax.models._registry import partition
from mtjax.models._registry import register
from mtjax.models._shared_bottom import SharedBottom
from mtjax.models._snr import SNR
from mtjax.models._snr import SNRRouting
from mtjax.models._snr import hard_concrete_l0
from mtjax.models._snr import hard_concrete_sample
from mtjax.models._star import STAR
from mtjax.models._star import PartitionedNorm
from mtjax.models._star import StarDense
from mtjax.models._stem import STEM
from mtjax.models._stem import STEMLevel
from mtjax.models._youtube import YouTubeRanker
from mtjax.models._youtube import split_spec

__all__ = (
  "AITM",
  "AdaTT",
  "CGC",
  "Categorical",
  "CrossStitch",
  "CrossStitchUnit",
  "DBMTL",
  "DeepMCP",
  "DSelectK",
  "DUPN",
  "DSelectKGate",
  "Dense",
  "ESCM2",
  "ESM2",
  "ESMM",
  "Embed",
  "Experts",
  "ExtractionLevel",
  "FeatureEmbedding",
  "FeatureSpec",
  "Gate",
  "GateNU",
  "HMoE",
  "IdSequence",
  "InputLayer",
  "MLP",
  "MMoE",
  "NMTR",
  "OMoE",
  "PEPNet",
  "PLE",
  "PartitionedNorm",
  "SNR",
  "SNRRouting",
  "STAR",
  "STEM",
  "STEMLevel",
  "SharedBottom",
  "StarDense",
  "YouTubeRanker",
  "available",
  "gate_dropout",
  "hard_concrete_l0",
  "hard_concrete_sample",
  "mask_key",
  "masked_lstm",
  "get",
  "partition",
  "register",
  "sequence_key",
  "smooth_step",
  "split_spec",
)
