"""Training: jitted multi-task train step, evaluation, logging (metrics writers), checkpoints and exact resume."""

from mtjax.training._checkpoint import CheckpointCorruptError
from mtjax.training._checkpoint import CheckpointError
from mtjax.training._checkpoint import CheckpointSaveError
from mtjax.training._distributed import initialize_distributed
from mtjax.training._precision import Precision
from mtjax.training._train import FitResult
from mtjax.training._train import TrainState
from mtjax.training._train import evaluate
from mtjax.training._train import fit
from mtjax.training._train import init_state
from mtjax.training._train import make_predict_fn
from mtjax.training._train import make_train_step
from mtjax.training._train import method_weights
from mtjax.training._train import shard_batch
from mtjax.training._train import split_batch
from mtjax.training._train import validation_loss_fn
from mtjax.training._writers import CallbackWriter
from mtjax.training._writers import JsonlWriter
from mtjax.training._writers import MetricsWriter
from mtjax.training._writers import TensorBoardWriter
from mtjax.training._writers import scalars

__all__ = (
  "CallbackWriter",
  "CheckpointCorruptError",
  "CheckpointError",
  "CheckpointSaveError",
  "FitResult",
  "JsonlWriter",
  "MetricsWriter",
  "Precision",
  "TensorBoardWriter",
  "TrainState",
  "evaluate",
  "fit",
  "init_state",
  "initialize_distributed",
  "make_predict_fn",
  "make_train_step",
  "method_weights",
  "scalars",
  "shard_batch",
  "split_batch",
  "validation_loss_fn",
)
