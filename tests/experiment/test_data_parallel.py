"""Data-parallel / sharded training on 8 CPU devices gives the one-device update (ARCHITECTURE.md, "Scale").

JAX fixes the device count when it starts, so the checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import numpy as np
    import jax, jax.numpy as jnp, optax
    import mtjax
    from mtjax import data, losses, models, training
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    ds = data.conflicting_tasks(num_samples=512, seed=0, task_types=("binary", "binary", "regression"))
    model = models.MMoE(num_tasks=3, num_experts=4, expert=(16,), tower=(8, 1), features=ds.spec)
    loss_fn = losses.make_loss_fn(model, ("bce", "bce", "mse"), has_aux=False)
    batch = ds.batch(np.arange(256))
    params = model.init(jax.random.PRNGKey(0), batch["x"])["params"]

    def close(a, b, what):
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6, err_msg=what)

    methods = {  # name: (factory, also check the data x model-parallel layout)
        "pcgrad": (lambda: mtjax.pcgrad(key=1, num_tasks=3), False),
        "gradvac": (lambda: mtjax.gradvac(key=1, num_tasks=3, granularity="layer"), False),
        "mgda": (lambda: mtjax.mgda(num_tasks=3, normalization="loss+"), True),
    }
    data_mesh = Mesh(np.array(jax.devices()), ("data",))
    grid = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    def shard_params(p):
      # a second, model-parallel layout: every 2-D kernel split along its output dimension
      return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(grid, P(None, "model") if a.ndim == 2
                                                                   and a.shape[1] % 2 == 0 else P())), p)

    for name, (factory, model_parallel) in methods.items():
      tx = optax.chain(factory(), optax.sgd(0.1))  # sgd: Adam would amplify float-order noise in tiny gradients

      @jax.jit
      def step(p, o, b):
        task_losses, grads = mtjax.task_grads(loss_fn)(p, b)
        u, o = tx.update(grads, o, p, task_losses=task_losses)
        return optax.apply_updates(p, u), o, task_losses

      one = (params, tx.init(params))
      dp = jax.device_put(one, NamedSharding(data_mesh, P()))
      mp = (shard_params(params), tx.init(shard_params(params)))
      for _ in range(2):  # two steps, so that method state (EMA targets, weights, keys) is used
        one = step(one[0], one[1], batch)[:2]
        b = training.shard_batch(batch, data_mesh)
        assert b["x"]["dense"].sharding.num_devices == 8 and b["labels"].sharding.spec == P(None, "data")
        dp = step(dp[0], dp[1], b)[:2]
        if model_parallel:
          mp = step(mp[0], mp[1], training.shard_batch(batch, grid))[:2]
      close(dp, one, f"{name}: data parallel")
      if model_parallel:
        assert jax.tree.leaves(mp[0])[1].sharding.spec in (P(None, "model"), P())
        close(mp, one, f"{name}: data x model parallel")
      assert len(jax.tree.leaves(dp[0])[0].sharding.device_set) == 8
      print(name, "ok")

    # fit(mesh=...) trains the same run as fit on one device.
    tx = optax.chain(mtjax.pcgrad(key=3, num_tasks=3), optax.adam(1e-2))
    kw = dict(steps=6, batch_size=64, seed=2, progress=False, log_every=1)
    single = training.fit(model, tx, ds, **kw)
    parallel = training.fit(model, tx, ds, mesh=data_mesh, **kw)
    np.testing.assert_allclose([r["losses"] for r in parallel.history], [r["losses"] for r in single.history],
                               rtol=2e-4, atol=1e-6)
    close(parallel.state.params, single.state.params, "fit")
    try:
      training.fit(model, tx, ds, mesh=data_mesh, **{**kw, "batch_size": 60})
      raise AssertionError("batch_size 60 on 8 devices should be refused")
    except ValueError as e:
      assert "multiple of the 8 devices" in str(e), e
    print("fit ok")
''')


def test_sharded_training_equals_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path)
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.split() == ["pcgrad", "ok", "gradvac", "ok", "mgda", "ok", "fit", "ok"], proc.stdout
