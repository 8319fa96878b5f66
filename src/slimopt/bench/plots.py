"""PNG figures for the reports (matplotlib, headless). Every function returns the path it wrote, or None
when matplotlib is not installed (the report then says so instead of linking a figure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["loss_curves", "memory_bars"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves(runs: list[dict[str, Any]], path: Path, *, x: str = "step", title: str = "") -> Path | None:
    """Validation loss (markers) and smoothed training loss (thin line) per run; x is "step" or "time"."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, Any] = {}
    for run in runs:
        name = run["optimizer"]
        color = colors.setdefault(name, f"C{len(colors) % 10}")
        label = name if run["seed"] == min(r["seed"] for r in runs if r["optimizer"] == name) else None
        train = run["train_curve"]
        if train:
            xs = [t[0] if x == "step" else t[1] for t in train]
            window = max(1, len(train) // 30)
            ax.plot(xs, _smooth([t[2] for t in train], window), color=color, alpha=0.35, linewidth=1)
        val = run["val_curve"]
        xs = [v[0] if x == "step" else v[2] for v in val]
        ax.plot(xs, [v[3] for v in val], "o-", color=color, markersize=3, linewidth=1.5, label=label)
    ax.set_xlabel("step" if x == "step" else "wall time (s)")
    ax.set_ylabel("loss (nats/token): validation o-, training (smoothed) thin")
    if title:
        ax.set_title(title, fontsize=10)
    losses = [v[3] for run in runs for v in run["val_curve"][1:]]
    if losses:  # skip the untrained loss at step 0 when choosing the y-range
        low, high = min(losses), max(losses)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.25 * (high - low + 1e-9))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_bars(rows: list[tuple[str, float | None, float | None]], path: Path, *, peak_label: str,
                title: str = "") -> Path | None:
    """Per optimizer: optimizer-state MiB and peak memory MiB, side by side."""
    plt = _pyplot()
    if plt is None:
        return None
    names = [r[0] for r in rows]
    state = [r[1] or 0.0 for r in rows]
    peak = [r[2] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], state, width=0.4, label="optimizer state (exact)")
    ax.bar([p + 0.2 for p in positions], peak, width=0.4, label=peak_label)
    ax.set_xticks(list(positions), names, rotation=20, ha="right")
    ax.set_ylabel("MiB")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
