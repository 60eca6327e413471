"""Names an experiment config can use: datasets, methods, optimizers (models: mtjax.models)."""

from __future__ import annotations

import optax

import mtjax
from mtjax import data
from mtjax import models
from mtjax.models import _registry as model_registry

DATASETS = {
  "conflicting": data.conflicting_tasks,
  "mmoe_synthetic": data.mmoe_synthetic,
  "funnel": data.funnel_synthetic,
  "position_bias": data.position_bias_synthetic,
  "census": data.census_income,
  "aliexpress": data.aliexpress,
  "aliccp": data.aliccp,
  "aliccp_processed": data.aliccp_processed,
  "kuairand": data.kuairand,
  "store": data.open_store,  # a converted on-disk store (mtjax convert / data.write_store): streamed, bounded memory
}

METHODS = {
  "linear": mtjax.linear,
  "pcgrad": mtjax.pcgrad,
  "gradvac": mtjax.gradvac,
  "mgda": mtjax.mgda,
  "pareto_ltr": mtjax.pareto_ltr,
  "gradnorm": mtjax.gradnorm,
  "dwa": mtjax.dwa,
  "uncertainty": mtjax.uncertainty,
  "cagrad": mtjax.cagrad,
  "imtl": mtjax.imtl,
  "aligned_mtl": mtjax.aligned_mtl,
  "upgrad": mtjax.upgrad,
  "dualproj": mtjax.dualproj,
  "config": mtjax.config,
  "fairgrad": mtjax.fairgrad,
  "nash_mtl": mtjax.nash_mtl,
  "rlw": mtjax.rlw,
  "graddrop": mtjax.graddrop,
  "famo": mtjax.transforms._famo.next_batch_famo,  # pylint: disable=protected-access  # fit passes only task_losses
  "stch": mtjax.transforms._stch.stch_as_trained_by_the_authors,  # pylint: disable=protected-access
  "gls": mtjax.gls,
  "scale_invariant": mtjax.scale_invariant,
  "db_mtl": mtjax.db_mtl,
  "metabalance": mtjax.metabalance,
  "excess_mtl": mtjax.excess_mtl,
  "normalize": mtjax.transforms._normalize.normalize_by_name,  # pylint: disable=protected-access
  "moco": mtjax.moco,
  "m_config": mtjax.m_config,
  # MoDo and SDMGrad take num_batches independent micro-batches per step: the runner passes
  # fit(micro_batches=num_batches) (SDMGrad's num_batches=1 is the authors' one-batch code).
  "modo": mtjax.modo,
  "sdmgrad": mtjax.sdmgrad,
  "auto_lambda": mtjax.auto_lambda,  # the runner passes the model's loss (meta_loss_fn) and validation batches
}

OPTIMIZERS = {
  "adam": optax.adam,
  "adamw": optax.adamw,
  "sgd": optax.sgd,
  "rmsprop": optax.rmsprop,
  "adagrad": optax.adagrad,
}

DATA_RESERVED = ()
MODEL_RESERVED = ("num_tasks", "features", "parent", "name")
METHOD_RESERVED = ("num_tasks",)


def model_names():
  return {n: None for n in models.available()}


def model_class(name: str):
  return model_registry._MODELS[name]  # pylint: disable=protected-access
