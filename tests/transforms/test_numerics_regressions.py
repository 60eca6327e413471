"""Regressions of issue #11 (numerics on degenerate inputs), one test per point, from the reproducers."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax


def _jac(rng, t=3, p=6):
  return rng.normal(size=(t, p)) + 0.5 * rng.normal(size=(1, p))


# 1. No hang under jit: LAPACK (pinv/svd) never sees NaN/inf. Run in a subprocess with a timeout, so that a
# regression fails instead of hanging the suite.
_HANG_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import mtjax
    x64 = sys.argv[1] == "64"
    jax.config.update("jax_enable_x64", x64)
    dtype = jnp.float64 if x64 else jnp.float32
    big = 1e160 if x64 else 3e20
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 6))
    params = {"w": jnp.zeros(6, dtype)}
    cases = [("pareto_ltr inf", mtjax.pareto_ltr([0.2, 0.2, 0.2]), g.copy(), "non-finite task gradients"),
             ("pareto_ltr overflow", mtjax.pareto_ltr([0.2, 0.2, 0.2]), big * g, None),
             ("imtl overflow", mtjax.imtl(num_tasks=3), big * g, None),
             ("imtl nan", mtjax.imtl(num_tasks=3), g.copy(), "non-finite task gradients")]
    cases[0][2][1, 2] = np.inf
    cases[3][2][0, 0] = np.nan
    for name, tx, grads, error in cases:
      state = tx.init(params)
      try:
        out, _ = jax.jit(tx.update)({"w": jnp.asarray(grads, dtype)}, state, params)
        out = np.asarray(out["w"])
        assert error is None, (name, "no error")
        assert np.all(np.isfinite(out)), (name, out)
      except Exception as e:  # the runtime check's error
        assert error is not None and error in str(e), (name, str(e)[:300])
      print(name, "returned", flush=True)
    print("ALL DONE")
""")


@pytest.mark.parametrize("bits", ["32", "64"])
def test_point1_no_hang_under_jit_on_nonfinite_or_overflowing_gradients(bits):
  proc = subprocess.run([sys.executable, "-c", _HANG_SCRIPT, bits], capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0 and "ALL DONE" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-3000:])


# 2. A finite Gram that overflows: the Gram methods rescale (exact powers of two) and give the weights of
# the unscaled problem; a method that does not rescale says that the Gram overflows.
def _weights(tx, grads, dtype, jit):
  params = {"w": jnp.zeros(grads.shape[1], dtype)}
  update = jax.jit(tx.update) if jit else tx.update
  losses = jnp.ones(grads.shape[0], dtype)  # read by gradnorm only
  out, state = update({"w": jnp.asarray(grads, dtype)}, tx.init(params), params, task_losses=losses)
  return np.asarray(out["w"], np.float64), np.asarray(state.weights, np.float64)


# Eager once (float32): the eager path runs the same code as jit, op by op (~40 s per run on 2 cores).
@pytest.mark.parametrize("x64,jit", [(False, False), (False, True), (True, True)])
def test_point2_overflowing_gram_is_rescaled(x64, jit):
  rng = np.random.default_rng(1)
  g = _jac(rng)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    scale = 2.0**530 if x64 else 2.0**67  # ~3.5e159 / ~1.5e20: the Gram overflows, the rows do not
    rtol = 1e-9 if x64 else 2e-4
    for tx, degree in (
      (mtjax.pareto_ltr([0.1, 0.1, 0.1]), 0.0),
      (mtjax.imtl(num_tasks=3), 0.0),
      (mtjax.nash_mtl(num_tasks=3), -1.0),
      (mtjax.nash_mtl(num_tasks=3, normalization="frobenius"), 0.0),
      (mtjax.fairgrad(2.0, num_tasks=3), -4.0 / 3.0),
      (mtjax.fairgrad(0.5, num_tasks=3), -2.0 / 3.0),
    ):
      _, w_ref = _weights(tx, g, dtype, jit)
      out, w = _weights(tx, scale * g, dtype, jit)
      assert np.all(np.isfinite(out)), out
      # w(s g) = s^degree w(g) (FairGrad: G -> s^2 G, w -> s^(-2 alpha / (1 + alpha)) w).
      np.testing.assert_allclose(w, w_ref * scale**degree, rtol=rtol)
    # GradNorm reads the gradient norms: they are finite and right.
    tx = mtjax.gradnorm(num_tasks=3, layer="all", learning_rate=1e-3 / scale)
    _, w_ref = _weights(mtjax.gradnorm(num_tasks=3, layer="all", learning_rate=1e-3), g, dtype, jit)
    out, w = _weights(tx, scale * g, dtype, jit)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    np.testing.assert_allclose(w, w_ref, rtol=rtol)
    # The methods whose weights do not depend on a common scale of the Gram rescale as well.
    # d(s g) = s d(g), except MGDA's l2-normalized direction (degree 0). Under jit only (the eager
    # path runs the same code; each transform is one more compilation).
    for tx, degree in (
      ()
      if not jit
      else (
        (mtjax.mgda(num_tasks=3), 1),
        (mtjax.mgda(num_tasks=3, normalization="l2"), 1),
        (mtjax.mgda(num_tasks=3, normalization="l2", apply_to="normalized"), 0),
        (mtjax.pcgrad(key=0, num_tasks=3), 1),
        (mtjax.gradvac(key=0, num_tasks=3), 1),
        (mtjax.cagrad(num_tasks=3), 1),
        (mtjax.upgrad(num_tasks=3), 1),
        (mtjax.dualproj(num_tasks=3), 1),
        (mtjax.aligned_mtl(num_tasks=3), 1),
        (mtjax.config(num_tasks=3), 1),
      )
    ):
      out_ref, _ = _weights(tx, g, dtype, jit)
      out, _ = _weights(tx, scale * g, dtype, jit)
      np.testing.assert_allclose(out / scale**degree, out_ref, rtol=rtol, atol=rtol * np.max(np.abs(out_ref)))
    # A user's method built without rescale_gram says what happened.
    name = "float64" if x64 else "float32"
    own = mtjax.gram_weighting(
      lambda inputs, state: (jnp.ones(3) / 3, state), lambda params: optax.EmptyState(), method="my_method", num_tasks=3
    )
    with pytest.raises(Exception, match=f"mtjax: my_method: the task gradients' Gram overflows {name}"):
      params = {"w": jnp.zeros(g.shape[1], dtype)}
      update = jax.jit(own.update) if jit else own.update
      jax.block_until_ready(update({"w": jnp.asarray(scale * g, dtype)}, own.init(params), params))


# 3. GradNorm: losses jumping by many orders of magnitude in float32 give finite weights; L(0) is exact.
@pytest.mark.parametrize("initial_loss", ["first_step", "first_epoch_mean"])
def test_point3_gradnorm_huge_loss_jump_and_exact_initial_loss(initial_loss):
  rng = np.random.default_rng(3)
  grads = {"w": jnp.asarray(_jac(rng, 2), jnp.float32)}
  params = {"w": jnp.zeros(6)}
  tx = mtjax.gradnorm(num_tasks=2, layer="all", initial_loss=initial_loss, steps_per_epoch=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for losses in ([1e-3, 1e-3], [1e-3, 1e-3], [1e36, 1e-3], [1e36, 1e-3]):
    out, state = update(grads, state, params, task_losses=jnp.asarray(losses, jnp.float32))
    assert np.all(np.isfinite(np.asarray(out["w"]))), out
    assert np.all(np.isfinite(np.asarray(state.weights))), state.weights
  # The loss that trains slowest (task 0, ratio 1e39 in float32's overflow) gets the larger weight.
  assert state.weights[0] > state.weights[1]
  # L(0) = 1e-8 is recorded as 1e-8, not rounded to 0 through 1 + (1e-8 - 1).
  state = tx.init(params)
  _, state = update(grads, state, params, task_losses=jnp.asarray([1e-8, 2.0], jnp.float32))
  np.testing.assert_array_equal(np.asarray(state.initial_losses), np.asarray([1e-8, 2.0], np.float32))


# 4. NaN/inf in a leaf outside the Gram (task-specific, or outside gradnorm's subset) is detected.
@pytest.mark.parametrize("jit", [False, True])
def test_point4_nonfinite_outside_the_gram_raises(jit):
  rng = np.random.default_rng(4)
  params = {"trunk": {"kernel": jnp.zeros(6)}, "tower": {"kernel": jnp.zeros(4)}}
  grads = {
    "trunk": {"kernel": jnp.asarray(_jac(rng, 3, 6), jnp.float32)},
    "tower": {"kernel": jnp.asarray(_jac(rng, 3, 4), jnp.float32)},
  }
  shared = {"trunk": {"kernel": True}, "tower": {"kernel": False}}
  losses = jnp.ones(3)
  for bad in (np.nan, np.inf):
    g = jax.tree.map(np.array, grads)
    g["tower"]["kernel"][1, 2] = bad
    for tx in (
      mtjax.imtl(num_tasks=3, shared=shared),
      mtjax.pareto_ltr([0.0] * 3, shared=shared),
      mtjax.nash_mtl(num_tasks=3, shared=shared),
      mtjax.fairgrad(2.0, num_tasks=3, shared=shared),
      mtjax.gradnorm(num_tasks=3, shared=shared),
      mtjax.mgda(num_tasks=3, shared=shared),
      mtjax.upgrad(num_tasks=3, shared=shared),
      # the tower is shared but outside gradnorm's Gram subset (the last shared layer is the trunk):
      mtjax.gradnorm(num_tasks=3, layer=lambda paths: [p.startswith("trunk") for p in paths]),
    ):
      update = jax.jit(tx.update) if jit else tx.update
      match = r"mtjax: non-finite task gradients given to .* in the leaves \['tower/kernel'\]"
      with pytest.raises(Exception, match=match):
        jax.block_until_ready(update(g, tx.init(params), params, task_losses=losses))


# 5. DWA: a loss ratio that overflows gives finite weights (no "non-finite task gradients" for finite gradients).
@pytest.mark.parametrize("jit", [False, True])
def test_point5_dwa_ratio_overflow(jit):
  grads = {"w": jnp.eye(2, dtype=jnp.float32)}
  params = {"w": jnp.zeros(2)}
  tx = mtjax.dwa(num_tasks=2, steps_per_epoch=1)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for losses in ([1e-30, 1.0], [1e30, 1.0], [1.0, 1.0]):
    out, state = update(grads, state, params, task_losses=jnp.asarray(losses, jnp.float32))
  np.testing.assert_allclose(np.asarray(out["w"]), [2.0, 0.0], atol=1e-6)
  # A block's average does not overflow although the sum of its losses would.
  tx = mtjax.dwa(num_tasks=2, steps_per_epoch=4)
  state = tx.init(params)
  for _ in range(4):
    _, state = tx.update(grads, state, params, task_losses=jnp.asarray([3e38, 1.0], jnp.float32))
  np.testing.assert_allclose(np.asarray(state.epoch_means[1]), [3e38, 1.0], rtol=1e-6)


# 6. Negative losses: DWA and uncertainty raise (they would mislead silently).
@pytest.mark.parametrize("method", ["dwa", "uncertainty"])
def test_point6_negative_losses_raise(method):
  grads = {"w": jnp.eye(2, dtype=jnp.float32)}
  params = {"w": jnp.zeros(2)}
  tx = mtjax.dwa(num_tasks=2, steps_per_epoch=1) if method == "dwa" else mtjax.uncertainty(num_tasks=2)
  losses = jnp.asarray([1.0, -0.5])
  with pytest.raises(ValueError, match=f"mtjax: {method}: task losses must be nonnegative"):
    tx.update(grads, tx.init(params), params, task_losses=losses)
  with pytest.raises(Exception, match=f"mtjax: {method}: task losses must be nonnegative"):
    jax.block_until_ready(jax.jit(tx.update)(grads, tx.init(params), params, task_losses=losses))


# 7. Nash-MTL / FairGrad: the accuracy the docstrings state (default tol: ~1e-5 relative; tol=1e-20 in float64:
# ~1e-10), and the recorded weights follow the gradients' dtype.
@pytest.mark.parametrize("x64", [False, True])
def test_point7_balance_accuracy_and_weights_dtype(x64):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    for seed in range(3):
      rng = np.random.default_rng(70 + seed)
      jac = _jac(rng, 2 + seed, 12)
      gram = jac @ jac.T
      t = jac.shape[0]
      for tol, bound in ((1e-10, 1e-4), (1e-20, 1e-9 if x64 else 1e-4)):
        for tx, alpha in (
          (mtjax.nash_mtl(num_tasks=t, tol=tol), 1.0),
          (mtjax.fairgrad(2.0, num_tasks=t, tol=tol), 2.0),
          (mtjax.fairgrad(0.5, num_tasks=t, tol=tol), 0.5),
        ):
          params = {"w": jnp.zeros(12, dtype)}
          # One compilation per transform (eager, every solver loop compiled on its own: ~3x longer); the
          # state of init(None) once per transform kind.
          update = jax.jit(tx.update)
          for state0 in (tx.init(params),) + ((tx.init(None),) if seed == 0 and tol == 1e-10 else ()):
            _, state = update({"w": jnp.asarray(jac, dtype)}, state0, params)
            assert state.weights.dtype == dtype, (state.weights.dtype, dtype)
          w = np.asarray(state.weights, np.float64)
          residual = np.max(np.abs((gram @ w) * w ** (1.0 / alpha) - 1.0))
          assert residual < bound, (seed, tol, alpha, residual)
    # The other methods of this file record weights in the gradients' dtype too.
    for tx in (mtjax.imtl(num_tasks=2), mtjax.pareto_ltr([0.0, 0.0])):
      params = {"w": jnp.zeros(3, dtype)}
      _, state = tx.update({"w": jnp.ones((2, 3), dtype)}, tx.init(params), params)
      assert state.weights.dtype == dtype


# Found by the large fuzz (tests/fuzz/fuzz_report.py, family "rank_deficient", T = 8, float32): a
# rank-one Jacobian whose tasks point both ways along one line (a Pareto-stationary point) with a mean
# gradient at float32's rounding floor. CAGrad with c = 1.5 returned d = g0 (weights 1/T), which
# conflicts with four tasks (min_t g_t . d = -0.0073); for c >= 1 the answer is d = 0.
RANK_ONE_F32 = np.array(
  [
    [-0.16870074, 0.4214622, -0.12139901, 0.10581592, 0.1375971, -0.29959792, -0.92744344, -0.18692291],
    [0.45991617, -1.1490008, 0.33096102, -0.288478, -0.37512067, 0.8167713, 2.5284195, 0.5095939],
    [0.0634445, -0.15850233, 0.045655396, -0.03979495, -0.051747132, 0.11267194, 0.34879032, 0.07029744],
    [-0.46147415, 1.1528931, -0.33208215, 0.2894552, 0.37639138, -0.8195381, -2.5369844, -0.5113202],
    [-0.24543947, 0.6131773, -0.17662108, 0.15394954, 0.20018739, -0.43587923, -1.3493197, -0.27195054],
    [0.02571265, -0.064237475, 0.01850312, -0.016128011, -0.020971965, 0.04566344, 0.14135699, 0.028489994],
    [-0.097337045, 0.24317549, -0.07004487, 0.061053723, 0.07939085, -0.17286216, -0.5351168, -0.10785088],
    [0.4267978, -1.0662618, 0.30712864, -0.2677048, -0.34810838, 0.75795597, 2.346349, 0.47289827],
  ],
  np.float32,
)


@pytest.mark.parametrize("c", [1.0, 1.5, 4.0])
def test_point8_cagrad_c_at_least_one_never_conflicts_at_a_stationary_point(c):
  j = RANK_ONE_F32.astype(np.float64)
  g0 = RANK_ONE_F32.mean(axis=0).astype(np.float64)
  assert np.min(j @ g0) < -1e-3  # the mean gradient itself conflicts: the old answer
  tx = mtjax.cagrad(c, num_tasks=8)
  params = {"w": jnp.zeros(8, jnp.float32)}
  update, state = jax.jit(lambda g, s: tx.update(g, s, params))({"w": jnp.asarray(RANK_ONE_F32)}, tx.init(params))
  d = np.asarray(update["w"], np.float64)  # the combined gradient (the optimizer after it descends)
  np.testing.assert_array_equal(d, 0.0)
  np.testing.assert_array_equal(np.asarray(state.weights), 0.0)
  # Away from stationarity the rule does not fire: the same gradients, every task flipped to agree with the first.
  agree = RANK_ONE_F32 * np.sign(RANK_ONE_F32[:, :1]) * np.sign(RANK_ONE_F32[0, 0])
  update, _ = jax.jit(lambda g, s: tx.update(g, s, params))({"w": jnp.asarray(agree)}, tx.init(params))
  d = np.asarray(update["w"], np.float64)
  assert np.min(agree.astype(np.float64) @ d) > 0
