"""The public API the way a user writes it; type-checked (basedpyright, `tests/test_lint.py`), not run.

A type error here is a public annotation that rejects (or mistypes) ordinary use. Keep it small: one
line per kind of call the README shows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import mtjax


def loss_fn(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  """``[T]``: one loss per task."""
  h = jnp.tanh(batch["x"] @ params["shared"])
  return jnp.mean((h @ params["heads"] - batch["y"]) ** 2, axis=0)


def train_step(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> tuple[optax.Params, jax.Array]:
  # A method first in an optax chain, fed per-task gradients and the task losses.
  tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=2, shared=mtjax.shared_mask(exclude="heads")), optax.adam(1e-2))
  opt_state = tx.init(params)
  losses, task_grads = mtjax.task_grads(loss_fn)(params, batch)
  updates, opt_state = tx.update(task_grads, opt_state, params, task_losses=losses)
  return optax.apply_updates(params, updates), losses


def lazy_jacobian(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> optax.Updates:
  # A deferred Jacobian (one backward pass of w . L), a loss-weighting method, a hyperparameter schedule.
  tx = optax.chain(mtjax.uncertainty(num_tasks=2), optax.adam(1e-2))
  losses, jac = mtjax.task_grads(loss_fn, deferred=True)(params, batch)
  updates, _ = tx.update(jac, tx.init(params), params, task_losses=losses)
  scheduled = mtjax.inject_hyperparams(mtjax.cagrad)(c=0.4, num_tasks=2)
  del scheduled
  return updates


def subpackages() -> None:
  # Names re-exported by the subpackages (their __all__), as a user reaches them.
  ds = mtjax.data.conflicting_tasks(num_samples=64)
  model = mtjax.models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
  by_name = mtjax.models.get("mmoe", num_tasks=3, features=ds.spec)
  loss = mtjax.losses.make_loss_fn(model, "bce")
  tx = mtjax.transforms.gradvac(num_tasks=3)
  delta: float = mtjax.metrics.delta_m(
    {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, lower_is_better={"a": True, "b": False}
  )
  state = mtjax.gradvac(num_tasks=3).init({"w": jnp.zeros(2)})
  is_state = isinstance(state, mtjax.GradVacState)
  sparse: type = mtjax.SparseRows
  # fit with a callable shared= mask (the README's form), an exported name of mtjax.training.
  result = mtjax.training.fit(
    model, optax.adam(1e-3), ds, steps=1, batch_size=8, shared=mtjax.shared_mask(exclude="tower_"), progress=False
  )
  history = result.history
  del result, history
  del by_name, loss, tx, delta, is_state, sparse
