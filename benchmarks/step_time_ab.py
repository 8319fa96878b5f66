"""CPU step time of two commits, interleaved: did a change make the CPU paths slower?

    python benchmarks/step_time_ab.py --before 8e740be --after HEAD --rounds 6 --threads 2 \
        --out benchmarks/results/cpu/step_time_ab_8e740be_HEAD.json

On a small machine a step-time ratio moves by about +-0.25 from one run to the next (other tenants, turbo,
page faults), so one run of each commit says little. This runs ``benchmarks/step_time.py`` (the same protocol:
every optimizer's ``optimizer.step()`` interleaved with torch AdamW in one process) from a checkout of each
commit in turn, ``--rounds`` times, alternating which goes first, and reports for every optimizer the ratio to
the faster torch AdamW of the same process: per commit the median and the range over the rounds. A commit
counts as slower for an optimizer only when its ratios' range lies wholly above the other's.

The two checkouts are git worktrees made in a temporary folder (removed at the end); each run imports the
library from its own checkout (``PYTHONPATH``), so only the library's code differs between them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    from slimopt.bench.report import run_metadata
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    from slimopt.bench.report import run_metadata


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _one_run(checkout: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(checkout / "benchmarks" / "step_time.py"), "--preset", args.preset,
               "--rounds", str(args.inner_rounds), "--steps", str(args.steps), "--threads", str(args.threads),
               "--device", "cpu", "--out", str(out)]
    if args.optimizers:
        command += ["--optimizers", args.optimizers]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def _ratios(result: dict) -> dict[str, float]:
    """Each optimizer's median step time over the faster torch AdamW (foreach or for-loop) of the same run."""
    medians = {name: row["median_s"] for name, row in result["optimizers"].items() if row.get("median_s")}
    reference = min(medians[n] for n in ("adamw-foreach", "adamw-forloop") if n in medians)
    return {name: value / reference for name, value in medians.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision")
    parser.add_argument("--after", default="HEAD", help="git revision (default HEAD)")
    parser.add_argument("--rounds", type=int, default=6, help="runs of each commit, alternating (default 6)")
    parser.add_argument("--inner-rounds", type=int, default=3, help="step_time.py --rounds of one run (default 3)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="step42m")
    parser.add_argument("--optimizers", default="", help="step_time.py --optimizers (default: its own)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    commits = {label: _git("rev-parse", rev) for label, rev in (("before", args.before), ("after", args.after))}
    ratios: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="step_time_ab_") as tmp:
        checkouts = {}
        for label, commit in commits.items():
            checkouts[label] = Path(tmp) / label
            _git("worktree", "add", "--detach", str(checkouts[label]), commit)
        try:
            for round_index in range(args.rounds):
                order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
                for label in order:
                    run = _ratios(_one_run(checkouts[label], Path(tmp) / f"{label}_{round_index}.json", args))
                    for name, value in run.items():
                        ratios[label].setdefault(name, []).append(value)
                    print(f"[round {round_index + 1}/{args.rounds}] {label} ({commits[label][:7]}): "
                          + ", ".join(f"{n} {v:.2f}" for n, v in sorted(run.items())), flush=True)
        finally:
            for checkout in checkouts.values():
                _git("worktree", "remove", "--force", str(checkout))
    rows = []
    for name in sorted(set(ratios["before"]) & set(ratios["after"])):
        b, a = ratios["before"][name], ratios["after"][name]
        verdict = "slower" if min(a) > max(b) else "faster" if max(a) < min(b) else "within the spread"
        rows.append({"optimizer": name, "before_median": statistics.median(b), "before_range": [min(b), max(b)],
                     "after_median": statistics.median(a), "after_range": [min(a), max(a)], "after_vs_before": verdict})
    meta = run_metadata()
    summary = {"commits": commits, "rounds": args.rounds, "threads": args.threads, "preset": args.preset,
               "inner_rounds": args.inner_rounds, "steps": args.steps, "wall_s": round(time.time() - started),
               "meta": meta, "command": meta["command"], "ratios": ratios, "rows": rows}
    machine = f"{meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores; torch {meta['versions']['torch']}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=None, separators=(",", ":")) + "\n")
    lines = [f"# CPU step time, {commits['before'][:7]} (before) and {commits['after'][:7]} (after), interleaved",
             "", f"{machine}; {args.threads} threads; `{args.preset}`; {args.rounds} runs of each commit "
             f"(alternating which goes first), each `step_time.py --rounds {args.inner_rounds} --steps {args.steps}`."
             " Ratio: an optimizer's median step over the faster torch AdamW (foreach or for-loop) of the same run.",
             "", "| optimizer | before: median (range) | after: median (range) | after vs before |",
             "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['optimizer']} | {row['before_median']:.2f} ({row['before_range'][0]:.2f}–"
                     f"{row['before_range'][1]:.2f}) | {row['after_median']:.2f} ({row['after_range'][0]:.2f}–"
                     f"{row['after_range'][1]:.2f}) | {row['after_vs_before']} |")
    lines += ["", f"Command: `{summary['command']}` ({summary['wall_s']} s)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
