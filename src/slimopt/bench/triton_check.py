"""Every Triton kernel specialisation the library launches, compiled for sm_80 and sm_90 without a GPU.

``python -m slimopt.bench.triton_check`` (or ``slimopt bench triton-check``):

1. **Record.** The optimizer steps of ``bench.gpu_estimate`` run on fake CUDA tensors (every registered optimizer
   and dtype at the ``1b`` preset, and once more on one layer of it whose matrices are transposed, so the
   one-tensor paths for non-contiguous tensors run too). At each Triton launch, Triton's own
   ``JITFunction.run`` binds the arguments for each target (a stand-in driver names the GPU:
   ``GPUTarget("cuda", arch, 32)``) and hands its compile
   request (signature, constexprs, pointer and integer specialisation, options: ``specialization_data``) to
   ``knobs.runtime.jit_cache_hook``, which keeps it and stops the compile: nothing runs. The wrappers take their
   CUDA branches by themselves (the tensors are on ``cuda``).
2. **Compile** each distinct request with ``triton.compile`` for its target, Triton's bundled ptxas included,
   in worker processes (``--jobs``, a fresh Triton cache per run: every compile is real), while recording goes
   on.
3. **Check** from ptxas's report and the PTX: registers, spill stores + loads (fail above ``MAX_SPILL_BYTES``),
   dynamic shared memory, resident warps per SM (from registers, num_warps and shared memory: 64K registers
   allocated per warp in units of 256, at most 64 warps and 32 blocks per SM, 164 / 228 KiB of shared memory
   on sm_80 / sm_90, 1 KiB of it reserved per block) against ``MIN_WARPS_PER_SM``, and in the kernels a module
   declares bit-exact (its ``BIT_EXACT_KERNELS`` tuple: tests hold them bit-equal to a CPU reference) no float
   FMA, no ``.approx`` instruction and no ``div.full``, and no launch with ``enable_fp_fusion`` on (ptxas would
   be free to contract a multiply and an add). A compile error fails, and so does a kernel with a launch site
   that no recorded step launched (unchecked).

``--estimate`` also prints (and ``--json`` writes) the step estimates of the recorded runs, which
``tests/test_gpu_readiness.py`` holds to its budgets: one run serves both checks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHS", "MAX_SPILL_BYTES", "MIN_WARPS_PER_SM", "Specialisations", "bit_exact_kernels", "check",
           "compile_one", "CompilePool", "launch_sites", "main", "record", "resident_warps", "scan_ptx"]

ARCHS = (80, 90)
MAX_SPILL_BYTES = 16
# resident warps per SM a kernel must keep, per arch: (kernel-name regex, minimum). The target for the
# group launches on sm_90 (H100/H200): >= 16 of 64, e.g. <= 128 registers at 4 warps.
MIN_WARPS_PER_SM: dict[int, tuple[tuple[str, int], ...]] = {90: ((r"^_group_", 16),)}

REGISTERS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32
SHARED_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}  # bytes; 1 KiB of it reserved per block
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # the opt-in maximum of one block


def resident_warps(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Warps of one kernel that fit on an SM at once: registers are allocated per warp in units of 256, an SM
    has 64K of them, 64 warps and 32 blocks at most, and its shared memory."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), WARPS_PER_SM // num_warps, BLOCKS_PER_SM)
    if shared:
        blocks = min(blocks, SHARED_PER_SM.get(arch, 167936) // (shared + 1024))
    return blocks * num_warps


# -- what the library launches ---------------------------------------------------------------------------------
def kernel_modules() -> list[str]:
    """slimopt's modules that define Triton kernels."""
    package = Path(__file__).resolve().parents[1]
    out = []
    for path in sorted(package.rglob("*.py")):
        if "triton.jit" in path.read_text(errors="replace") and path.name != Path(__file__).name:
            out.append("slimopt." + ".".join(path.relative_to(package).with_suffix("").parts))
    return out


def launch_sites() -> dict[str, str]:
    """Kernel -> module, for every ``@triton.jit`` function of slimopt that its module launches (``name[grid]``);
    the others are device helpers, inlined where they are called."""
    sites = {}
    for name in kernel_modules():
        module = importlib.import_module(name)
        text = Path(module.__file__).read_text()
        for attr, obj in vars(module).items():
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and re.search(
                    rf"\b{re.escape(attr)}\s*\[", text):
                sites[attr] = name
    return sites


def bit_exact_kernels() -> dict[str, str]:
    """Kernel -> module, for every kernel a module declares bit-exact (``BIT_EXACT_KERNELS``)."""
    out = {}
    for name in kernel_modules():
        for kernel in getattr(importlib.import_module(name), "BIT_EXACT_KERNELS", ()):
            out[kernel] = name
    return out


class _StandInDriver:
    """What ``JITFunction.run`` asks the active driver before compiling: the device (here the arch, so that
    each target gets its own binder) and its target."""

    def __init__(self) -> None:
        self.arch = 90

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def is_active(self) -> bool:
        return True


class Specialisations:
    """Launch observer for ``bench.gpu_estimate``: Triton's compile request of every launch, per target arch,
    kept once per distinct request (``found``: key -> job). ``on_new(job)`` is called for each new one."""

    def __init__(self, archs: Sequence[int] = ARCHS, on_new: Callable[[dict], None] | None = None) -> None:
        self.archs, self.on_new = tuple(archs), on_new
        self.found: dict[str, dict] = {}
        self.case = ""
        self.not_compiled: set[str] = set()  # launched kernels that are not JITFunctions (TRITON_INTERPRET)
        self._driver = _StandInDriver()

    def __call__(self, kernel, args, kwargs, grid) -> None:
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        triton_run = JITFunction.run
        triton_run = getattr(triton_run, "__wrapped__", triton_run)  # Triton's own, under a FakeCuda session
        name = kernel.fn.__name__
        if type(kernel).__name__ != "JITFunction":
            self.not_compiled.add(name)
            return
        requests: list[str] = []

        def keep(**hook_kwargs) -> bool:
            requests.append(hook_kwargs["compile"]["specialization_data"])
            return True  # compiled elsewhere: Triton stops here

        before_driver, before_hook = driver._active, knobs.runtime.jit_cache_hook
        driver.set_active(self._driver)
        knobs.runtime.jit_cache_hook = keep
        try:
            for arch in self.archs:
                self._driver.arch = arch
                requests.clear()
                triton_run(kernel, *args, grid=grid, warmup=False, **kwargs)
                for data in requests:
                    self._keep(kernel, name, arch, data)
        finally:
            driver._active, knobs.runtime.jit_cache_hook = before_driver, before_hook

    def _keep(self, kernel, name: str, arch: int, data: str) -> None:
        key = f"{kernel.fn.__module__}:{name}:{arch}:{data}"
        job = self.found.get(key)
        if job is None:
            job = self.found[key] = {"key": key, "module": kernel.fn.__module__, "kernel": name, "arch": arch,
                                     "data": data, "label": _label(data), "cases": [self.case]}
            if self.on_new is not None:
                self.on_new(job)
        elif self.case not in job["cases"]:
            job["cases"].append(self.case)


def _label(data: str) -> str:
    """A short name of a specialisation: its constexprs, pointer dtypes, 16-divisible ints, num_warps."""
    d = json.loads(data)
    names = list(d["signature"])
    parts = [f"{names[k[0]]}={v['constexpr'] if isinstance(v, dict) and 'constexpr' in v else v}"
             for k, v in zip(d["constant_keys"], d["constant_vals"]) if len(k) == 1]
    pointers = [t[1:] for t in d["signature"].values() if isinstance(t, str) and t.startswith("*")]
    divisible = [names[k[0]] for k, v in zip(d["attrs_keys"], d["attrs_vals"])
                 if len(k) == 1 and v and not str(d["signature"][names[k[0]]]).startswith("*")]
    return " ".join(parts + ["*" + ",".join(pointers), f"d16:{','.join(divisible) or '-'}",
                             f"w{d['options']['num_warps']}"])


def _strided_layer(preset: str = "1b") -> torch.nn.Module:
    """One layer of ``preset`` on the meta device whose matrices are transposed (non-contiguous: the path of
    transposed views and of shards); its vectors stay contiguous, a group of their own in effect."""
    import dataclasses as dc

    from .model import PRESETS, LlamaDecoder

    with torch.device("meta"):
        model = LlamaDecoder(dc.replace(PRESETS[preset], num_hidden_layers=1))
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 2:
                setattr(module, pname, torch.nn.Parameter(torch.empty(p.shape[1], p.shape[0], device="meta").t()))
    return model


def record(names: Sequence[str] | None = None, dtypes: Sequence[str] = ("fp32", "bf16"), *,
           archs: Sequence[int] = ARCHS, on_new: Callable[[dict], None] | None = None,
           log: Callable[[str], None] | None = None,
           specialisations: bool = True) -> tuple[Specialisations | None, dict[str, Any]]:
    """Run ``gpu_estimate``'s steps (1b, and one strided layer of it) with a ``Specialisations`` observer (none
    if ``specialisations`` is off: no Triton here). Returns it and the estimates (``"name/dtype"`` and
    ``"name/dtype strided"``)."""
    from .gpu_estimate import StepEstimate, default_names, estimate_step

    observer = Specialisations(archs, on_new) if specialisations else None
    estimates: dict[str, StepEstimate] = {}
    for dtype in dtypes:
        for name in names or default_names():
            for key, model in ((f"{name}/{dtype}", None), (f"{name}/{dtype} strided", _strided_layer())):
                if observer is not None:
                    observer.case = key
                t0 = time.perf_counter()
                try:
                    estimates[key] = estimate_step(name, dtype, observers=[observer] if observer else [], model=model,
                                                   warmup_steps=2 if model is None else 1)
                except Exception as exc:  # noqa: BLE001 - reported as the case's problem
                    failed = StepEstimate(key)
                    failed.problems[(f"the case raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                     "?")] += 1
                    estimates[key] = failed
                if log:
                    log(f"[{key}] recorded in {time.perf_counter() - t0:.1f} s")
    return observer, estimates


# -- compiling -------------------------------------------------------------------------------------------------
_FLOAT = re.compile(r"\.(f16|bf16|f32|f64|f16x2|bf16x2)\b")


def scan_ptx(ptx: str) -> Counter:
    """Instruction counts that matter for bit-exactness: float ``fma``, ``.approx``, ``div.full``, ``.ftz``;
    and ``lines``."""
    out: Counter = Counter(lines=ptx.count("\n") + 1)
    for m in re.finditer(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", ptx, re.MULTILINE):
        op = m.group(1)
        is_float = _FLOAT.search(op) is not None
        if op.startswith("fma.") and is_float:
            out["fma"] += 1
        if ".approx" in op:
            out["approx"] += 1
        if op.startswith("div.full"):
            out["div_full"] += 1
        if ".ftz" in op and is_float:
            out["ftz"] += 1
    return out


def _ptxas_report(log: str) -> dict[str, int]:
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


def _decode_constant(value: Any) -> Any:
    """A constexpr as ``serialize_specialization_data`` wrote it (as ``JITFunction.preload`` reads it)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(_tuples(value["constexpr"]))
    if isinstance(value, dict) and "jit_function" in value:
        module, _, qualname = value["jit_function"].partition(":")
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        assert isinstance(fn, JITFunction), value
        return fn
    return _tuples(value)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def compile_one(job: dict) -> dict:
    """Compile one recorded request for its arch with ``triton.compile``; the ptxas report, shared memory,
    num_warps and the PTX scan (or the error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    out = {k: job[k] for k in ("key", "module", "kernel", "arch", "label")}
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        data = json.loads(job["data"])
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        signature = {k: _tuples(v) for k, v in data["signature"].items()}
        constexprs = {tuple(k): _decode_constant(v) for k, v in zip(data["constant_keys"], data["constant_vals"])}
        attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
        options = {k: _tuples(v) for k, v in data["options"].items()}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", job["arch"], 32), options=options)
        report = _ptxas_report(log.getvalue())
        if "registers" not in report:
            raise RuntimeError(f"no ptxas report in the compile's output: {log.getvalue()[-300:]!r}")
        out.update(report, status="ok", shared=int(compiled.metadata.shared or 0),
                   num_warps=int(compiled.metadata.num_warps), fp_fusion=bool(options.get("enable_fp_fusion", True)),
                   scan=dict(scan_ptx(compiled.asm["ptx"])))
        out["warps_per_sm"] = resident_warps(out["registers"], out["num_warps"], out["shared"], job["arch"])
    except Exception as exc:  # noqa: BLE001 - a compile error is a result
        out.update(status="error", error=f"{type(exc).__name__}: {str(exc).strip()[:1500]}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["cpu_seconds"] = round(_cpu_seconds() - cpu0, 2)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ptxas)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CompilePool:
    """Compile jobs in ``jobs`` worker processes (spawned; a fresh Triton cache for this run), each given
    ``timeout`` seconds once its turn comes. ``submit(job)`` as they are found; ``results()`` waits."""

    def __init__(self, jobs: int = 2, timeout: float = 300.0) -> None:
        self.jobs, self.timeout = max(1, jobs), timeout
        self._cache = tempfile.TemporaryDirectory(prefix="slimopt-triton-check-")
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()
        self._pending: list[tuple[dict, Any]] = []

    def _new_pool(self):
        """Workers that see a fresh Triton cache and compile for real (no TRITON_INTERPRET); this process's
        environment is left as it was."""
        saved = dict(os.environ)
        os.environ["TRITON_CACHE_DIR"] = self._cache.name
        os.environ.pop("TRITON_INTERPRET", None)
        try:
            return self._context.Pool(self.jobs)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def submit(self, job: dict) -> None:
        self._pending.append((job, self._pool.apply_async(compile_one, (job,))))

    def results(self) -> list[dict]:
        out = []
        try:
            for job, pending in self._pending:
                try:
                    out.append(pending.get(self.timeout))
                except multiprocessing.TimeoutError:
                    failed = {k: job[k] for k in ("key", "module", "kernel", "arch", "label")}
                    out.append({**failed, "status": "error", "seconds": self.timeout,
                                "error": f"timeout: no result after {self.timeout:.0f} s"})
                    self._restart([j for j, p in self._pending if not p.ready() and j is not job])
        finally:
            self._pool.terminate()
            self._cache.cleanup()
        return out

    def _restart(self, remaining: list[dict]) -> None:
        """A hung compile: a new pool for the jobs still waiting."""
        self._pool.terminate()
        self._pool = self._new_pool()
        again = {id(j) for j in remaining}
        self._pending = [(j, self._pool.apply_async(compile_one, (j,)) if id(j) in again else p)
                         for j, p in self._pending]


def check(results: Sequence[dict], *, max_spill: int = MAX_SPILL_BYTES,
          min_warps: dict[int, tuple[tuple[str, int], ...]] = MIN_WARPS_PER_SM,
          bit_exact: dict[str, str] | None = None, unchecked: Sequence[str] = ()) -> list[str]:
    """Every failure of the compiled specialisations, one line each."""
    bit_exact = bit_exact_kernels() if bit_exact is None else bit_exact
    failures = [f"{k}: has a launch site but no recorded step launched it (not checked)" for k in unchecked]
    for r in results:
        what = f"{r['kernel']} sm_{r['arch']} [{r['label']}]"
        if r["status"] != "ok":
            failures.append(f"{what}: {r['error'].splitlines()[0][:200]}")
            continue
        spilled = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        if spilled > max_spill:
            failures.append(f"{what}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded "
                            f"(> {max_spill})")
        if r["shared"] > SHARED_PER_BLOCK.get(r["arch"], 49152):
            failures.append(f"{what}: {r['shared']} B of shared memory (> {SHARED_PER_BLOCK.get(r['arch'])})")
        for pattern, least in min_warps.get(r["arch"], ()):
            if re.search(pattern, r["kernel"]) and r["warps_per_sm"] < least:
                failures.append(f"{what}: {r['warps_per_sm']} resident warps per SM (< {least}: {r['registers']} "
                                f"registers x {r['num_warps']} warps)")
        if r["kernel"] in bit_exact:
            scan = r["scan"]
            bad = {k: scan.get(k, 0) for k in ("fma", "approx", "div_full") if scan.get(k, 0)}
            if bad or r["fp_fusion"]:
                failures.append(f"{what}: declared bit-exact but " + ", ".join(
                    [f"{n} {k}" for k, n in bad.items()] + (["compiled with enable_fp_fusion on"]
                                                          if r["fp_fusion"] else [])))
    return failures


def format_results(results: Sequence[dict], bit_exact: dict[str, str]) -> str:
    lines = [f"{'kernel':<25} {'sm':>3} {'regs':>4} {'spill B':>8} {'shared':>6} {'warps/SM':>8} {'fma':>4} "
             f"{'approx':>6} {'ftz':>4} {'s':>5}  specialisation"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["label"], r["arch"])):
        name = r["kernel"] + ("*" if r["kernel"] in bit_exact else "")
        if r["status"] != "ok":
            lines.append(f"{name:<25} {r['arch']:>3} ERROR {r['error'].splitlines()[0][:90]}  {r['label']}")
            continue
        s = r["scan"]
        lines.append(f"{name:<25} {r['arch']:>3} {r['registers']:>4} "
                     f"{r.get('spill_stores', 0) + r.get('spill_loads', 0):>8} {r['shared']:>6} "
                     f"{r['warps_per_sm']:>8} {s.get('fma', 0):>4} {s.get('approx', 0) + s.get('div_full', 0):>6} "
                     f"{s.get('ftz', 0):>4} {r['seconds']:>5.1f}  {r['label']}")
    lines.append("(* declared bit-exact: BIT_EXACT_KERNELS of its module; spill = stores + loads; warps/SM of 64)")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizers", default=None, help="comma-separated harness names (default: every one)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="target archs (default 80,90)")
    parser.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one compile may take")
    parser.add_argument("--estimate", action="store_true", help="also print the recorded steps' GPU estimates")
    parser.add_argument("--json", default=None, help="write estimates, specialisations, results and failures here")


def run(args: argparse.Namespace) -> int:
    from .args import UsageError
    from .gpu_estimate import check_arguments, format_table, ratios_to

    try:
        names, dtypes = check_arguments(args)
        archs = [int(a) for a in args.archs.split(",") if a]
        if not archs or any(a not in SHARED_PER_SM for a in archs):
            raise ValueError
    except ValueError as exc:
        why = exc if isinstance(exc, UsageError) else UsageError(
            "--archs", args.archs, f"expected a comma-separated list of {', '.join(map(str, SHARED_PER_SM))}")
        print(f"triton-check: {why}", file=sys.stderr)
        return 2
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    have_triton = importlib.util.find_spec("triton") is not None
    pool = CompilePool(args.jobs, args.timeout) if have_triton else None  # workers start while steps are recorded
    observer, estimates = record(names, dtypes, archs=archs,
                                 on_new=pool.submit if pool else None, specialisations=have_triton,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
    t_record, cpu_record = time.perf_counter() - t0, _cpu_seconds() - cpu0
    results, sites, unchecked, bit_exact, failures = [], {}, [], {}, []
    if pool is not None and observer is not None:
        results = pool.results()
        for r in results:  # the cases that launched it (known once recording is over)
            r["cases"] = observer.found[r["key"]]["cases"]
        sites = launch_sites()
        launched = {j["kernel"] for j in observer.found.values()} | observer.not_compiled
        unchecked = sorted(set(sites) - launched)
        bit_exact = bit_exact_kernels()
        failures = check(results, bit_exact=bit_exact, unchecked=unchecked)
        failures += [f"{k}: declared bit-exact in {m} but no such kernel there" for k, m in bit_exact.items()
                     if k not in sites]
    else:
        print("triton is not installed: the steps are estimated, nothing is compiled", file=sys.stderr)
    if args.estimate:
        print(format_table({k: v for k, v in estimates.items() if not k.endswith("strided")}))
        print()
    print(format_results(results, bit_exact))
    seconds = time.perf_counter() - t0
    targets = "/".join(f"sm_{a}" for a in archs)
    cpu_compile = sum(r.get("cpu_seconds", 0.0) for r in results)
    print(f"\n{len(results)} compiles of {len({r['kernel'] for r in results})} kernels for {targets}; recorded in "
          f"{t_record:.0f} s ({cpu_record:.0f} CPU-s), compiled in {cpu_compile:.0f} CPU-s, {seconds:.0f} s in all; "
          f"{len(failures)} failure(s)")
    for f in failures:
        print(f"FAIL {f}")
    if args.json:
        ratio = ratios_to({k: v for k, v in estimates.items() if not k.endswith("strided")})
        payload = {"triton": importlib.import_module("triton").__version__ if have_triton else None,
                   "torch": torch.__version__,
                   "seconds": {"record": t_record, "total": seconds, "record_cpu": cpu_record,
                               "compile_cpu": cpu_compile},
                   "estimates": {k: {**v.to_json(), "x_fused_adamw": ratio.get(k)} for k, v in estimates.items()},
                   "results": results, "launch_sites": sites, "bit_exact": bit_exact, "unchecked": unchecked,
                   "not_compiled": sorted(observer.not_compiled) if observer else [], "failures": failures,
                   "limits": {"max_spill": MAX_SPILL_BYTES, "min_warps_per_sm": MIN_WARPS_PER_SM}}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimopt.bench.triton_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
