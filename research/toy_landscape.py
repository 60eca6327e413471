r"""Which gradient methods reach the Pareto front of the classic two-task toy landscape?

The toy of Liu et al. (CAGrad, NeurIPS 2021) and Navon et al. (Nash-MTL, ICML 2022): two
objectives on :math:`x = (x_1, x_2) \in \mathbb R^2`,

.. math::
  L_i(x) = c_+(x_2)\, g_i(x) + c_-(x_2)\, h_i(x), \qquad
  c_+ = \max(\tanh(x_2 / 2), 0), \quad c_- = \max(\tanh(-x_2 / 2), 0),

  g_1 = \log\max(|\tfrac12(-x_1 - 7) - \tanh(-x_2)|, \epsilon) + 6, \quad
  g_2 = \log\max(|\tfrac12(-x_1 + 3) + \tanh(-x_2) + 2|, \epsilon) + 6,

  h_1 = \big((x_1 - 7)^2 + 0.1 (x_2 + 8)^2\big)/10 - 20, \quad
  h_2 = \big((x_1 + 7)^2 + 0.1 (x_2 + 8)^2\big)/10 - 20,

with :math:`\epsilon = 5 \cdot 10^{-6}`. The upper half-plane holds two narrow logarithmic valleys
(one per task, curved by the ``tanh``), the lower half-plane two quadratic bowls centred at
:math:`(\pm 7, -8)`; the Pareto set is (close to) the segment :math:`x_1 \in [-7, 7]` near
:math:`x_2 = -8`, where :math:`L_1, L_2 \approx -20 \ldots -0.4`. Averaged gradient descent is
pulled along one task's valley and can end at an extreme of the front or stall in the valleys;
MGDA-like methods stop as soon as they are Pareto-stationary.

Every method runs as ``optax.chain(method, optax.adam(lr))`` from the same starting points
(CAGrad's three, ``(-8.5, 7.5)``, ``(-8.5, -5)``, ``(9, 9)``, plus ``(0, 0)`` and ``(9, -1)``), with
CAGrad's Adam rate 1e-3 and 100k steps in the full setting. Methods whose weights come from
loss *values* (DWA, uncertainty weighting, GradNorm's loss ratios) are left out: the losses here
are negative, where their loss ratios and log-variances have no meaning.

"Reached the front": the final loss pair is not dominated by more than ``tol`` by any point
of the Pareto front, which is computed by brute force on a dense grid of the square
``[-10, 10]^2`` (dominance gap ``max_f min(L1 - f1, L2 - f2) <= tol``).

Run: ``python research/toy_landscape.py [--fast] [--out DIR]``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mtjax  # noqa: E402
from mtjax._src.plotting import grid  # noqa: E402
from mtjax._src.plotting import legend_outside  # noqa: E402
from mtjax._src.plotting import method_colors  # noqa: E402

NAME = "toy_landscape"
EPS = 5e-6
INITS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (0.0, 0.0), (9.0, -1.0))


@dataclasses.dataclass(frozen=True)
class Config:
  methods: tuple = ("linear", "pcgrad", "gradvac", "mgda", "pareto_ltr")
  inits: tuple = INITS
  steps: int = 100_000
  learning_rate: float = 1e-3
  record_every: int = 100
  tol: float = 0.05  # dominance gap (loss units) accepted as "on the front"
  grid: int = 1601  # points per axis of the brute-force Pareto-front grid
  fast_compile: bool = False


FULL = Config()
FAST = Config(
  methods=("linear", "pcgrad", "mgda"),
  steps=3000,
  learning_rate=1e-2,
  record_every=20,
  grid=801,
  tol=0.25,
  fast_compile=True,
)


def toy_losses(x, xp=jnp):
  """``[2, ...]`` task losses at points ``x[..., 2]`` (``xp``: ``jax.numpy`` or ``numpy``)."""
  x1, x2 = x[..., 0], x[..., 1]
  c_pos = xp.maximum(xp.tanh(0.5 * x2), 0.0)
  c_neg = xp.maximum(xp.tanh(-0.5 * x2), 0.0)
  g1 = xp.log(xp.maximum(xp.abs(0.5 * (-x1 - 7.0) - xp.tanh(-x2)), EPS)) + 6.0
  g2 = xp.log(xp.maximum(xp.abs(0.5 * (-x1 + 3.0) + xp.tanh(-x2) + 2.0), EPS)) + 6.0
  h1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
  h2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
  return xp.stack([c_pos * g1 + c_neg * h1, c_pos * g2 + c_neg * h2])


def make_method(name: str):
  """The mtjax transform of a method name (first element of the optax chain)."""
  factories = {
    "linear": lambda: mtjax.linear(num_tasks=2),
    "pcgrad": lambda: mtjax.pcgrad(key=0, num_tasks=2),
    "gradvac": lambda: mtjax.gradvac(key=0, num_tasks=2),
    "mgda": lambda: mtjax.mgda(num_tasks=2),
    "pareto_ltr": lambda: mtjax.pareto_ltr(lower_bounds=[0.2, 0.2]),
  }
  if name not in factories:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(factories)}")
  return factories[name]()


def trajectories(method: str, cfg: Config) -> np.ndarray:
  """``[num_inits, num_records + 1, 2]`` points visited by ``optax.chain(method, adam)``."""
  tx = optax.chain(make_method(method), optax.adam(cfg.learning_rate))
  grad_fn = mtjax.task_grads(lambda x: toy_losses(x))
  record = cfg.record_every

  def run(x0):
    def inner(carry, _):
      x, state = carry
      losses, grads = grad_fn(x)
      updates, state = tx.update(grads, state, x, task_losses=losses)
      return (optax.apply_updates(x, updates), state), None

    def outer(carry, _):
      carry, _ = jax.lax.scan(inner, carry, None, length=record)
      return carry, carry[0]

    _, xs = jax.lax.scan(outer, (x0, tx.init(x0)), None, length=cfg.steps // record)
    return jnp.concatenate([x0[None], xs])

  run = jax.jit(run, **_common.jit_kwargs(cfg.fast_compile))
  return np.stack([np.asarray(run(jnp.asarray(x0, jnp.float32))) for x0 in cfg.inits])


def pareto_front(grid: int = 1601, lim: float = 10.0):
  """Brute-force Pareto front on a ``grid x grid`` lattice of ``[-lim, lim]^2`` (float64).

  Returns ``(losses [P, 2], points [P, 2])`` of the non-dominated lattice points, sorted by ``L1``.
  """
  t = np.linspace(-lim, lim, grid)
  xx = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
  ls = toy_losses(xx, xp=np).T  # [N, 2]
  order = np.lexsort((ls[:, 1], ls[:, 0]))
  ls, xx = ls[order], xx[order]
  keep = ls[:, 1] < np.minimum.accumulate(np.concatenate([[np.inf], ls[:-1, 1]]))
  return ls[keep], xx[keep]


def dominance_gap(losses: np.ndarray, front: np.ndarray) -> np.ndarray:
  """``max_f min(L1 - f1, L2 - f2)``: > 0 when a front point is better in both losses by that much."""
  losses = np.atleast_2d(losses)
  return np.max(np.minimum(losses[:, None, 0] - front[None, :, 0], losses[:, None, 1] - front[None, :, 1]), axis=1)


def run(cfg: Config = FULL, *, log=print) -> dict:
  front, front_points = pareto_front(cfg.grid)
  out = {"config": dataclasses.asdict(cfg), "front": front, "front_points": front_points, "methods": {}}
  for m in cfg.methods:
    with _common.Timer() as t:
      traj = trajectories(m, cfg)
    final = traj[:, -1]
    losses = toy_losses(final, xp=np).T  # [I, 2]
    gap = dominance_gap(losses, front)
    out["methods"][m] = {
      "trajectories": traj,
      "final": final,
      "final_losses": losses,
      "gap": gap,
      "reached": gap <= cfg.tol,
      "seconds": t.seconds,
    }
    log(f"  {m}: {int(np.sum(gap <= cfg.tol))}/{len(cfg.inits)} reached the front ({t.seconds:.1f} s)")
  return out


def table(res: dict) -> str:
  inits = res["config"]["inits"]
  header = ["method"] + [f"from ({a:g}, {b:g})" for a, b in inits] + ["reached"]
  rows = []
  for m, r in res["methods"].items():
    cells = [m]
    for (l1, l2), ok in zip(r["final_losses"], r["reached"]):
      cells.append(f"({l1:.2f}, {l2:.2f}) {'front' if ok else 'no'}")
    cells.append(f"{int(np.sum(r['reached']))}/{len(inits)}")
    rows.append(cells)
  return _common.markdown_table(header, rows)


def _contour(ax, lim=10.0, n=300):
  t = np.linspace(-lim, lim, n)
  xx = np.stack(np.meshgrid(t, t, indexing="xy"), -1)
  ls = toy_losses(xx, xp=np)
  mean = ls.mean(0)
  ax.contourf(t, t, mean, levels=np.unique(np.quantile(mean, np.linspace(0, 1, 25))), cmap="Greys_r", alpha=0.55)
  ax.contour(t, t, ls[0], levels=12, colors="tab:blue", linewidths=0.4, alpha=0.5)
  ax.contour(t, t, ls[1], levels=12, colors="tab:orange", linewidths=0.4, alpha=0.5)


def _marker_legend(fig, axes, *, front_label: str, front_style: dict):
  """The legend of the symbols (outside the panels): start, end on / off the front, the Pareto set or front."""
  from matplotlib.lines import Line2D

  handles = [
    Line2D([], [], **front_style),
    Line2D([], [], marker="o", ls="", color="gray", ms=5),
    Line2D([], [], marker="*", ls="", color="red", mec="black", mew=0.5, ms=10),
    Line2D([], [], marker="X", ls="", color="black", ms=8),
  ]
  labels = [front_label, "start (colour: initial point)", "end, on the Pareto front", "end, not on the front"]
  legend_outside(fig, axes, handles=handles, labels=labels, where="below")


def plot_trajectories(res: dict):
  """One panel per method: trajectories over the contours (grey: mean loss; blue/orange: L1/L2)."""
  plt = _common.pyplot()
  methods = list(res["methods"])
  mcol = method_colors(methods)
  fig, axes = grid(len(methods), ncols=4, panel=(3.5, 3.5))
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(res["config"]["inits"])))
  for i, (ax, m) in enumerate(zip(axes, methods)):
    _contour(ax)
    fp = res["front_points"]
    ax.plot(fp[:, 0], fp[:, 1], ".", color="gold", ms=1.2, zorder=2)
    r = res["methods"][m]
    for traj, ok, c in zip(r["trajectories"], r["reached"], colors):
      ax.plot(traj[:, 0], traj[:, 1], color=c, lw=1.4, zorder=3)
      ax.plot(*traj[0], "o", color=c, ms=5, mec="white", mew=0.6, zorder=4)
      ax.plot(
        *traj[-1],
        "*" if ok else "X",
        color="red" if ok else "black",
        mec="black" if ok else "white",
        mew=0.5,
        ms=10 if ok else 8,
        zorder=5,
      )
    ax.set_title(
      f"{m} ({int(np.sum(r['reached']))}/{len(r['reached'])} ends on the front)",
      fontsize=9,
      color=mcol[m],
      fontweight="bold",
    )
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    if i % 4 == 0:
      ax.set_ylabel("$x_2$")
  fig.suptitle("trajectories in parameter space (grey: mean loss; blue / orange contours: $L_1$ / $L_2$)", fontsize=9.5)
  fig.tight_layout()
  _marker_legend(fig, axes, front_label="Pareto set", front_style={"marker": ".", "ls": "", "color": "gold", "ms": 8})
  return fig


def plot_loss_space(res: dict):
  """Trajectories in the ``(L1, L2)`` plane with the Pareto front."""
  plt = _common.pyplot()
  methods = list(res["methods"])
  mcol = method_colors(methods)
  fig, axes = grid(len(methods), ncols=4, panel=(3.3, 3.2), sharey=True)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(res["config"]["inits"])))
  for i, (ax, m) in enumerate(zip(axes, methods)):
    ax.plot(res["front"][:, 0], res["front"][:, 1], color="red", lw=2, alpha=0.6, zorder=2)
    r = res["methods"][m]
    for traj, ok, c in zip(r["trajectories"], r["reached"], colors):
      ls = toy_losses(traj, xp=np)
      ax.plot(ls[0], ls[1], color=c, lw=1, zorder=3)
      ax.plot(ls[0, 0], ls[1, 0], "o", color=c, ms=5, mec="white", mew=0.6, zorder=4)
      ax.plot(
        ls[0, -1],
        ls[1, -1],
        "*" if ok else "X",
        color="red" if ok else "black",
        mec="black" if ok else "white",
        mew=0.5,
        ms=10 if ok else 8,
        zorder=5,
      )
    ax.set_title(m, fontsize=9.5, color=mcol[m], fontweight="bold")
    ax.set_xlabel("$L_1$")
    ax.set_xlim(-21, 10)
    ax.set_ylim(-21, 10)
    ax.grid(alpha=0.25)
    if i % 4 == 0:
      ax.set_ylabel("$L_2$")
  fig.suptitle("trajectories in loss space", fontsize=9.5)
  fig.tight_layout()
  _marker_legend(fig, axes, front_label="Pareto front", front_style={"color": "red", "lw": 2, "alpha": 0.6})
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = _common.parser(NAME, "Trajectories of MTL gradient methods on the CAGrad / Nash-MTL two-task toy.")
  p.add_argument("--steps", type=int, default=None, help="Adam steps (default 100000, --fast 3000)")
  args = p.parse_args(argv)
  _common.use_agg()
  cfg = FAST if args.fast else FULL
  if args.steps:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  out = _common.out_dir(args.out, NAME)
  with _common.Timer() as timer:
    res = run(cfg)
  text = (
    f"Final (L1, L2) after {cfg.steps} Adam steps (lr {cfg.learning_rate:g}) and whether it is on the "
    f"Pareto front (dominance gap <= {cfg.tol:g}):\n\n{table(res)}\n\nwall time {timer.seconds:.1f} s"
  )
  print(text)
  _common.write_text(os.path.join(out, "table.md"), text)
  _common.write_json(
    os.path.join(out, "results.json"),
    {
      "config": res["config"],
      "wall_seconds": timer.seconds,
      "methods": {
        m: {k: r[k] for k in ("final", "final_losses", "gap", "reached", "seconds")} for m, r in res["methods"].items()
      },
    },
  )
  _common.save(plot_trajectories(res), os.path.join(out, "trajectories.png"))
  _common.save(plot_loss_space(res), os.path.join(out, "loss_space.png"))
  print(f"figures and results in {out}")
  res["text"] = text
  res["out"] = out
  return res


if __name__ == "__main__":
  main()
