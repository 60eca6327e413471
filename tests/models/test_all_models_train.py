"""Every registered model trains: 200 steps of optax.chain(mtjax.pcgrad(...), optax.adam(...))
on a small synthetic multi-task dataset lower every task's loss (issue #3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax import losses
from mtjax import models

SPEC = models.FeatureSpec(
  categorical=(
    models.Categorical("user", 40, 4),
    models.Categorical("item", 60, 4),
    models.Categorical("domain", 3, 4),
    models.Categorical("prior", 5, 4),
  ),
  dense=(models.Dense("dense", 4),),
  # a behaviour history in the item table: every model takes sequence fields (pooled), DUPN reads them step by step
  sequences=(models.IdSequence("history", 60, 4, max_len=6, table="item"),),
)
N = 512


def _data(seed=0):
  """Features plus task logits that depend on user, item, domain and dense values."""
  rng = np.random.default_rng(seed)
  x = {
    "user": rng.integers(0, 40, N),
    "item": rng.integers(0, 60, N),
    "domain": rng.integers(0, 3, N),
    "prior": rng.integers(0, 5, N),
    "dense": rng.normal(size=(N, 4)).astype(np.float32),
    "history": np.where(np.arange(6)[None] < rng.integers(0, 7, N)[:, None], rng.integers(0, 60, (N, 6)), -1),
  }
  eff = [rng.normal(size=(40,)), rng.normal(size=(60,)), rng.normal(size=(3,)), rng.normal(size=(4, 3))]

  def logit(k):
    return (
      eff[0][x["user"]] * (1 + k) + eff[1][x["item"]] * (-1) ** k + eff[2][x["domain"]] + x["dense"] @ eff[3][:, k % 3]
    )

  prob = lambda z: 1 / (1 + np.exp(-z))
  y = [(rng.random(N) < prob(1.5 * logit(k))).astype(np.float32) for k in range(3)]
  chain = np.stack([y[0], y[0] * y[1], y[0] * y[1] * y[2]])  # click -> click & a -> click & a & buy
  return {k: jnp.asarray(v) for k, v in x.items()}, jnp.asarray(np.stack(y[:2])), jnp.asarray(chain)


CASES = {
  "shared_bottom": (dict(num_tasks=2, bottom=(16,), tower=(8, 1)), "plain"),
  "omoe": (dict(num_tasks=2, num_experts=3, expert=(16,), tower=(8, 1)), "plain"),
  "mmoe": (dict(num_tasks=2, num_experts=3, expert=(16,), tower=(8, 1)), "plain"),
  "cgc": (dict(num_tasks=2, expert=(16,), tower=(8, 1)), "plain"),
  "ple": (dict(num_tasks=2, num_levels=2, expert=(16,), tower=(8, 1)), "plain"),
  "stem": (dict(num_tasks=2, expert=(16,), tower=(8, 1)), "plain"),
  "pepnet": (dict(num_tasks=2, domain_fields=("domain",), prior_fields=("prior",), tower=(16, 8, 1)), "plain"),
  "star": (dict(num_tasks=2, num_domains=3, domain_feature="domain", hidden=(16, 8)), "plain"),
  "esmm": (dict(tower=(16, 8, 1)), "esmm"),
  "esm2": (dict(tower=(16, 8, 1)), "esm2"),
  "escm2": (dict(tower=(16, 8, 1), counterfactual="dr"), "escm2"),
  "dbmtl": (dict(num_tasks=2, bottom=(16,), tower=(8,), relation=(8,)), "plain"),
  "nmtr": (dict(num_tasks=2, user_fields=("user",), item_fields=("item",)), "plain"),
  "aitm": (dict(num_tasks=2, tower=(16, 8)), "aitm"),
  "cross_stitch": (dict(num_tasks=2, hidden=(16, 8), tower=(1,)), "plain"),
  "dselect_k": (dict(num_tasks=2, num_experts=4, k=2, expert=(16,), tower=(8, 1), entropy_reg=1e-3), "plain"),
  "snr": (dict(num_tasks=2, num_subnetworks=(3, 2), subnetwork=(16,), tower=(8, 1)), "plain"),
  "adatt": (
    dict(num_tasks=2, num_levels=2, experts_per_task=1, num_shared_experts=1, expert=(16,), tower=(8, 1)),
    "plain",
  ),
  "dupn": (dict(num_tasks=2, lstm=8, attention=4, representation_dim=16, tower=(8, 1)), "plain"),
  "deepmcp": (dict(prediction=(16, 1), matching=(8,), correlation_weight=0.1, num_negatives=2), "plain"),
  "hmoe": (dict(num_tasks=2, num_experts=3, expert=(16,), tower=(8, 1)), "plain"),
  "youtube": (
    dict(
      num_tasks=2,
      num_experts=3,
      expert=(16,),
      tower=(8, 1),
      bias_features=("prior",),
      position_feature="prior",
      engagement_tasks=(0,),
    ),
    "plain",
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_trains_with_pcgrad(name):
  assert set(CASES) == set(models.available()) - {"my_linear"}  # every registered model is covered
  config, kind = CASES[name]
  x, y2, chain = _data()
  funnel = chain[jnp.array([0, 2])]
  labels = {"plain": y2, "esmm": funnel, "escm2": funnel, "aitm": funnel, "esm2": chain}[kind]
  multi = {
    "plain": None,
    "esmm": losses.esmm_loss,
    "escm2": functools.partial(losses.escm2_loss, mode="dr"),
    "aitm": losses.aitm_loss,
    "esm2": losses.esm2_loss,
  }[kind]
  model = models.get(name, features=SPEC, **config)
  variables = dict(model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x))
  params = variables.pop("params")
  mutable = tuple(variables)
  batch = {"x": x, "labels": labels}
  train_loss = losses.make_loss_fn(model, "bce", multi_task_loss=multi, train=True, mutable=mutable)
  eval_loss = losses.make_loss_fn(model, "bce", multi_task_loss=multi, has_aux=False)
  num_tasks = labels.shape[0]
  tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=num_tasks), optax.adam(1e-2))

  def step(carry, _):
    p, o, v, key = carry
    key, sub = jax.random.split(key)  # dropout-style randomness (SNR's gates, the position dropout)
    (task_losses, aux), grads = mtjax.task_grads(train_loss, has_aux=True)(p, batch, {"dropout": sub}, v)
    updates, o = tx.update(grads, o, p, task_losses=task_losses)
    v = {**v, **aux["updates"]} if mutable else v
    return (optax.apply_updates(p, updates), o, v, key), task_losses

  (final, _, final_vars, _), curve = jax.jit(lambda c: jax.lax.scan(step, c, None, length=200))(
    (params, tx.init(params), variables, jax.random.key(3))
  )
  before = eval_loss(params, batch, variables=variables)
  after = eval_loss(final, batch, variables=final_vars)
  assert before.shape == after.shape == (num_tasks,)
  assert np.all(np.isfinite(curve))
  # Every task's loss went down, clearly (not noise).
  np.testing.assert_array_less(np.asarray(after), 0.9 * np.asarray(before))
