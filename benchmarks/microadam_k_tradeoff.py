"""MicroAdam's k_init: state bytes against loss, side by side, from a committed comparison.

    python benchmarks/microadam_k_tradeoff.py benchmarks/results/cpu/finetune_lm/results.json \
        --out benchmarks/results/cpu/microadam_k_tradeoff

Every run of the comparison named ``microadam`` or ``microadam@k_init=...`` (other options kept) gives a row:
its k_init, the state bytes per parameter from the formula slimopt.memory uses (0.5 + 4·m·k + 4/bucket at
the class's m and bucket, exact for the class), and its final validation loss as a ratio to AdamW's (mean ±
std over seeds). Writes ``tradeoff.md`` and ``tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

try:
    from slimopt.bench.baselines import parse_name
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from slimopt.bench.baselines import parse_name
from slimopt.bench.report import write_json
from slimopt.memory.formulas import analytic_state_bytes
from slimopt.registry import spec


def rows_from(result: dict) -> list[dict]:
    runs = result["runs"]
    reference = [r["final_val_loss"] for r in runs if r["optimizer"] == "adamw"]
    if not reference:
        raise SystemExit("the comparison has no adamw runs to compare against")
    ref = statistics.mean(reference)
    defaults = spec("microadam").formula_defaults()
    by_name: dict[str, list[float]] = {}
    for r in runs:
        base, options = parse_name(r["optimizer"])
        if base == "microadam" and set(options) <= {"k_init"}:
            by_name.setdefault(r["optimizer"], []).append(r["final_val_loss"])
    rows = []
    for name, losses in by_name.items():
        options = {**defaults, **parse_name(name)[1]}
        n = 10**6  # per parameter, on a 1M-entry tensor (the +4-byte step and the last bucket vanish)
        state = analytic_state_bytes([("w", (n,))], "microadam", **options) / n
        ratios = [loss / ref for loss in losses]
        rows.append({"optimizer": name, "k_init": options["k_init"], "state_bytes_per_param": state,
                     "loss_ratio": statistics.mean(ratios),
                     "loss_ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else None, "seeds": len(ratios)})
    return sorted(rows, key=lambda r: r["k_init"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results.json of slimopt bench finetune-lm or pretrain")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = json.loads(Path(args.results).read_text())
    rows = rows_from(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# MicroAdam: k_init, state and loss", "",
             f"From `{args.results}` (final validation loss as a ratio to AdamW's mean; mean ± std over seeds). "
             "State: bytes per parameter of MicroAdam's state at m = 10, bucket 64 (slimopt's defaults); AdamW "
             "keeps 8.", "", "| k_init | state B/param | loss x AdamW | seeds |", "|---|---|---|---|"]
    for r in rows:
        std = "" if r["loss_ratio_std"] is None else f" ± {r['loss_ratio_std']:.3f}"
        lines.append(f"| {r['k_init']:g} | {r['state_bytes_per_param']:.3f} | {r['loss_ratio']:.3f}{std} | "
                     f"{r['seeds']} |")
    (out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    write_json(out / "tradeoff.json", rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None and rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar([r["state_bytes_per_param"] for r in rows], [r["loss_ratio"] for r in rows],
                    yerr=[r["loss_ratio_std"] or 0 for r in rows], marker="o", capsize=3)
        for r in rows:
            ax.annotate(f"k = {r['k_init']:g}", (r["state_bytes_per_param"], r["loss_ratio"]),
                        textcoords="offset points", xytext=(6, 4))
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.margins(x=0.15)  # room for the last label
        ax.set_xlabel("optimizer state, bytes per parameter (AdamW: 8)")
        ax.set_ylabel("final validation loss / AdamW's")
        ax.set_title("MicroAdam: memory against loss")
        fig.tight_layout()
        fig.savefig(out / "tradeoff.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
