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
    """Validation loss (markers) and smoothed training loss (thin line) per run; x is "step" or "time".
    The legend sits outside the axes, with one entry per optimizer and two saying which line is which."""
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
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
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title, fontsize=10)
    losses = [v[3] for run in runs for v in run["val_curve"][1:]]
    if losses:  # skip the untrained loss at step 0 when choosing the y-range
        low, high = min(losses), max(losses)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.25 * (high - low + 1e-9))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", marker="o", markersize=3, linewidth=1.5),
                Line2D([], [], color="0.3", alpha=0.35, linewidth=1)]
    labels += ["validation", "training (smoothed)"]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_bars(rows: list[tuple[str, float | None, float | None]], path: Path, *, peak_label: str,
                title: str = "") -> Path | None:
    """Per optimizer: optimizer-state MiB (left panel) and peak memory MiB (right panel), each on its own
    scale, so a few MiB of state stay visible beside a peak of GiB; every bar carries its value."""
    plt = _pyplot()
    if plt is None:
        return None
    names = [r[0] for r in rows]
    if len(names) <= 6:  # side by side
        fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(names) + 3), 4.2))
    else:  # one above the other, each as wide as the figure
        fig, axes = plt.subplots(2, 1, figsize=(min(12.0, 0.65 * len(names) + 2), 7.5))
    positions = list(range(len(names)))
    panels = [(axes[0], [r[1] for r in rows], "optimizer state (exact)", "C0"),
              (axes[1], [r[2] for r in rows], peak_label, "C1")]
    for ax, values, label, color in panels:
        heights = [v or 0.0 for v in values]
        bars = ax.bar(positions, heights, width=0.6, color=color)
        top = max(heights) if any(heights) else 1.0
        for bar, value in zip(bars, values):
            text = "n/a" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(positions, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
