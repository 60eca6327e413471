"""SDMGrad against a plain NumPy float64 reference (the whole weight trajectory), and the conformance checks
of the three-batch variant (the one-batch variant is in the conformance table, ``sdmgrad-1batch``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from tests.transforms import micro_batch_checks as checks
from tests.transforms.test_modo import SHAPES
from tests.transforms.test_modo import SHARED
from tests.transforms.test_modo import np_project_simplex


def sample(m, t, steps, seed):
  """Stochastic gradients: a per-step mean shared by the micro-batches plus independent noise."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    out.append(
      {
        n: {k: rng.normal(size=(1, t) + s) + 0.5 * rng.normal(size=(m, t) + s) for k, s in leaves.items()}
        for n, leaves in SHAPES.items()
      }
    )
  return out


def np_sdmgrad(seq, *, lamda, gamma, steps, momentum, normalize, num_batches):
  """Loops over tasks and leaves: inner heavy-ball projected steps on 1/2 |J^T w + lamda g0|^2 with the cross
  Gram of batches 0 and 1 (or the batch's own Gram), warm started; d = (J_D^T w + lamda g0_D) / (1 + lamda)."""
  t = next(iter(seq[0]["bottom"].values())).shape[1]
  w = np.full(t, 1.0 / t)
  a, b, dirb = (0, 1, 2) if num_batches == 3 else (0, 0, 0)
  out = []
  for grads in seq:
    g = np.zeros((t, t))
    for i in range(t):
      for j in range(t):
        g[i, j] = sum(np.sum(grads["bottom"][k][a, i] * grads["bottom"][k][b, j]) for k in SHAPES["bottom"])
    if normalize:
      s = np.mean([np.sqrt(max(g[i, i], 0.0)) for i in range(t)])
      g = g / s**2 if s > 0 else np.zeros_like(g)
    buf = np.zeros(t)
    for _ in range(steps):
      grad = g @ w + lamda * np.mean(g, axis=1)  # = G (w + lamda 1/T)
      buf = momentum * buf + grad
      w = np_project_simplex(w - gamma * buf)
    update = {}
    for n, leaves in grads.items():
      for k, x in leaves.items():
        acc = np.zeros(x.shape[2:])
        g0 = np.mean(x[dirb], axis=0)
        for i in range(t):
          acc = acc + (w[i] * x[dirb, i] if SHARED[n][k] else x[dirb, i])
        update[(n, k)] = (acc + lamda * g0) / (1 + lamda) if SHARED[n][k] else acc
    out.append((update, w.copy()))
  return out


OPTIONS = [
  dict(num_batches=3),  # the defaults
  dict(num_batches=3, lamda=0.0, gamma=0.3, num_inner_steps=7, momentum=0.0, normalize=False),  # the paper's
  dict(num_batches=3, lamda=1.5, gamma=5.0, momentum=0.5),  # LibMTL's settings
  dict(num_batches=1, lamda=0.3),  # the authors' one-batch code
  dict(num_batches=1, lamda=0.7, gamma=0.2, num_inner_steps=5, momentum=0.3, normalize=False),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_matches_numpy_reference(options):
  full = {**dict(lamda=0.3, gamma=0.5, num_inner_steps=20, momentum=0.0, normalize=True), **options}
  t = 3
  with jax.enable_x64(True):
    seq = sample(full["num_batches"], t, 4, seed=7)
    ref = np_sdmgrad(
      seq,
      lamda=full["lamda"],
      gamma=full["gamma"],
      steps=full["num_inner_steps"],
      momentum=full["momentum"],
      normalize=full["normalize"],
      num_batches=full["num_batches"],
    )
    tx = mtjax.sdmgrad(num_tasks=t, shared=SHARED, **options)
    params = jax.tree.map(lambda s: jnp.zeros(s), SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for k, (grads, (r_update, r_w)) in enumerate(zip(seq, ref)):
      if full["num_batches"] == 1:
        grads = jax.tree.map(lambda x: x[0], grads)
      update, state = step(grads, state, params)
      # LibMTL's large steps amplify rounding (see the docstring): compare them loosely.
      tol = 1e-6 if full["gamma"] >= 5 else 1e-10
      np.testing.assert_allclose(np.asarray(state.weights), r_w, rtol=tol, atol=tol, err_msg=f"step {k}")
      for (n, leaf), r in r_update.items():
        np.testing.assert_allclose(np.asarray(update[n][leaf]), r, rtol=tol, atol=tol, err_msg=f"step {k} {n}")


def test_lamda_zero_converges_to_mgda_and_large_lamda_to_the_mean():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    j = rng.normal(size=(3, 5))
    grads = {"w": jnp.asarray(np.stack([j, j, j]))}
    params = {"w": jnp.zeros(5)}
    tx = mtjax.sdmgrad(num_tasks=3, lamda=0.0, gamma=0.2, num_inner_steps=3000)
    d, state = tx.update(grads, tx.init(params), params)
    w = np.asarray(state.weights)
    # KKT of the min-norm point: (G w)_i = w^T G w on the support, >= elsewhere.
    gw = j @ j.T @ w
    assert np.all(gw >= w @ gw - 1e-8) and np.allclose(gw[w > 1e-8], w @ gw, atol=1e-8)
    tx = mtjax.sdmgrad(num_tasks=3, lamda=1e6)
    d, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(d["w"]), j.mean(axis=0), rtol=1e-5)


@pytest.mark.slow  # compiles task_grads and jacrev (~10 s)
def test_end_to_end_with_micro_batch_task_grads():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(3,)))}
    batch = {"x": jnp.asarray(rng.normal(size=(9, 3))), "y": jnp.asarray(rng.normal(size=(9, 2)))}

    def loss_fn(p, b):
      z = jnp.tanh(b["x"] @ p["w"])
      return jnp.mean((z[:, None] - b["y"]) ** 2, axis=0)

    _, grads = jax.jit(mtjax.micro_batch_task_grads(mtjax.task_grads(loss_fn), 3))(params, batch)
    tx = mtjax.sdmgrad(num_tasks=2, lamda=0.3)
    d, state = tx.update(grads, tx.init(params), params)
    jacs = jax.jit(
      lambda p, b: [jax.jacrev(loss_fn)(p, jax.tree.map(lambda x: x[3 * m : 3 * m + 3], b))["w"] for m in range(3)]
    )(params, batch)
    jac = [np.asarray(x) for x in jacs]
    w = np.full(2, 0.5)
    g = jac[0] @ jac[1].T
    g = g / np.mean(np.sqrt(np.maximum(np.diag(g), 0.0))) ** 2
    for _ in range(20):
      w = np_project_simplex(w - 0.5 * (g @ (w + 0.15)))
    np.testing.assert_allclose(np.asarray(state.weights), w, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(d["w"]), (jac[2].T @ w + 0.3 * jac[2].mean(0)) / 1.3, rtol=1e-9)


FACTORY = mtjax.sdmgrad
STATIC = ("num_tasks", "num_batches", "num_inner_steps", "normalize")


def test_chain_extra_args_no_retrace():
  checks.check_chain_extra_args_no_retrace(FACTORY, 3)


def test_inject_hyperparams():
  checks.check_inject_hyperparams(FACTORY, 3, dict(lamda=0.4, gamma=0.3, momentum=0.2), static=STATIC)


def test_float32_and_float64():
  checks.check_float32_float64(FACTORY, 3)


def test_edge_gradients():
  checks.check_edge_gradients(FACTORY, 3, degree_one=True)  # normalize=True: w is scale free


def test_one_and_many_tasks():
  checks.check_task_counts(FACTORY, 3)


def test_toy_convergence():
  checks.check_toy_convergence(FACTORY, 3)


def test_bad_input():
  checks.check_bad_input(FACTORY, 3, "sdmgrad")
  with pytest.raises(ValueError, match="mtjax: sdmgrad: num_inner_steps"):
    FACTORY(num_tasks=2, num_inner_steps=-1)
  with pytest.raises(ValueError, match="mtjax: sdmgrad: normalize"):
    FACTORY(num_tasks=2, normalize=1)


def test_nonfinite_inputs_raise():
  checks.check_nonfinite(FACTORY, 3, "sdmgrad")


def test_state_contract():
  checks.check_state_contract(FACTORY, 3, mtjax.SDMGradState)


@pytest.mark.slow  # imports the experiment registry
def test_registry_entry_is_the_paper_and_num_batches_1_the_code():
  """The registry's ``sdmgrad`` is the paper's three-batch form (the runner feeds it three micro-batches);
  ``num_batches = 1`` in a config gives the authors' one-batch code on the plain [T, ...] gradients."""
  from mtjax import experiment
  from mtjax.experiment import _config
  from mtjax.experiment import _registry

  assert _registry.METHODS["sdmgrad"] is mtjax.sdmgrad
  raw = {"data": {"name": "conflicting"}, "model": {"name": "mmoe"}, "train": {"batch_size": 32}}
  assert _config.micro_batches(experiment.from_dict({**raw, "method": {"name": "sdmgrad"}})) == 3
  cfg = experiment.from_dict({**raw, "method": {"name": "sdmgrad", "num_batches": 1}})
  assert _config.micro_batches(cfg) == 1
  tx = _registry.METHODS["sdmgrad"](num_tasks=2, num_batches=1)
  params = {"w": jnp.zeros(3)}
  d, _ = tx.update({"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(d["w"]), [0.5, 0.5, 0.0], rtol=1e-6)
