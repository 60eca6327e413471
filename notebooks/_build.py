"""Generates the notebooks of this folder with nbformat (run: ``python notebooks/_build.py``).

The notebooks are committed without outputs; edit them here, not in Jupyter, so they stay valid
and reviewable. Each reads ``MTJAX_FAST=1`` from the environment to use its script's fast
setting (CI executes them that way, see ``tests/research/test_notebooks.py``).
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
import os
import sys

FAST = os.environ.get("MTJAX_FAST", "0") == "1"  # MTJAX_FAST=1: the tiny CI setting

# The ablation code lives in research/ next to this folder: make it importable.
root = os.getcwd()
while not os.path.exists(os.path.join(root, "research", "_common.py")) and os.path.dirname(root) != root:
  root = os.path.dirname(root)
sys.path.insert(0, os.path.join(root, "research"))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import matplotlib.pyplot as plt
import mtjax

from IPython.display import display

%matplotlib inline


def show(fig):
  """Displays a figure whatever the backend (some mtjax plotting helpers select Agg) and closes it."""
  display(fig)
  plt.close(fig)


print("fast setting" if FAST else "full setting", "| jax", jax.__version__, "| mtjax", mtjax.__version__)'''


def md(text: str):
  return v4.new_markdown_cell(text.strip("\n"))


def code(text: str):
  return v4.new_code_cell(text.strip("\n"))


def notebook(cells) -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  for i, cell in enumerate(cells):
    cell["id"] = f"cell-{i:02d}"  # deterministic ids: rebuilding gives identical files
  nb.cells = cells
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  return nb


def mmoe_synthetic() -> nbformat.NotebookNode:
  return notebook(
    [
      md(r"""
# MMoE synthetic ablation: does task correlation decide who wins?

Ma et al. (*Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts*,
KDD 2018) built a synthetic benchmark in which the **correlation of two regression tasks is a
knob**, and trained three architectures on it:

* **Shared-Bottom**: one shared layer under two towers (hard parameter sharing);
* **OMoE**: 8 experts mixed by *one* softmax gate shared by both tasks;
* **MMoE**: the same experts, one gate *per task*.

They report three trends: (1) every model does better when the tasks are more correlated;
(2) MMoE's loss grows the least as the correlation drops; (3) both MoE models beat Shared-Bottom.
This notebook reproduces the experiment with `mtjax` and tests the three claims with paired
comparisons across seeds. The code is in `research/mmoe_synthetic_ablation.py`; the notebook
calls it and tells the story.
"""),
      code(SETUP),
      md(r"""
## The data

`mtjax.data.mmoe_synthetic(n, p)` draws two orthonormal vectors $u_1, u_2$, sets
$w_1 = u_1$, $w_2 = p\,u_1 + \sqrt{1-p^2}\,u_2$ (so $\cos(w_1, w_2) = p$) and
$y_k = w_k^\top x + \sum_{i=1}^{10} \sin(\alpha_i w_k^\top x + \beta_i) + \epsilon$.
The sines make the label correlation lower than $p$ and the tasks non-linear. A seed fixes
$u, \alpha, \beta, x$ at every $p$: task 1's labels are the same at every correlation and only its
companion task changes, so the correlations can be compared seed by seed. Seeds differ a lot in
the size and offset of their labels, which is why the script standardizes the labels and reports
the loss as a fraction of the label variance (NMSE).
"""),
      code(r'''
for p in (0.5, 0.9, 1.0):
  ds = mtjax.data.mmoe_synthetic(5000, p, seed=0, noise=0.1)
  r = np.corrcoef(ds.labels)[0, 1]
  print(f"p = {p:.1f}: Pearson correlation of the two labels = {r:.3f}")
for seed in range(4):
  y = mtjax.data.mmoe_synthetic(5000, 0.5, seed=seed, noise=0.1).labels[0]
  print(f"seed {seed}: task-1 label mean {y.mean():+.2f}, standard deviation {y.std():.2f}")
'''),
      md(r"""
## The models and their sizes

The paper's sizes: 8 experts of one 16-unit ReLU layer, towers of one 8-unit layer, and a
113-unit shared bottom so that Shared-Bottom has about as many parameters as the MoE models.
`jax.eval_shape` counts parameters without running anything.
"""),
      code(r'''
import mmoe_synthetic_ablation as ablation

cfg = ablation.FAST if FAST else ablation.FULL
x = jnp.zeros((2, ablation.FULL.dim))
for name, model in ablation.build_models(ablation.FULL).items():
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  print(f"{name:14s} {ablation.count_params(shapes):6d} parameters")
'''),
      md(r"""
## Training

Every run is `optax.chain(mtjax.linear(num_tasks=2), adam)` on per-task gradients from
`mtjax.task_grads` (for plain linear scalarization this is just the gradient of the summed MSE).
All (correlation, seed, learning rate) replicas of one model train at once with `jax.vmap`
inside one `lax.scan`, so each model compiles once. As in the paper, each seed draws a fresh data
set and initialisation, and the Adam learning rate is picked per model (one rate for all
correlations) from the paper's grid on a validation split. The losses are reported at the end of
training and averaged over the learning curve (the paper compares whole curves).
"""),
      code(r'''
res = ablation.run(cfg)
print(ablation.report(res))
'''),
      md(r"""
## Learning curves

The paper's figure: test loss over training, one curve per correlation. Lower is better; in the
paper's picture the lower-correlation curves lie above the higher ones for every model.
"""),
      code(r'''
fig = ablation.plot_learning_curves(res, split="test")
show(fig)
'''),
      md(r"""
The same comparison seed by seed: the geometric mean over seeds of loss($p$) / loss(1.0) on the
same data, with a band of two standard errors. Above 1 means the model does worse on the less
correlated tasks.
"""),
      code(r'''
fig = ablation.plot_correlation_gap(res)
show(fig)
fig = ablation.plot_loss_vs_correlation(res)
show(fig)
'''),
      md(r"""
## Do the paper's trends hold?

Each claim is tested on paired runs (same seed: same data draws, initialisation and mini-batch
order), on the log ratio of the two losses: its mean over seeds ± standard error, and in how many
seeds the claim holds. "yes" needs the mean at least two standard errors from 0.
"""),
      code(r'''
for metric, label in ablation.METRICS.items():
  print(f"{label}:")
  print(ablation.verdict(res, metric))
print(ablation.seed_caveat(res))  # generated from the number of seeds: empty when a test can show an effect
'''),
      md(r"""
With the fast setting (`MTJAX_FAST=1`) the models are tiny, barely trained and run on two seeds,
so the verdict is meaningless there; the full setting's numbers, and a reading of which trends
hold, are recorded in `research/README.md`.
"""),
    ]
  )


def method_comparison() -> nbformat.NotebookNode:
  return notebook(
    [
      md(r"""
# Gradient methods on conflicting tasks

When tasks share parameters their gradients can point in opposing directions. Gradient-level
MTL methods combine the per-task gradients differently: **linear** scalarization sums them;
**PCGrad** projects away conflicting components; **GradVac** aligns them toward a learned target
similarity; **MGDA** takes the min-norm point of their convex hull; **PE-LTR** does the same
under per-task lower bounds; **GradNorm**, **DWA** and **uncertainty weighting** learn task weights.
In `mtjax` every method is an optax transform that takes per-task gradients and returns one
update, so they are swapped by changing one line.
"""),
      code(SETUP),
      md(r"""
## One step by hand

Per-task gradients in (`mtjax.task_grads`), one update out (`optax.chain(method, optimizer)`).
The data set `mtjax.data.conflicting_tasks` has three binary tasks: tasks 0 and 1 agree and task 2
conflicts with both, which the gradient cosines already show at initialisation.
"""),
      code(r'''
ds = mtjax.data.conflicting_tasks(num_samples=2000, seed=0)
model = mtjax.models.MMoE(num_tasks=3, num_experts=2, expert=(8,), tower=(4, 1), features=ds.spec)
batch = ds.batch(np.arange(512))
params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["x"])["params"]
loss_fn = mtjax.losses.make_loss_fn(model, "bce", has_aux=False)
losses, grads = jax.jit(mtjax.task_grads(loss_fn))(params, batch)  # jit: eager op-by-op is slow

shared = mtjax.models.partition(model)  # the model's declared shared parameters: experts, embeddings
print("task losses:", np.round(losses, 4))
print("task-gradient cosines (shared parameters):")
print(np.round(mtjax.analysis.cosine_similarity(grads, shared=shared)[0], 3))

tx = optax.chain(mtjax.pcgrad(key=0, num_tasks=3, shared=shared), optax.adam(1e-3))
state = tx.init(params)
updates, state = jax.jit(tx.update)(grads, state, params, task_losses=losses)
params = optax.apply_updates(params, updates)
print("PCGrad task coefficients of this step:", np.round(state[0].weights, 3))
'''),
      md(r"""
## The comparison

`research/method_comparison.py` runs `mtjax.experiment.compare` (the engine of `mtjax compare`):
every method trains the same MMoE on the same split, several seeds each. Its data set is the
ranking-system seesaw: the two binary tasks above plus, in place of the third, a watch-time-like
**regression** task on a 10x scale that conflicts with them (`task_types=("binary", "binary",
"regression")`). Its squared-error gradients are ~100x larger, so plain summed losses let it
dominate the shared parameters. The table has the test AUC of the binary tasks, the test MSE of
the regression task, the macro AUC, $\Delta_m\%$ against linear scalarization over all tasks,

$$\Delta_m\% = \frac{100}{T}\sum_t (-1)^{l_t}\frac{M_t - M_t^{\text{linear}}}{M_t^{\text{linear}}}, \qquad l_t = 1 \text{ for the MSE (lower is better)},$$

and the median milliseconds per training step (per-task gradients included).
"""),
      code(r'''
import copy
import tempfile
import method_comparison as comparison

setting = copy.deepcopy(comparison.FAST if FAST else comparison.FULL)
if FAST:
  setting["methods"] = ["linear", "pcgrad"]  # keep CI short
res = comparison.run(setting, out_dir=tempfile.mkdtemp())
'''),
      code(r'''
fig = comparison.plot_summary(res)
show(fig)
'''),
      md(r"""
## Conflict over training and the weights each method chose

The conflict fraction is the share of task pairs whose whole-model gradient cosine is negative;
it is logged by the training loop from the same per-task gradients (no second backward).
The weights are what each method's state recorded at every logged step.
"""),
      code(r'''
fig = comparison.plot_conflict(res)
show(fig)
fig = comparison.plot_weights(res)
show(fig)
'''),
      md(r"""
## What this run shows

Every method compares the tasks on the model's shared parameters (`mtjax.models.partition`,
passed by `compare`; the towers and gates are task-specific). `comparison.run` goes through
`mtjax.experiment.compare_grid`, which pairs every method with linear scalarization **seed by
seed** (same data split, same initialisation): the per-seed differences of each task's metric and
of $\Delta_m\%$, their mean ± standard error, the wins / losses / ties across seeds and an exact
sign-flip test. The sentences below are generated from this run's numbers
(`GridResult.conclusions()`), so they hold for whichever setting ran: with one seed (the fast
setting) there is no test and they say so; with three seeds (the full setting) the smallest
possible p-value is 0.25, so "beats linear in all 3 seeds" is the strongest statement it can
support. The full setting's tables, with more methods, and a reading of them are recorded in
`research/README.md`.
"""),
      code(r'''
paired = res["grid"]
print(paired.table())
print()
print(paired.conclusions())
fig = paired.plot()
show(fig)
'''),
    ]
  )


def gradient_similarity() -> nbformat.NotebookNode:
  return notebook(
    [
      md(r"""
# Task-gradient similarity over training and across layers

GradVac (Wang et al., *Gradient Vaccine*, ICLR 2021) is motivated by observations on
multilingual models: the cosine similarity between task gradients **settles to a level** after
the first phase of training, that level **differs between layers**, and it is **higher for more
related tasks**. We measure all three with `mtjax.analysis` on a Shared-Bottom network trained on
the two regression tasks of `mtjax.data.mmoe_synthetic`, whose relatedness is a knob (the cosine
$p$ of the two tasks' weight vectors).
"""),
      code(SETUP),
      md(r"""
## Similarity per layer from one set of per-task gradients

`mtjax.analysis.cosine_similarity` turns the per-task gradients into one $T \times T$ cosine
matrix per parameter group, from per-leaf Gram matrices (no concatenation, no second backward).
The groups can be the whole model, each layer, each leaf, or any function of the parameter paths;
here: each shared layer from the input up (the towers are task-specific, so they are left out
with `shared=`).
"""),
      code(r'''
import gradient_similarity as gs

cfg = gs.FAST if FAST else gs.FULL
ds = mtjax.data.mmoe_synthetic(2048, 0.5, dim=cfg.dim, seed=0)
model = mtjax.models.SharedBottom(num_tasks=2, bottom=cfg.bottom, tower=cfg.tower)
batch = ds.batch(np.arange(512))
params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["x"])["params"]
loss_fn = mtjax.losses.make_loss_fn(model, "mse", has_aux=False)
losses, grads = jax.jit(mtjax.task_grads(loss_fn))(params, batch)
shared = mtjax.models.partition(model)  # the towers are task-specific
cos = mtjax.analysis.cosine_similarity(grads, granularity=gs.depth_groups, shared=shared)
print("per-layer cosine of the two task gradients at initialisation:", np.round(cos[:, 0, 1], 3))
print("gradient norms per layer and task:")
print(np.round(mtjax.analysis.gradient_norms(grads, granularity=gs.depth_groups, shared=shared), 3))
'''),
      md(r"""
## Tracking during training

Inside the jitted step, `mtjax.analysis.track(grads, direction, granularity=..., shared=...)`
returns the cosine matrices per group, the conflict indicator, gradient norms and the alignment
$\cos(g_t, d)$ of every task with the method's combined direction $d$ (the view after the
method's surgery). `research/gradient_similarity.py` trains with `linear` and `pcgrad` at several
task correlations and seeds, and collects the statistics in `mtjax.analysis.SimilarityHistory`.
"""),
      code(r'''
res = gs.run(cfg)
print(gs.layer_table(res))
print()
print(gs.observations(res))
'''),
      code(r'''
fig = gs.plot_over_steps(res)
show(fig)
fig = gs.plot_by_correlation(res)
show(fig)
'''),
      md(r"""
## Depth x training time

The same numbers as a heatmap: each row is a shared layer, each column a block of steps. After a
transient, every row keeps its own colour: one global similarity target (as PCGrad's zero, or a
single GradVac target) would be wrong for some layers, which is why GradVac keeps one target per
layer.
"""),
      code(r'''
fig = gs.plot_layer_step_heatmap(res)
show(fig)
fig = gs.plot_heatmaps(res)
show(fig)
'''),
      md(r"""
## After the method's surgery

How well does the update direction serve every task, and how often do the two task gradients
conflict (negative whole-model cosine)? PCGrad only changes the steps with a conflict.
"""),
      code(r'''
print(gs.alignment_table(res))
fig = gs.plot_alignment(res)
show(fig)
'''),
      md(r"""
A caveat on data: with Bernoulli labels (e.g. `mtjax.data.conflicting_tasks`), once the model
reaches the noise floor the mini-batch gradients are dominated by independent label noise and all
cosines decay to about zero; the low-noise regression tasks keep a systematic residual, as large
models on large data do. The full run's tables are in `research/README.md`.
"""),
    ]
  )


def toy_landscape() -> nbformat.NotebookNode:
  return notebook(
    [
      md(r"""
# The two-task toy landscape of CAGrad and Nash-MTL

Liu et al. (*Conflict-Averse Gradient Descent*, NeurIPS 2021) and Navon et al. (*Multi-Task
Learning as a Bargaining Game*, ICML 2022) illustrate MTL optimisers on two objectives over
$x \in \mathbb R^2$:

$$L_i(x) = c_+(x_2)\, g_i(x) + c_-(x_2)\, h_i(x),\qquad c_\pm = \max(\tanh(\pm x_2/2), 0),$$

$$g_1 = \log\max(|\tfrac12(-x_1-7) - \tanh(-x_2)|, \epsilon) + 6,\quad
g_2 = \log\max(|\tfrac12(-x_1+3) + \tanh(-x_2) + 2|, \epsilon) + 6,$$

$$h_1 = \tfrac{1}{10}\big((x_1-7)^2 + 0.1(x_2+8)^2\big) - 20,\quad
h_2 = \tfrac{1}{10}\big((x_1+7)^2 + 0.1(x_2+8)^2\big) - 20 .$$

The upper half-plane has a narrow logarithmic valley per task; the lower half-plane two
quadratic bowls, and the Pareto set is (nearly) the segment $x_1 \in [-7, 7]$ at $x_2 \approx -8$.
"""),
      code(SETUP),
      code(r'''
import toy_landscape as toy

cfg = toy.FAST if FAST else toy.FULL
t = np.linspace(-10, 10, 300)
xx = np.stack(np.meshgrid(t, t, indexing="xy"), -1)
L = toy.toy_losses(xx, xp=np)
front, front_points = toy.pareto_front(cfg.grid)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, z, title in zip(axes[:2], L, ["$L_1$", "$L_2$"]):
  cs = ax.contourf(t, t, z, levels=30, cmap="viridis")
  ax.plot(front_points[:, 0], front_points[:, 1], "r.", ms=1)
  ax.set_title(title)
  fig.colorbar(cs, ax=ax)
axes[2].plot(front[:, 0], front[:, 1], "r")
axes[2].set_xlabel("$L_1$")
axes[2].set_ylabel("$L_2$")
axes[2].set_title("Pareto front")
show(fig)
'''),
      md(r"""
## One trajectory with the public API

A method is the first element of an optax chain; the toy's "per-task gradients" are the two
rows of the Jacobian, which `mtjax.task_grads` computes from a function returning the two losses.
"""),
      code(r'''
tx = optax.chain(mtjax.mgda(num_tasks=2), optax.adam(cfg.learning_rate))
grad_fn = mtjax.task_grads(lambda x: toy.toy_losses(x))

@jax.jit
def descend(x):
  def step(carry, _):
    x, state = carry
    losses, grads = grad_fn(x)
    updates, state = tx.update(grads, state, x, task_losses=losses)
    return (optax.apply_updates(x, updates), state), x
  _, xs = jax.lax.scan(step, (x, tx.init(x)), None, length=cfg.steps)
  return xs

xs = np.asarray(descend(jnp.array([-8.5, 7.5])))
print("MGDA from (-8.5, 7.5) ends at", xs[-1].round(3), "with losses", toy.toy_losses(xs[-1], xp=np).round(3))
'''),
      md(r"""
## Several methods from several starting points

Linear scalarization (sum of gradients), PCGrad, GradVac, MGDA and PE-LTR (the fast setting runs
a subset), from CAGrad's three starting points plus two more. A final point "reached the
front" when no point of the brute-force Pareto front is better in both losses by more than a
small tolerance. Methods that weight tasks by loss values (DWA, uncertainty, GradNorm) are left
out: the losses here are negative.
"""),
      code(r'''
res = toy.run(cfg)
print(toy.table(res))
'''),
      code(r'''
fig = toy.plot_trajectories(res)
show(fig)
fig = toy.plot_loss_space(res)
show(fig)
'''),
      md(r"""
What to look for: with CAGrad's small Adam step, averaged gradients (linear) and the methods
that stay close to them follow one task's valley in the upper half-plane and can stall there,
while MGDA, which always moves along a common descent direction, leaves the valleys and stops
at the first Pareto-stationary point it meets -- often an end of the front rather than a
balanced trade-off. The next cell counts, from this run's numbers, how often each method reached
the front, and checks the one claim made without a "can": MGDA ends on the front from every
starting point. The full run's table is in `research/README.md`.
"""),
      code(r'''
for m, r in res["methods"].items():
  print(f"{m}: reached the Pareto front from {int(np.sum(r['reached']))} of {len(r['reached'])} starting points")
assert res["methods"]["mgda"]["reached"].all(), "the text above says MGDA reaches the front from every start"
'''),
    ]
  )


def position_bias() -> nbformat.NotebookNode:
  return notebook(
    [
      md(r"""
# Position debiasing with a shallow tower (YouTube ranker)

Zhao et al. (*Recommending What Video to Watch Next: A Multitask Ranking System*, RecSys 2019)
train their ranker on logged impressions, where a video shown higher is clicked more because of
its position. They add a **shallow tower** over the selection-bias features (position, device)
whose logit is added to the engagement logits in training, drop the position in 10% of the
training samples, and leave the tower out at serving. `mtjax.models.YouTubeRanker` is that model.

`mtjax.data.position_bias_synthetic` generates logged impressions whose positions an earlier
ranker chose, promoting some items for reasons unrelated to relevance:

$$\mathrm{pCTR} = \sigma(b_c + \gamma r - \lambda_v\,\mathrm{pos}),$$

with $r$ the relevance and $\lambda_v$ the position slope of device $v$. Because the data hides
nothing from us, the served scores can be checked against the position-free click-through
$\sigma(b_c + \gamma r)$, which logged data never shows.
"""),
      code(SETUP),
      code(r"""
import position_bias as pb
from mtjax import data

ds = data.position_bias_synthetic(20000, seed=0)
pos = ds.features["position"]
ctr = [float(ds.labels[0][pos == p].mean()) for p in range(8)]
fig, ax = plt.subplots(figsize=(4.5, 2.8))
ax.bar(range(8), ctr, color="0.4")
ax.set_xlabel("position (0 = top)")
ax.set_ylabel("logged click rate")
ax.set_title("clicks fall with the position", fontsize=9)
show(fig)
corr = np.corrcoef(ds.extras["promotion"], pos)[0, 1]
print("correlation of the earlier ranker's promotion with the position:", round(float(corr), 3))
"""),
      md(r"""
## Three models on the same logged clicks

`mmoe` (no bias features), `mmoe+position` (position and device as ordinary inputs, served at
position 0) and `youtube` (the shallow tower, served without it), trained with the same
experts, towers and Adam steps, scored on a held-out split against counterfactual clicks drawn
from the position-free click-through. Seeds are paired (`mtjax.experiment.paired_stats`).
"""),
      code(r"""
setting = pb.FAST if FAST else pb.FULL
res = pb.run(setting)
per_model, paired, stats = pb.tables(res)
print(per_model)
print()
print(paired)
print()
print(pb.conclusion(res, stats))
"""),
      code(r"""
show(pb.plot(res))
"""),
      md(r"""
The conclusion above is generated from this run's paired statistics, so it says what these
numbers support; in the fast setting (one seed, 150 steps) they establish nothing. The full
setting's table (8 seeds, 3,000 steps) is in `research/README.md`.

Serving in your own code: `model.apply(variables, features, serving=True)` (the bias features
need not be in the batch), or read `aux["debiased"]` from a training-mode call.
"""),
    ]
  )


NOTEBOOKS = {
  "01_mmoe_synthetic_ablation.ipynb": mmoe_synthetic,
  "02_method_comparison.ipynb": method_comparison,
  "03_gradient_similarity.ipynb": gradient_similarity,
  "04_toy_landscape.ipynb": toy_landscape,
  "05_position_bias.ipynb": position_bias,
}


def build() -> dict:
  """``{file name: notebook}`` of every notebook (validated, no outputs)."""
  out = {}
  for name, fn in NOTEBOOKS.items():
    nb = fn()
    nbformat.validate(nb)
    out[name] = nb
  return out


def main(argv=None) -> None:
  for name, nb in build().items():
    path = os.path.join(HERE, name)
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
  main(sys.argv[1:])
