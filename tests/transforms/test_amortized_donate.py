"""mtjax.amortized's state can be donated to a jitted step (no leaf aliases another)."""

import jax
import jax.numpy as jnp
import pytest

import mtjax


@pytest.mark.parametrize("ema", [None, 0.9])
def test_amortized_state_donatable(ema):
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
  tx = mtjax.amortized(mtjax.mgda(num_tasks=2), every=4, ema=ema)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert not any(a is b for i, a in enumerate(leaves) for b in leaves[i + 1 :])
  step = jax.jit(lambda s: tx.update(grads, s, params)[1], donate_argnums=0)
  for _ in range(2):
    state = step(state)
  assert int(state.count) == 2
