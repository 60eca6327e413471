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
    "census": data.census_income,
    "aliexpress": data.aliexpress,
    "aliccp": data.aliccp,
    "aliccp_processed": data.aliccp_processed,
    "kuairand": data.kuairand,
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
    # -- 2022-2026 methods, group A --
    # -- 2022-2026 methods, group B --
    # -- 2022-2026 methods, group C --
    # -- 2022-2026 methods, group D --
    # -- 2022-2026 methods, group E --
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
