"""Prints every method's update on the published reference Jacobian, through the public mtjax API.

J = [[-4, 1, 1], [6, 1, 1]]: two tasks whose gradients conflict on the first coordinate. Each
line is the update direction (before the optimizer) and, where the method defines them, the
task weights (the values each method's paper and reference implementation give; the README lists
them). The same values are asserted in tests/transforms/ (atol 1e-4).

Run: python examples/oracles.py
"""

import jax.numpy as jnp
import numpy as np

import mtjax

J = jnp.array([[-4.0, 1, 1], [6.0, 1, 1]])
g = {"w": J}
p = {"w": jnp.zeros(3)}


def run(tx, **kw):  # -> (update, weights) rounded to 4 decimals
  u, s = tx.update(g, tx.init(p), p, **kw)
  r = lambda x: (np.round(np.asarray(x, np.float64), 4) + 0.0).tolist()
  return r(u["w"]), r(s.weights)


print("pcgrad      update, weights", run(mtjax.pcgrad(num_tasks=2)))
print("gradvac     update (1st step = PCGrad)", run(mtjax.gradvac(num_tasks=2))[0])
print("mgda        update, weights", run(mtjax.mgda(num_tasks=2)))
for c in [(0, 0), (0.2, 0.2), (0.7, 0.1)]:
  print(f"pareto_ltr c={c} weights", run(mtjax.pareto_ltr(jnp.array(c), num_tasks=2))[1])
print("uncertainty objective s=0, L=[1,2,4]:", float(mtjax.uncertainty_objective(jnp.zeros(3), jnp.array([1.0, 2, 4]))))
print("upgrad      ", run(mtjax.upgrad(num_tasks=2))[0])
print("dualproj    ", run(mtjax.dualproj(num_tasks=2))[0])
print("cagrad c=0.5", run(mtjax.cagrad(0.5, num_tasks=2))[0])
print("imtl        ", run(mtjax.imtl(num_tasks=2))[0])
print("aligned_mtl ", run(mtjax.aligned_mtl(num_tasks=2))[0])
print("config      ", run(mtjax.config(num_tasks=2))[0])
print("fairgrad a=1", run(mtjax.fairgrad(1.0, num_tasks=2))[0])
