"""The README's result tables, generated from the committed results under benchmarks/results/.

    python benchmarks/readme_tables.py            # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check    # exit 1 if README.md is not what the results give

Each table sits between ``<!-- begin: NAME -->`` and ``<!-- end: NAME -->`` in README.md; nothing
outside those markers is touched. A table whose result files are missing says so instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import slimopt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from slimopt.bench.baselines import split_second_lr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

STEP_TIME_FILES = {1: RESULTS / "cpu" / "step_time_step42m_1thread.json",
                   2: RESULTS / "cpu" / "step_time_step42m_2threads.json"}
STEP_TIME_TARGETS = {"adammini": 0.45, "sinkgd": 0.8, "microadam": 3.0}
# the pre-training comparison with adamw-split and 3 seeds (pretrain_cpu_reference/ is the earlier 2-seed one)
PRETRAIN_REFERENCE = RESULTS / "cpu" / "pretrain_tiny_split" / "results.json"
PRETRAIN_QUICK = RESULTS / "cpu" / "pretrain_quick" / "results.json"
FINETUNE_RT = RESULTS / "cpu" / "finetune_rotten_tomatoes"
LOSS_BAR = 1.02  # final val loss at most 1.02x AdamW's (issue #6)
ACCURACY_BAR = 0.01  # fine-tuning accuracy within 1 point of AdamW's


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(*paths: Path) -> str:
    return "_Not run yet: " + ", ".join(f"`{p.relative_to(ROOT)}`" for p in paths) + " missing._"


def step_time_table() -> str:
    runs = {threads: _load(path) for threads, path in STEP_TIME_FILES.items()}
    present = {t: r for t, r in runs.items() if r}
    if not present:
        return _missing(*STEP_TIME_FILES.values())
    names = ["adamw-foreach", "adamw-forloop", "adamw-fused", "adammini", "sinkgd", "microadam", "swan"]
    header = ["optimizer"]
    for threads in present:
        header += [f"ms, {threads} thread{'s' if threads > 1 else ''}", f"× AdamW ({threads})"]
    header += ["state B/param", "target (× AdamW)"]
    rows = []
    for name in names:
        if not any(name in r["optimizers"] for r in present.values()):
            continue
        row = [name]
        state = None
        for r in present.values():
            o = r["optimizers"].get(name)
            if o is None:
                row += ["–", "–"]
                continue
            ratio = o["ratio_to_adamw"]
            target = STEP_TIME_TARGETS.get(name)
            mark = "" if target is None else (" ✓" if ratio <= target else " ✗")
            row += [f"{o['median_s'] * 1e3:.0f}", f"**{ratio:.2f}**{mark}" if target else f"{ratio:.2f}"]
            state = o["state_bytes_per_param"]
        target = STEP_TIME_TARGETS.get(name)
        row += [f"{state:.3f}" if state is not None else "–", f"≤ {target:g}" if target else ""]
        rows.append(row)
    sources = ", ".join(f"[{t} thread{'s' if t > 1 else ''}]({STEP_TIME_FILES[t].with_suffix('.md').relative_to(ROOT)})"
                        for t in present)
    commits = sorted({r["meta"]["git_commit"][:7] for r in present.values()})
    return _table(header, rows) + f"\n\nResults: {sources} (commit {', '.join(commits)})."


def _loss(row: dict) -> str:
    std = row.get("final_val_loss_std")
    return f"{row['final_val_loss']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def pretrain_reference_table() -> str:
    result = _load(PRETRAIN_REFERENCE)
    if result is None:
        return _missing(PRETRAIN_REFERENCE)
    s = result["settings"]
    rows = []
    bars = {"microadam", "adammini", "sinkgd"}
    for r in sorted(result["summary"], key=lambda r: r["final_val_loss"]):
        shown, second = split_second_lr(r["optimizer"])  # the second lr has its own column
        ratio = r["val_loss_ratio"]
        bar = "" if shown not in bars else (" ✓" if ratio <= LOSS_BAR else " ✗")
        split_ratio = r.get("val_loss_ratio_vs_split")
        rows.append([shown,
                     f"{r['lr']:.3g}", second or "–", _loss(r),
                     f"{ratio:.3f}{bar}", r["verdict"],
                     "–" if split_ratio is None else f"{split_ratio:.3f}", r.get("verdict_vs_split") or "–",
                     f"{r['state_bytes_per_param']:.2f}"])
    head = (f"{s['preset']} preset ({s['n_params'] / 1e6:.2f}M parameters), {s['data']} ({s['tokenizer']} tokens), "
            f"{s['steps']} steps × {s['batch_size']} × {s['seq_len']} tokens, seeds {s['seeds']}, every lr swept "
            f"(the second lr of SinkGD, SWAN and adamw-split too); mean ± std over seeds; a win or a loss only "
            f"beyond the seeds' spread "
            f"([report, sweeps and plots]({PRETRAIN_REFERENCE.parent.relative_to(ROOT)}/report.md)).")
    table = _table(["optimizer", "lr", "lr of embeddings, head, 1-D", "final val loss",
                    f"× AdamW (bar ≤ {LOSS_BAR})", "vs AdamW", "× adamw-split", "vs adamw-split", "state B/param"],
                   rows)
    return head + "\n\n" + table


def finetune_table() -> str:
    files = sorted(FINETUNE_RT.glob("*/results.json"))
    if not files:
        return _missing(FINETUNE_RT / "*/results.json")
    by_run: dict[tuple[str, float], list[dict]] = {}  # (optimizer, lr) -> one run per seed
    seeds = set()
    for path in files:
        result = json.loads(path.read_text())
        seeds.add(result["settings"]["seed"])
        for run in result["runs"]:
            by_run.setdefault((run["optimizer"], round(run["lr"], 12)), []).append(run)
    adamw = [r["test_accuracy"] for (name, _), runs in by_run.items() if name == "adamw" for r in runs]
    reference = statistics.mean(adamw) if adamw else None
    rows = []
    for (name, lr), runs in sorted(by_run.items(), key=lambda item: (item[0][0] != "adamw", item[0])):
        accuracies = [r["test_accuracy"] for r in runs]
        mean = statistics.mean(accuracies)
        delta = None if reference is None else (mean - reference) * 100
        bar = ""
        if name in ("microadam", "adammini") and delta is not None:
            bar = " ✓" if delta >= -ACCURACY_BAR * 100 else " ✗"
        rows.append([name, f"{lr:.3g}", " / ".join(f"{a:.2%}" for a in accuracies), f"{mean:.2%}",
                     "" if delta is None else f"{delta:+.2f}{bar}",
                     f"{statistics.mean(r['final_train_loss'] for r in runs):.4f}",
                     f"{runs[0]['state_bytes_per_param']:.2f}"])
    first = json.loads(files[0].read_text())["settings"]
    examples = "all" if not first["train_examples"] else f"{first['train_examples']:,}"
    head = (f"MiniLM-L6 (22.7M) on Rotten Tomatoes: {examples} training snippets, {first['epochs']:g} epoch at batch "
            f"{first['batch_size']}, max length {first['max_length']}, the whole test split; seeds {sorted(seeds)} "
            f"([results]({FINETUNE_RT.relative_to(ROOT)}/)).")
    table = _table(["optimizer", "lr", "test accuracy per seed", "mean", "Δ vs AdamW, points (bar ≥ −1)",
                    "final train loss", "state B/param"], rows)
    return head + "\n\n" + table


def demo_table() -> str:
    result = _load(PRETRAIN_QUICK)
    if result is None:
        return _missing(PRETRAIN_QUICK)
    rows = []
    for r in sorted(result["summary"], key=lambda r: r["final_val_loss"]):
        tokens = r["tokens_to_reference_loss"]
        rows.append([r["optimizer"], f"{r['lr']:.3g}", f"{r['final_val_loss']:.3f}",
                     f"{r['state_bytes_per_param']:.2f}", "–" if tokens is None else f"{tokens:,.0f}"])
    machine, meta = result["meta"]["machine"], result["meta"]
    caption = (f"Ran on {machine['cpu']} ({machine['torch_threads']} torch threads), torch "
               f"{meta['versions']['torch']}, commit {str(meta['git_commit'])[:7]}.")
    return caption + "\n\n" + _table(["optimizer", "lr", "final val loss", "state B/param",
                                        "tokens to AdamW's final loss"], rows)


GPU_RESULTS = RESULTS / "gpu"
FINETUNE_LM = RESULTS / "cpu" / "finetune_lm" / "results.json"  # tiny preset, every optimizer
FINETUNE_LM_CPU = RESULTS / "cpu" / "finetune_lm_cpu" / "results.json"  # cpu preset, the two methods with bars
FINETUNE_SMOLLM2 = RESULTS / "cpu" / "finetune_smollm2" / "results.json"


def finetune_lm_table(path: Path = FINETUNE_LM) -> str:
    """Loss ratio to AdamW at each checkpoint of the fine-tuning regime (slimopt bench finetune-lm)."""
    result = _load(path)
    if result is None:
        return _missing(path)
    checkpoints = result["settings"]["checkpoints"]
    rows = []
    for r in sorted(result["summary"], key=lambda r: (r["optimizer"] != "adamw", r[f"ratio@{checkpoints[-1]}"] or 9)):
        cells = [r["optimizer"], f"{r['lr']:.3g}", str(len(r["seeds"]))]
        for step in checkpoints:
            ratio, std = r[f"ratio@{step}"], r[f"ratio_std@{step}"]
            cells.append("–" if ratio is None else f"{ratio:.3f}" + ("" if std is None else f" ± {std:.3f}"))
        cells.append(r["final_verdict"])
        rows.append(cells)
    return _table(["optimizer", "lr", "seeds", *[f"× AdamW @{c}" for c in checkpoints], "final vs AdamW"], rows)


GPU_ESTIMATE = RESULTS / "gpu_estimate" / "results.json"


def gpu_estimate_table(path: Path = GPU_ESTIMATE) -> str:
    """The modelled GPU step at 1b (``slimopt bench gpu-estimate``): an estimate, not a measurement."""
    result = _load(path)
    if result is None:
        return _missing(path)
    cases = result["cases"]
    names = sorted({k.split("/")[0] for k in cases}, key=lambda n: (not n.startswith("adamw"), n))
    rows = []
    for name in names:
        cells = [name]
        for dtype in ("fp32", "bf16"):
            c = cases.get(f"{name}/{dtype}")
            cells += ["–"] * 4 if c is None else [f"{c['predicted_ms']:.1f}", f"{c['x_fused_adamw']:.2f}",
                                                 str(c["kernels"]), f"{c['bytes_per_param']:.2f}"]
        fp32 = cases.get(f"{name}/fp32", {})
        cells.append(str(len(fp32.get("syncs", []))))
        rows.append(cells)
    meta = result["meta"]
    table = _table(["optimizer", "fp32 ms (est.)", "× fused AdamW", "kernels", "B/param moved", "bf16 ms (est.)",
                    "× fused AdamW", "kernels", "B/param moved", "host syncs"], rows)
    return (f"{table}\n\nEstimated, not measured: `slimopt bench gpu-estimate` at commit "
            f"{meta['git_commit'][:7]} ({meta['versions']['torch']}, no GPU); {result['preset']} preset, weight decay "
            f"{result['weight_decay']}; calibration: {result['calibration']['source']}.")


def gpu_table() -> str:
    """Step time at 1B from the newest committed GPU suite run (benchmarks/gpu_suite.py), dry runs left out."""
    runs = sorted(p for p in GPU_RESULTS.glob("*/results.json") if not _load(p).get("dry_run"))
    if not runs:
        return ("_No GPU suite run committed yet: `python benchmarks/gpu_suite.py` on a CUDA machine writes "
                "`benchmarks/results/gpu/<date>-<gpu>/`._")
    data = _load(runs[-1])
    timing = data["results"].get("timing", {}).get("result")
    if not timing:
        return f"_The GPU suite run `{runs[-1].parent.relative_to(ROOT)}` has no step-time section._"
    rows = []
    for key, row in timing["rows"].items():
        name, dtype = key.split("/")
        if "error" in row:
            rows.append([name, dtype, "error", "–", "–", "–"])
            continue
        rows.append([name, dtype, f"{row['ms']:.2f}", f"{row.get('x_fused_adamw', float('nan')):.2f}",
                     str(row["launches"]), f"{row['state_bytes_per_param']:.2f}"])
    meta = data["meta"]
    caption = (f"{meta.get('device')}, {timing['preset']} preset, torch {meta['versions'].get('torch')}, "
               f"commit {str(meta.get('git_commit'))[:7]} (`{runs[-1].parent.relative_to(ROOT)}`)")
    return caption + "\n\n" + _table(["optimizer", "params", "step ms", "× fused AdamW", "CUDA kernels",
                                        "state B/param"], rows)


TABLES: dict[str, Callable[[], str]] = {
    "gpu": gpu_table,
    "gpu-estimate": gpu_estimate_table,
    "finetune-lm": finetune_lm_table,
    "finetune-lm-cpu": lambda: finetune_lm_table(FINETUNE_LM_CPU),
    "finetune-lm-smollm2": lambda: finetune_lm_table(FINETUNE_SMOLLM2),
    "step-time": step_time_table,
    "pretrain-cpu": pretrain_reference_table,
    "finetune-rt": finetune_table,
    "demo": demo_table,
}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- begin: {re.escape(name)} [^\n]*-->\n)(.*?)(<!-- end: {re.escape(name)} -->)",
                             re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no '<!-- begin: {name} ... -->' / '<!-- end: {name} -->' markers")
        body = make()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's result tables differ from benchmarks/results/: run python benchmarks/readme_tables.py")
            return 1
        print("README.md's result tables match benchmarks/results/")
        return 0
    README.write_text(wanted)
    print("rewrote the result tables in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
