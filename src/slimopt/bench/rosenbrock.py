"""``slimopt bench rosenbrock``: why MicroAdam needs error feedback (the MicroAdam paper's Figure 1).

On f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 three optimizers start from the same point:

* **Adam** with the full gradient;
* **TopK-Adam**: of the two gradient coordinates only the larger in magnitude reaches Adam, the other is
  zeroed (Top-K with k = 1 of 2, the 50% sparsity of the figure);
* **TopK-Adam + EF**: the dropped coordinate is kept in an error buffer and added to the next gradient
  before the Top-K (a = g + e; c = TopK(a); e = a - c), so nothing is lost, only delayed.

From the default start (1.5, 0.5) the x-gradient (about 1050) dwarfs the y-gradient (about -350), and it
keeps winning while x moves, so plain Top-K updates x alone: the iterate runs straight across to the far
side of the curved valley, and on the valley floor, where the two gradients trade places, it only creeps.
Error feedback banks the y-gradient each step it loses, so y soon wins a round, and the run follows Adam's
into the minimum (1, 1).

Default setup (start (1.5, 0.5), lr 0.002, betas (0.9, 0.999), eps 1e-8, 2000 steps), chosen by a search
over start points and learning rates for a case where the contrast is clear; from many other starts plain
Top-K-Adam also converges, since Adam's per-coordinate normalisation rescues a rarely chosen coordinate.
With this setup Adam and TopK-Adam+EF reach f < 1e-3 (854 and 1303 steps) and TopK-Adam ends at f = 0.07,
0.5 away from the minimum; tests/test_bench_rosenbrock.py checks this.

Everything is in float64 Python arithmetic: two coordinates need no tensors.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "Trajectory", "rosenbrock", "rosenbrock_grad", "run", "run_all", "simulate"]

METHODS = ("adam", "topk-adam", "topk-adam-ef")
START = (1.5, 0.5)
LR = 0.002
STEPS = 2000
TARGET = 1e-3  # "converged" when f drops below this


def rosenbrock(x: float, y: float) -> float:
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def rosenbrock_grad(x: float, y: float) -> tuple[float, float]:
    return -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)


def top1(a: tuple[float, float]) -> tuple[float, float]:
    """Keep the larger-magnitude coordinate, zero the other (ties keep the first)."""
    return (a[0], 0.0) if abs(a[0]) >= abs(a[1]) else (0.0, a[1])


@dataclass
class Trajectory:
    method: str
    points: list[tuple[float, float]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def final_value(self) -> float:
        return self.values[-1]

    @property
    def distance_to_minimum(self) -> float:
        x, y = self.points[-1]
        return math.hypot(x - 1, y - 1)

    @property
    def steps_to_target(self) -> int | None:
        return next((i for i, v in enumerate(self.values) if v < TARGET), None)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "final_f": self.final_value, "final_point": list(self.points[-1]),
                "distance_to_minimum": self.distance_to_minimum, "steps_to_f_below_1e-3": self.steps_to_target}


def simulate(method: str, start: tuple[float, float] = START, lr: float = LR, steps: int = STEPS,
             betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Trajectory:
    """Run ``method`` (one of ``METHODS``) for ``steps`` Adam steps; records every iterate."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    beta1, beta2 = betas
    p = list(start)
    m, v, error = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    traj = Trajectory(method, [tuple(p)], [rosenbrock(*p)])
    for t in range(1, steps + 1):
        g = rosenbrock_grad(*p)
        if method == "topk-adam":
            g = top1(g)
        elif method == "topk-adam-ef":
            a = (g[0] + error[0], g[1] + error[1])  # add back what earlier rounds dropped
            g = top1(a)
            error = [a[0] - g[0], a[1] - g[1]]
        for i in range(2):  # Adam with bias correction
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i]
            m_hat, v_hat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
        traj.points.append(tuple(p))
        traj.values.append(rosenbrock(*p))
    return traj


def run_all(start: tuple[float, float] = START, lr: float = LR, steps: int = STEPS) -> dict[str, Trajectory]:
    return {method: simulate(method, start, lr, steps) for method in METHODS}


def plot(trajectories: dict[str, Trajectory], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    xs = [x for t in trajectories.values() for x, _ in t.points] + [1.0]
    ys = [y for t in trajectories.values() for _, y in t.points] + [1.0]
    x_lo, x_hi = min(xs) - 0.3, max(xs) + 0.3
    y_lo, y_hi = min(ys) - 0.3, max(ys) + 0.3
    gx, gy = np.meshgrid(np.linspace(x_lo, x_hi, 300), np.linspace(y_lo, y_hi, 300))
    gz = (1 - gx) ** 2 + 100 * (gy - gx**2) ** 2
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.contour(gx, gy, np.log10(gz + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    styles = {"adam": ("C0", "Adam"), "topk-adam": ("C3", "TopK-Adam (k=1 of 2)"),
              "topk-adam-ef": ("C2", "TopK-Adam + error feedback")}
    for method, traj in trajectories.items():
        color, label = styles[method]
        px, py = zip(*traj.points)
        ax.plot(px, py, color=color, linewidth=1.4, label=f"{label}: f={traj.final_value:.2g}")
        ax.plot(px[-1], py[-1], "o", color=color, markersize=5)
    ax.plot(*trajectories[METHODS[0]].points[0], "ks", markersize=6, label="start")
    ax.plot(1, 1, "k*", markersize=12, label="minimum (1, 1)")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", default=f"{START[0]},{START[1]}", help="x,y (default %(default)s)")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default="runs/rosenbrock", help="folder for rosenbrock.png and results.json")


def default_args(**overrides: Any) -> argparse.Namespace:
    """The parsed defaults, with ``overrides`` (for tests and notebooks)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> int:
    from .report import markdown_table, run_metadata, write_json

    start = tuple(float(v) for v in args.start.split(","))
    trajectories = run_all(start, args.lr, args.steps)
    rows = [t.summary() for t in trajectories.values()]
    table = markdown_table(["method", "final f", "distance to (1,1)", "steps to f < 1e-3"],
                           [[r["method"], r["final_f"], r["distance_to_minimum"], r["steps_to_f_below_1e-3"]]
                            for r in rows])
    out = Path(args.out)
    title = f"Rosenbrock from {start}, Adam lr {args.lr}, {args.steps} steps"
    png = plot(trajectories, out / "rosenbrock.png", title)
    write_json(out / "results.json", {"meta": run_metadata(), "start": start, "lr": args.lr, "steps": args.steps,
                                      "results": rows, "plot": png and str(png)})
    (out / "report.md").write_text(f"# {title}\n\n{table}\n" + (f"\n![rosenbrock]({png.name})\n" if png else ""))
    print(table)
    print(f"wrote {out}/results.json, report.md" + (" and rosenbrock.png" if png else ""))
    return 0
