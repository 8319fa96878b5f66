"""The GPU cost of one optimizer step at 1.34B parameters, counted on CPU: fake CUDA tensors, no GPU, no memory.

``python -m slimopt.bench.gpu_estimate`` (or ``slimopt bench gpu-estimate``) builds the harness's ``1b`` preset
(1.34B parameters in 219 tensors) as FakeTensors on ``cuda`` (torch's FakeTensorMode: shapes, dtypes, strides and
devices, no storage), gives every parameter a gradient, builds each registered optimizer (and torch's fused and
foreach AdamW, the baselines) with weight decay 0.01, takes two warm-up steps and records the third. It counts:

* **kernels**: every aten op that touches CUDA data is one CUDA kernel, except views, allocations and metadata
  (none); ``_foreach_*``/``_fused_*`` ops are as many launches as torch's ``multi_tensor_apply`` makes (its
  chunking loop replayed with ``ForeachLimits``) when their fast path applies (torch's
  ``check_fast_path_restrictions``: one device, strided, dense, one dtype per list and across lists, the same
  sizes and strides pair by pair, no scalar type promotion), else one per tensor (a *note* names the line and
  why); ``cat``/``stack`` one per 128 inputs of the output's dtype. Triton launches are intercepted (never
  compiled, never run): one kernel each. Host-device copies are counted apart (``copies``).
* **bytes** read + written: every tensor an op reads, once, and every tensor it writes (its outputs, the
  arguments its schema marks as mutated; ``zero_``/``fill_``/``copy_`` write without reading). A Triton kernel
  reads each tensor argument once and writes it once more if its source stores through that argument (found in
  the kernel's AST, through local names and ``@triton.jit`` helpers). Tensors a kernel reaches through int64
  address tables (host integers copied to the device, e.g. MicroAdam's ``SparseWindowStep``) are found again
  from the addresses (FakeTensors get synthetic ``data_ptr()`` values) and
  costed by ``TABLE_TRAFFIC`` for the kernels it lists, else generically (parameters and optimizer state read
  and written, gradients and anything else read).
* **matmul FLOPs**, each matmul at fp32, TF32 (when ``torch.get_float32_matmul_precision()`` or the cuBLAS
  flags allow it at the call) or bf16/fp16 tensor-core speed.
* **host syncs**, each with the innermost slimopt source line: ``.item()``/``float()``/``.tolist()`` of CUDA
  data, device-to-host copies, blocking host-to-device copies (``torch.tensor(..., device="cuda")``,
  ``.to("cuda")``; a ``non_blocking`` copy from pageable memory too), and data-dependent shapes of CUDA data
  (``nonzero``, boolean masks, ``masked_select``, ``unique``). Those of the optimizer's construction and of
  the two warm-up steps are reported apart.
* **problems**: a Triton argument or address-table entry that is not a contiguous CUDA tensor (or an address
  that is no tensor's), and a device mismatch between an op's tensors.

The step time is predicted with a roofline, ``t = bytes / BW + launches * t_launch + sum over matmuls of
max(0, flops / peak - bytes / BW)`` (launches: kernels + Triton + copies), with the constants of ``H200``
below: fitted on the H200 run of 2026-11-30 by ``shared/tools/gpu_step_estimate.py --validate`` (the weighted
least-squares fit of BW and t_launch to the measured step times of fused/foreach AdamW, Adam-mini and SinkGD at
a4aac37: ``shared/measurements/h200-2026-11-30/``); the tool predicted that commit's measured kernel counts
within 10% and its memory-bound step times with 19% RMS error. Limits: no cache is modelled (L2 reuse is
unseen), a compute-bound Triton kernel is costed by its bytes (MicroAdam's Top-K: predicted 42 ms, measured
94 ms), host time is only the per-launch constant, and a ``torch.compile``'d step is costed as the eager ops.

Validation (commit 8e740be, torch 2.13.0+cpu, legacy multi_tensor_apply limits): this module and
``shared/tools/gpu_step_estimate.py --src src`` agree exactly on every case: aten kernels, Triton launches,
copies, B/param, syncs in the step and in construction + warm-up, predicted ms (fp32 / bf16)::

    case            aten kernels   Triton   B/param        syncs  early syncs  predicted x fused AdamW
    adamw-fused        67 / 67      0 / 0   28.00 / 14.00  0 / 0    0 / 0      1.00 / 1.00 (11.50 / 5.96 ms)
    adamw-foreach     520 / 520     0 / 0   80.00 / 40.00  0 / 0    0 / 0      3.03 / 3.20
    adammini          557 / 557     0 / 0   36.05 / 18.06  1 / 1    5 / 2      1.54 / 1.78
    sinkgd            923 / 1,223   0 / 0  100.64 / 90.05  1 / 1    2 / 2      3.96 / 7.25
    swan            1,327 / 1,627   0 / 0  365.37 / 354.78 1 / 1    2 / 2    249.06 / 480.52
    microadam           0 / 0       3 / 3   17.57 / 9.57   1 / 1  221 / 221    0.61 / 0.64

Written anew, it differs from that tool in method where this matters later: host-side work runs on real CPU
tensors (the tool fakes them, so a CPU step counter reads back as a stub), address tables are read from those
real host tensors (no hook on a library function), and torch's foreach rules are checked in the order of
ForeachUtils.h (a tensor scalar on the device must share the list's dtype); none changes a count at 8e740be.

The CPU-side launch counts of ``bench.kernel_count`` (tiny widths) stay what the launch tests hold; this module is
what the GPU-readiness tests (``tests/test_gpu_readiness.py``) hold at real size.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import collections
import contextlib
import inspect
import json
import math
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["H200", "BASELINES", "Calibration", "FakeCuda", "ForeachLimits", "FOREACH_4KB", "FOREACH_32KB",
           "StepEstimate", "TABLE_TRAFFIC", "default_names", "estimate_step", "estimate_all", "foreach_launches",
           "main"]


# -- the roofline's constants ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """What one GPU does per second, for the roofline."""

    name: str
    bytes_per_s: float     # achieved DRAM bandwidth
    launch_s: float        # per kernel launch (host time and launch latency, as fitted)
    fp32_flops: float      # matmul, fp32 without TF32
    tf32_flops: float      # matmul, fp32 inputs on TF32 tensor cores
    half_flops: float      # matmul, bf16/fp16
    source: str


H200 = Calibration(
    "h200-2026-11-30", bytes_per_s=3.38e12, launch_s=6.14e-6, fp32_flops=50e12, tf32_flops=300e12,
    half_flops=600e12,
    source="BW and t_launch fitted by shared/tools/gpu_step_estimate.py --validate on the H200 run of 2026-11-30 "
           "(shared/measurements/h200-2026-11-30, commit a4aac37, torch 2.11.0+cu130); matmul peaks: the tool's "
           "defaults (H200 dense fp32 ~67, TF32 ~495, bf16 ~990 TFLOP/s nominal, taken at what cuBLAS reaches)")


@dataclass(frozen=True)
class ForeachLimits:
    """torch's ``multi_tensor_apply`` (aten/src/ATen/native/cuda/MultiTensorApply.cuh): a launch takes at most
    ``max_blocks`` chunks of ``chunk`` elements and at most ``max_tensors[depth - 1]`` tensors
    (``max_tensors_scalarlist`` for ops with a list of scalars)."""

    name: str
    chunk: int
    max_blocks: int
    max_tensors: tuple[int, ...]
    max_tensors_scalarlist: tuple[int, ...]


# 4 KB kernel arguments: what the H200 run's torch 2.11 did (65 launches for a 1.34B _foreach_lerp_)
FOREACH_4KB = ForeachLimits("legacy", 65536, 320, (110, 64, 48, 36, 30), (96, 64, 48, 36, 30))
# 32 KB kernel arguments (CUDA >= 12.1 runtime and driver, when torch's build takes that branch)
FOREACH_32KB = ForeachLimits("32kb", 65536, 2240, (770, 448, 336, 252, 210), (672, 448, 336, 252, 210))


def foreach_launches(numels: Sequence[int], depth: int, limits: ForeachLimits = FOREACH_4KB, *,
                     scalar_list: bool = False) -> int:
    """Kernel launches of one multi_tensor_apply over tensors of these sizes (empty ones are skipped): a launch
    goes out when its blocks are full, or its tensor slots are and the current tensor's last chunk is in."""
    slots = (limits.max_tensors_scalarlist if scalar_list else limits.max_tensors)[min(depth, 5) - 1]
    launches = blocks = tensors = 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        chunks = -(-n // limits.chunk)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if blocks == limits.max_blocks or (tensors == slots and last):
                launches += 1
                blocks = 0
                tensors = 0 if last else 1  # a tensor cut mid-way continues in the next launch
    return launches + (1 if blocks else 0)


# -- what a step did ------------------------------------------------------------------------------------------
PHASES = ("setup", "warm-up", "step")


@dataclass
class StepEstimate:
    """What one recorded step does on the GPU. ``syncs``/``problems``/``notes``: (what, where) -> count for the
    recorded step; ``early_syncs`` those of the optimizer's construction and the warm-up steps."""

    case: str
    n_params: int = 0
    n_tensors: int = 0
    aten_kernels: collections.Counter = field(default_factory=collections.Counter)   # op -> CUDA kernels
    triton_launches: collections.Counter = field(default_factory=collections.Counter)  # kernel -> launches
    copies: int = 0                                                                    # host <-> device memcpys
    bytes: collections.Counter = field(default_factory=collections.Counter)           # op or kernel -> bytes
    matmuls: list[tuple[float, float, str]] = field(default_factory=list)             # (flops, bytes, precision)
    syncs: collections.Counter = field(default_factory=collections.Counter)
    early_syncs: collections.Counter = field(default_factory=collections.Counter)
    problems: collections.Counter = field(default_factory=collections.Counter)
    notes: collections.Counter = field(default_factory=collections.Counter)
    lines: collections.Counter = field(default_factory=collections.Counter)           # where -> launches
    line_bytes: collections.Counter = field(default_factory=collections.Counter)
    grids: dict[str, set[int]] = field(default_factory=dict)                          # Triton kernel -> programs
    seconds: float = 0.0                                                              # simulation wall time

    @property
    def kernels(self) -> int:
        """CUDA kernels of the step: aten ops' and Triton's (not the copies)."""
        return sum(self.aten_kernels.values()) + sum(self.triton_launches.values())

    @property
    def launches(self) -> int:
        return self.kernels + self.copies

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.n_params, 1)

    @property
    def matmul_flops(self) -> float:
        return sum(f for f, _, _ in self.matmuls)

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def n_problems(self) -> int:
        return sum(self.problems.values())

    def predict_s(self, cal: Calibration = H200) -> float:
        peak = {"fp32": cal.fp32_flops, "tf32": cal.tf32_flops, "half": cal.half_flops}
        beyond_bytes = sum(max(0.0, flops / peak[kind] - nbytes / cal.bytes_per_s)
                           for flops, nbytes, kind in self.matmuls)
        return self.total_bytes / cal.bytes_per_s + self.launches * cal.launch_s + beyond_bytes

    def to_json(self, cal: Calibration = H200) -> dict[str, Any]:
        def listed(counter):
            return [[what, where, n] for (what, where), n in sorted(counter.items())]
        return {
            "case": self.case, "n_params": self.n_params, "n_tensors": self.n_tensors, "kernels": self.kernels,
            "aten_kernels": sum(self.aten_kernels.values()), "triton_launches": dict(self.triton_launches),
            "copies": self.copies, "bytes": self.total_bytes, "bytes_per_param": self.bytes_per_param,
            "matmul_flops": self.matmul_flops, "predicted_ms": self.predict_s(cal) * 1e3,
            "syncs": listed(self.syncs), "early_syncs": listed(self.early_syncs), "problems": listed(self.problems),
            "notes": listed(self.notes), "top_kernels": self.aten_kernels.most_common(10),
            "top_lines": self.lines.most_common(10), "simulated_s": self.seconds}


# -- where an op comes from ------------------------------------------------------------------------------------
_PACKAGE = Path(__file__).resolve().parents[1]          # src/slimopt
_OWN = {str(Path(__file__).resolve()), str(_PACKAGE / "bench" / "triton_check.py")}
_LIBRARIES = (str(Path(torch.__file__).parent), "/triton/", "/contextlib.py", "/functools.py")


def _where(frame) -> str:
    """The innermost frame of slimopt (not this module) as ``path:line (function)``; without one, the innermost of
    torch.optim or of the caller's own code."""
    other = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name not in _OWN:
            if name.startswith(str(_PACKAGE)):
                return f"slimopt/{Path(name).relative_to(_PACKAGE)}:{frame.f_lineno} ({frame.f_code.co_name})"
            if other is None and "/torch/optim/" in name:
                other = f"torch/optim/{Path(name).name}:{frame.f_lineno} ({frame.f_code.co_name})"
            elif other is None and not any(part in name for part in _LIBRARIES) and not name.startswith("<"):
                other = f"{Path(name).name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return other or "?"


# -- addresses of fake tensors, and the way back ---------------------------------------------------------------
class _AddressBook:
    """Synthetic ``data_ptr()`` values for FakeTensors (4 KiB-aligned storages, far apart), and the tensor an
    address stands for (the last one that reported it; else the storage it falls in)."""

    FIRST = 1 << 40

    def __init__(self) -> None:
        self._next = self.FIRST
        self._base: dict[int, int] = {}        # id(storage) -> base
        self._storages: dict[int, Any] = {}    # keep storages alive: their ids stay theirs
        self._starts: list[int] = []
        self._extent: dict[int, int] = {}      # base -> bytes
        self._tensors: dict[int, torch.Tensor] = {}

    def address(self, t: torch.Tensor) -> int:
        base = self.storage_base(t)
        address = base + t.storage_offset() * t.element_size()
        self._tensors[address] = t
        return address

    def storage_base(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._base:
            size = max(storage.nbytes(), 1)
            self._base[key], self._storages[key] = self._next, storage
            bisect.insort(self._starts, self._next)
            self._extent[self._next] = size
            self._next += (size // 4096 + 2) * 4096
        return self._base[key]

    def tensor_at(self, address: int) -> torch.Tensor | None:
        return self._tensors.get(address)

    def inside_a_storage(self, address: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._starts[i] + self._extent[self._starts[i]]

    def is_candidate(self, value: int) -> bool:
        return value >= self.FIRST


# -- the stores of a Triton kernel -----------------------------------------------------------------------------
_STORE_CALLS = {"store", "atomic_add", "atomic_max", "atomic_min", "atomic_and", "atomic_or", "atomic_xor",
                "atomic_xchg", "atomic_cas"}
_stored_cache: dict[Any, frozenset[str]] = {}


def _python_function(kernel: Any) -> Any:
    fn = kernel
    while not inspect.isfunction(fn) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _is_triton_callable(obj: Any) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction", "JITCallable") and hasattr(obj, "fn")


def stored_parameters(kernel: Any) -> frozenset[str]:
    """The parameters of a ``@triton.jit`` function through which it stores (``tl.store``/``tl.atomic_*``
    into an address computed from them; a value loaded through a pointer is data, not that pointer), also
    through the helpers it calls."""
    fn = _python_function(kernel)
    if fn in _stored_cache:
        return _stored_cache[fn]
    _stored_cache[fn] = frozenset()  # recursion guard
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    params = [a.arg for a in node.args.args]
    origins: dict[str, set[str]] = {p: {p} for p in params}

    def names(expr: ast.AST | None) -> set[str]:
        """Parameters an address expression derives from (not through a load)."""
        if expr is None:
            return set()
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "load":
            return set()
        if isinstance(expr, ast.Name):
            return set(origins.get(expr.id, ()))
        found: set[str] = set()
        for child in ast.iter_child_nodes(expr):
            found |= names(child)
        return found

    assigns = [n for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))]
    for _ in range(8):  # local names' origins to a fixed point (loops assign late)
        changed = False
        for a in assigns:
            targets = a.targets if isinstance(a, ast.Assign) else [a.target]
            for target in targets:
                elts = target.elts if isinstance(target, ast.Tuple) else [target]
                values = a.value.elts if isinstance(a.value, ast.Tuple) and len(a.value.elts) == len(elts) else None
                for i, t in enumerate(elts):
                    if isinstance(t, ast.Name):
                        src = names(values[i] if values else a.value)
                        if not src <= origins.get(t.id, set()):
                            origins[t.id] = origins.get(t.id, set()) | src
                            changed = True
        if not changed:
            break
    stored: set[str] = set()
    module_globals = getattr(fn, "__globals__", {})
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in _STORE_CALLS:
            target = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "pointer"), None)
            stored |= names(target)
        elif isinstance(func, ast.Name) and _is_triton_callable(module_globals.get(func.id)):
            helper = module_globals[func.id]
            helper_params = inspect.signature(_python_function(helper)).parameters
            bound = dict(zip(helper_params, call.args))
            bound.update({k.arg: k.value for k in call.keywords if k.arg})
            for p in stored_parameters(helper):
                stored |= names(bound.get(p))
    result = frozenset(stored & set(params))
    _stored_cache[fn] = result
    return result


# -- pointer-table kernels: what a launch moves ----------------------------------------------------------------
@dataclass
class Reached:
    """The tensors a launch reaches through its address tables, bytes by role: ``params``, ``grads``,
    ``state[key]`` (optimizer state under that key), ``other``; ``param_numel`` elements of parameters."""

    params: float = 0.0
    grads: float = 0.0
    other: float = 0.0
    param_numel: int = 0
    state: collections.Counter = field(default_factory=collections.Counter)

    def of(self, *keys: str) -> float:
        return float(sum(self.state[k] for k in keys))


def _window_traffic(r: Reached, a: dict[str, Any]) -> float:
    window = r.of("window_indices", "window_values")
    entries = r.state["window_indices"] / 2  # int16 positions: one per window entry
    touched = 1.0 if a.get("DECAY") else min(1.0, entries / max(r.param_numel, 1))  # p read and written there
    return window + 2 * r.params * touched


# Per kernel (by name), bytes of one launch from the tensors its tables reach and its bound arguments; their
# kernel docstrings (ops/sparse_window_triton.py) give the same counts per parameter.
TABLE_TRAFFIC: dict[str, Callable[[Reached, dict[str, Any]], float]] = {
    # g once (finiteness)
    "_group_check_kernel": lambda r, a: r.grads,
    # g once; error feedback (codes, ranges) read and written; one of the window's m rows written
    "_group_compress_kernel": lambda r, a: (r.grads + 2 * r.of("ef_codes", "ef_min", "ef_max")
                                            + r.of("window_indices", "window_values") / max(int(a.get("m", 1)), 1)),
    # the window read; p read and written where a row holds a position, everywhere with weight decay
    "_group_window_kernel": _window_traffic,
}


def _generic_traffic(r: Reached) -> float:
    return 2 * (r.params + sum(r.state.values())) + r.grads + r.other


# -- the recording ---------------------------------------------------------------------------------------------
# ops that launch nothing: views, allocations, metadata
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "set_",
              "resize_", "alias", "detach", "_reshape_alias", "_unsafe_view", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "size", "stride", "dim", "is_contiguous", "is_pinned", "record_stream",
              "_has_compatible_shallow_copy_type", "is_same_size", "is_floating_point", "is_complex"}
# in-place ops that write their first argument without reading it
_WRITE_ONLY = {"zero_", "fill_", "copy_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}
# in-place ops that write only where an index says: indices and values read, as many entries written
_SPARSE_WRITE = {"index_put_", "index_copy_", "index_fill_", "scatter_", "scatter_add_", "scatter_reduce_",
                 "masked_scatter_", "_index_put_impl_"}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "_addmm_activation"}
# ops whose integer inputs turn float: torch keeps them off the foreach fast path for integer tensors
_PROMOTE_INTEGERS = {"div", "sqrt", "rsqrt", "exp", "expm1", "log", "log10", "log1p", "log2", "reciprocal",
                     "sigmoid", "tanh", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "erf",
                     "erfc", "lgamma", "norm"}
_REDUCTIONS = {"norm", "max"}  # _foreach_norm/_foreach_max: a second (cleanup) kernel, and no output list
_CAT_BATCH = 128               # inputs per launch of torch's batched cat kernel


def _tf32_allowed() -> bool:
    """Whether an fp32 CUDA matmul issued now may use TF32 tensor cores (the new cuBLAS flag, the legacy one, or
    the float32 matmul precision)."""
    reads = (lambda: torch.backends.cuda.matmul.fp32_precision == "tf32",
             lambda: torch.backends.cuda.matmul.allow_tf32,
             lambda: torch.get_float32_matmul_precision() != "highest")
    for read in reads:
        with contextlib.suppress(Exception):
            if read():
                return True
    return False


def _matmul_flops(op: str, args: Sequence[Any]) -> float:
    a = [x for x in args if isinstance(x, torch.Tensor)]
    if op in ("addmm", "baddbmm", "addbmm", "addmv", "_addmm_activation"):
        a = a[1:]
    if op in ("mm", "addmm", "_addmm_activation"):
        return 2.0 * a[0].shape[0] * a[0].shape[1] * a[1].shape[1]
    if op in ("bmm", "baddbmm", "addbmm"):
        return 2.0 * a[0].shape[0] * a[0].shape[1] * a[0].shape[2] * a[1].shape[2]
    if op in ("mv", "addmv"):
        return 2.0 * a[0].shape[0] * a[0].shape[1]
    return 2.0 * a[0].numel()  # dot


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_fake_cuda(x: Any) -> bool:
    return isinstance(x, FakeTensor) and x.device.type == "cuda"


def _stub(t: torch.Tensor) -> Any:
    """What a data-dependent read answers: True for flags (a step goes ahead), 1 for counts, 1.0 for floats."""
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.is_floating_point() else 1


class _Ledger:
    """Everything one estimate records, per phase."""

    def __init__(self, result: StepEstimate, book: _AddressBook) -> None:
        self.result, self.book = result, book
        self.phase = "setup"
        self.model: torch.nn.Module | None = None
        self.optimizer: Any = None
        self.host_ints: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # int64 tensors of host integers
        self.pinned: dict[int, torch.Tensor] = {}

    @property
    def recording(self) -> bool:
        return self.phase == "step"

    def sync(self, what: str, frame) -> None:
        (self.result.syncs if self.recording else self.result.early_syncs)[(what, _where(frame))] += 1

    def problem(self, what: str, frame) -> None:
        self.result.problems[(what, _where(frame))] += 1  # any phase: a mistake is one wherever it happens

    def note(self, what: str, frame) -> None:
        if self.recording:
            self.result.notes[(what, _where(frame))] += 1

    def launched(self, name: str, kernels: int, nbytes: float, frame, *, triton: bool = False) -> None:
        if not self.recording:
            return
        r = self.result
        (r.triton_launches if triton else r.aten_kernels)[name] += kernels
        r.bytes[name] += nbytes
        where = _where(frame)
        r.lines[where] += kernels
        r.line_bytes[where] += nbytes

    def contents(self, t: torch.Tensor) -> np.ndarray | None:
        """The values of an int64 host tensor (a real one), or of a fake copy made of one."""
        if not isinstance(t, FakeTensor) and t.device.type == "cpu" and t.dtype == torch.int64:
            with _disable_current_modes():  # else reading it dispatches to the fake mode
                return np.array(t.numpy(), copy=True)
        entry = self.host_ints.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def keep_contents(self, t: torch.Tensor, contents: np.ndarray) -> None:
        self.host_ints[id(t)] = (t, contents)


class _Dispatch(TorchDispatchMode):
    """Every aten op of the fake CUDA run: its kernels, bytes, syncs and problems (above the FakeTensorMode)."""

    def __init__(self, ledger: _Ledger, limits: ForeachLimits) -> None:
        super().__init__()
        self.ledger, self.limits = ledger, limits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ledger = self.ledger
        op = func.overloadpacket.__name__
        frame = sys._getframe(1)
        if op == "_pin_memory":  # no pinned memory without CUDA: a copy that remembers it is pinned
            if isinstance(args[0], FakeTensor):
                out = torch.empty_like(args[0])
            else:
                with _disable_current_modes():
                    out = args[0].clone()
            ledger.pinned[id(out)] = out
            return out
        if op == "is_pinned":
            return id(args[0]) in ledger.pinned and ledger.pinned[id(args[0])] is args[0]
        if _runs_on_host(op, args, kwargs):  # host-side work runs for real: its values are the real ones
            with _disable_current_modes():
                return func(*args, **kwargs)
        if op == "_local_scalar_dense":  # a fake tensor's value: a stub (read from the device: a sync)
            if args[0].device.type == "cuda":
                ledger.sync(".item()/float()/bool() of CUDA data (D2H copy + sync)", frame)
                if ledger.recording:
                    ledger.result.copies += 1
            return _stub(args[0])
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            ledger.sync(f"{op}: output shape depends on CUDA data (sync)", frame)
            out = self._upper_bound(func, op, args, kwargs)
            if ledger.recording:
                ledger.result.copies += 1  # the count read back
        except FakeTensorDeviceMismatchError as exc:
            ledger.problem(f"{op}: tensors on different devices ({str(exc).splitlines()[0][:100]})", frame)
            cuda = torch.device("cuda", 0)  # go on as if the host tensors had been on the device

            def moved(x):
                if isinstance(x, torch.Tensor) and x.dim() and x.device.type != "cuda":
                    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=cuda)
                return x
            out = func(*tree_map(moved, args), **tree_map(moved, kwargs))
        self._follow_host_ints(op, args, kwargs, out)
        if op in ("_to_copy", "copy_", "_copy_from") and self._transfer(op, args, kwargs, out, frame):
            return out
        if ledger.recording:
            self._account(func, op, args, kwargs, out, frame)
        return out

    # host <-> device
    def _transfer(self, op, args, kwargs, out, frame) -> bool:
        src = args[1] if op == "copy_" else args[0]
        dst = args[0] if op == "copy_" else (out if op == "_to_copy" else args[1])
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)) or src.device == dst.device:
            return False
        ledger = self.ledger
        non_blocking = kwargs.get("non_blocking", args[2] if op == "copy_" and len(args) > 2 else False)
        if dst.device.type == "cpu":
            ledger.sync(f"{op} CUDA -> CPU (D2H copy + sync)", frame)
        elif not non_blocking:
            ledger.sync(f"{op} CPU -> CUDA, blocking (memcpy + stream sync)", frame)
        elif not (id(src) in ledger.pinned and ledger.pinned[id(src)] is src):
            ledger.sync(f"{op} CPU -> CUDA non_blocking from pageable memory (waits for the copy)", frame)
        if ledger.recording:
            ledger.result.copies += 1
            ledger.result.bytes[f"memcpy {src.device.type}->{dst.device.type}"] += _nbytes(src)
            ledger.result.lines[_where(frame)] += 1
        return True

    def _follow_host_ints(self, op, args, kwargs, out) -> None:
        """Host integer contents travel with copies (pinned, to the device): address tables are built so."""
        if op not in ("_to_copy", "copy_", "clone", "_copy_from") or not args:
            return
        src = args[1] if op == "copy_" else args[0]
        dst = args[0] if op == "copy_" else out
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and dst.dtype == torch.int64:
            contents = self.ledger.contents(src)
            if contents is not None:
                self.ledger.keep_contents(dst, contents)

    @staticmethod
    def _upper_bound(func, op, args, kwargs):
        """An output of the largest shape a data-dependent op can give (every entry selected)."""
        t = next(x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor))
        if op in ("nonzero", "argwhere"):
            return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
        if op == "masked_select":
            return torch.empty((t.numel(),), dtype=t.dtype, device=t.device)
        if op.startswith("unique") or op.startswith("_unique"):
            flat = torch.empty((t.numel(),), dtype=t.dtype, device=t.device)
            count = torch.empty((t.numel(),), dtype=torch.long, device=t.device)
            return (flat, count, count)
        if op in ("index", "_index_put_impl_", "index_put_", "index_put"):  # boolean masks: all positions
            indices = [None if i is None else
                       (torch.empty((i.numel(),), dtype=torch.long, device=i.device) if i.dtype == torch.bool else i)
                       for i in args[1]]
            if any(i is not None and i.dtype == torch.bool for i in args[1]) and all(
                    i is None or i.dim() <= 1 for i in args[1]):
                return func(args[0], indices, *args[2:], **kwargs)
        raise DynamicOutputShapeException(func)

    # kernels and bytes
    def _account(self, func, op, args, kwargs, out, frame) -> None:
        ledger = self.ledger
        if func.is_view or op in _NO_KERNEL or func.namespace == "prim":
            return
        schema = func._schema
        inputs, written, write_only = [], [], set()
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
            tensors = [x for x in tree_leaves(value) if isinstance(x, torch.Tensor)]
            if not tensors:
                continue
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            if arg.name == "out" or (mutated and arg.kwarg_only):
                written += tensors  # out= arguments: written, not read
                continue
            if mutated and not (op.startswith("_fused_") and arg.name == "grads" and kwargs.get("grad_scale") is None):
                written += tensors
                if i == 0 and op in _WRITE_ONLY:
                    write_only.update(id(t) for t in tensors)
            inputs += tensors
        returned = list(out) if isinstance(out, (list, tuple)) else [out]
        rets = schema.returns
        pairs = [(x, rets[0]) for x in returned] if len(rets) == 1 else list(zip(returned, rets))
        fresh = [x for x, ret in pairs if isinstance(x, torch.Tensor) and ret.alias_info is None]
        if not any(x.device.type == "cuda" for x in inputs + written + fresh):
            return
        if not fresh and not written:  # nothing written on the device: a value the host reads
            if op in ("equal", "is_nonzero", "allclose"):
                ledger.sync(f"{op}: a CUDA comparison read on the host (sync)", frame)
                ledger.result.copies += 1
            return
        seen: set[int] = set()
        nbytes = 0
        if op in _SPARSE_WRITE:
            nbytes = 2 * sum(_nbytes(x) for x in inputs[1:] if x is not inputs[0])
        else:
            for x in inputs:
                if id(x) not in seen and id(x) not in write_only:
                    seen.add(id(x))
                    nbytes += _nbytes(x)
            for x in written + fresh:
                nbytes += _nbytes(x)
        if op.startswith(("_foreach_", "_fused_")):
            kernels = self._foreach_kernels(func, op, args, kwargs, frame)
        elif op in ("cat", "stack"):
            parts = [x for x in args[0] if x.numel() > 0]
            target = (fresh or written)[0].dtype  # inputs of another dtype: one copy kernel each
            kernels = -(-len(parts) // _CAT_BATCH) if all(x.dtype == target for x in parts) else len(parts)
        else:
            kernels = 0 if fresh and all(x.numel() == 0 for x in fresh) and not written else 1
        if op in _MATMULS:
            dtype = (fresh or written)[0].dtype
            kind = "half" if dtype in (torch.bfloat16, torch.float16) else ("tf32" if _tf32_allowed() else "fp32")
            ledger.result.matmuls.append((_matmul_flops(op, args), float(nbytes), kind))
        ledger.launched(op, kernels, nbytes, frame)

    def _foreach_kernels(self, func, op, args, kwargs, frame) -> int:
        """torch's fast path (multi_tensor_apply launches) when its restrictions hold, else one kernel per tensor."""
        schema = func._schema
        lists: list[list[torch.Tensor]] = []
        scalars: list[Any] = []
        scalar_list = False
        tensor_scalar = None
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name, None)
            kind = str(arg.type)
            if kind in ("List[Tensor]", "Tensor[]", "List[Optional[Tensor]]", "Tensor?[]"):
                if value:
                    lists.append([x for x in value if x is not None])
            elif kind in ("List[Scalar]", "Scalar[]", "List[number]"):
                scalar_list, scalars = True, list(value)
            elif kind in ("Scalar", "number") and value is not None and arg.name != "alpha" and not arg.kwarg_only:
                scalars = [value]
            elif kind == "Tensor" and isinstance(value, torch.Tensor) and not arg.kwarg_only:
                tensor_scalar = value
        if not lists or not lists[0]:
            return 0
        base = op.removeprefix("_foreach_").rstrip("_")
        fused = op.startswith("_fused_")
        in_place = op.endswith("_") or fused
        if tensor_scalar is not None and base in ("addcmul", "addcdiv"):  # a tensor of scalars, one per tensor
            scalar_list, tensor_scalar = True, None
        reason = self._slow_reason(op, base, lists, scalars, tensor_scalar, fused)
        first = lists[0]
        if reason is not None:
            ledger = self.ledger
            ledger.note(f"{op} off the fast path ({reason}): one kernel per tensor ({len(first)})", frame)
            return sum(1 for x in first if x.numel() > 0)
        if fused:  # params, grads, exp_avgs, exp_avg_sqs (, max_exp_avg_sqs)
            depth = 5 if len(lists) > 5 else 4
            return foreach_launches([x.numel() for x in first], depth, self.limits)
        depth = len(lists) + (0 if in_place or base in _REDUCTIONS else 1)
        launches = foreach_launches([x.numel() for x in first], depth, self.limits, scalar_list=scalar_list)
        return launches + (1 if base in _REDUCTIONS else 0)

    @staticmethod
    def _slow_reason(op, base, lists, scalars, tensor_scalar, fused) -> str | None:
        first = lists[0]
        device, dtype = first[0].device, first[0].dtype
        if device.type != "cuda":
            return "not on CUDA"
        for lst in lists if not fused else lists[:1]:
            list_dtype = lst[0].dtype
            for x in lst:
                if x.device != device:
                    return "tensors on several devices"
                if x.layout != torch.strided or not is_non_overlapping_and_dense_or_false(x):
                    return "a tensor is not dense"
                if x.dtype != list_dtype or (x.dtype != dtype and op != "_foreach_copy_"):
                    return "dtypes differ within or across the lists"
        if not fused:
            for lst in lists[1:]:
                if len(lst) != len(first):
                    continue
                for a, b in zip(first, lst):
                    if a.shape != b.shape or any(s != t for s, t, n in zip(a.stride(), b.stride(), a.shape) if n != 1):
                        return "paired tensors differ in shape or strides"
            for i, x in enumerate(first):
                if base in _PROMOTE_INTEGERS and not (x.is_floating_point() or x.is_complex()):
                    return "integer tensors would turn float"
                s = scalars[i] if len(scalars) == len(first) else (scalars[0] if scalars else None)
                if isinstance(s, complex) and not x.is_complex():
                    return "a complex scalar"
                if isinstance(s, float) and not (x.is_floating_point() or x.is_complex()):
                    return "a float scalar with integer tensors"
                if isinstance(s, bool) is False and isinstance(s, int) and x.dtype == torch.bool:
                    return "an integer scalar with bool tensors"
        if tensor_scalar is not None and tensor_scalar.device.type == "cuda" and tensor_scalar.dtype != dtype:
            return "the scalar tensor's dtype differs from the tensors'"
        return None


class _PythonBindings(TorchFunctionMode):
    """Tensor methods whose C++ bindings open a CUDA device guard before dispatching (impossible in a CPU-only
    build) are replaced, for fake CUDA tensors, by the aten ops they dispatch on a GPU; host-data reads (a
    sync each) are answered with a stub."""

    _SCALARS = {"item": lambda v: v, "__float__": float, "__int__": int, "__index__": int, "__bool__": bool}

    def __init__(self, ledger: _Ledger) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not (args and _is_fake_cuda(args[0])):
            return _on_cuda_zero(func, args, kwargs)
        t = args[0]
        frame = sys._getframe(1)
        if name == "__getitem__":
            return _index(t, args[1])
        if name == "__setitem__":
            _index_put(t, args[1], args[2])
            return None
        if name == "copy_":
            src = args[1] if len(args) > 1 else kwargs["src"]
            return torch.ops.aten.copy_.default(t, src, bool(args[2] if len(args) > 2 else
                                                             kwargs.get("non_blocking", False)))
        if name == "contiguous":
            fmt = args[1] if len(args) > 1 else kwargs.get("memory_format", torch.contiguous_format)
            return t if t.is_contiguous(memory_format=fmt) else torch.ops.aten.clone.default(t, memory_format=fmt)
        if name in self._SCALARS:
            return self._SCALARS[name](torch.ops.aten._local_scalar_dense.default(t))
        if name == "tolist":
            return _read_list(self.ledger, t, frame)
        if name in ("nonzero", "argwhere"):
            out = torch.ops.aten.nonzero.default(t)
            return tuple(out.unbind(1)) if kwargs.get("as_tuple") else out
        return _on_cuda_zero(func, args, kwargs)


def _on_cuda_zero(func, args, kwargs):
    """``func``; if its binding asked the (absent) CUDA runtime for the current device, again with ``cuda:0``
    named (the only fake device)."""
    try:
        return func(*args, **kwargs)
    except RuntimeError as exc:
        if "not linked with support for cuda" not in str(exc):
            raise

    def explicit(x):
        if isinstance(x, torch.device) and x.type == "cuda" and x.index is None:
            return torch.device("cuda", 0)
        return "cuda:0" if x == "cuda" else x
    return func(*tree_map(explicit, args), **tree_map(explicit, kwargs))


_HOST_FACTORY_LIMIT = 1 << 24  # elements: a larger host allocation stays fake (no real memory)


def _runs_on_host(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether an op only involves real host tensors (step counters, lr tensors, tables being built), so that
    it may run for real: no fake tensor, no device other than the CPU, no large new tensor."""
    leaves = tree_leaves((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if any(isinstance(x, FakeTensor) or x.device.type != "cpu" for x in tensors):
        return False
    devices = [x for x in leaves if isinstance(x, (torch.device, str)) and x not in ("cpu",)]
    if any(isinstance(d, torch.device) and d.type != "cpu" or isinstance(d, str) and d.split(":")[0] in
           ("cuda", "meta") for d in devices):
        return False
    if not tensors:  # a factory: its size is the first list of ints
        size = next((a for a in args if isinstance(a, (list, tuple, torch.Size))), ())
        return all(isinstance(n, int) for n in size) and math.prod(size) <= _HOST_FACTORY_LIMIT
    return True


def _read_list(ledger: _Ledger, t: torch.Tensor, frame) -> Any:
    ledger.sync(".tolist() of CUDA data (D2H copy + sync)", frame)
    if ledger.recording:
        ledger.result.copies += 1

    def nested(shape):
        return _stub(t) if not shape else [nested(shape[1:]) for _ in range(shape[0])]
    return nested(tuple(t.shape))


def _index(t: torch.Tensor, index: Any) -> torch.Tensor:
    """``t[index]`` as aten ops: the basic part (ints, slices, None, ...) one strided view, then
    ``aten.index`` for tensor indices (numpy semantics, as torch applies them)."""
    view, advanced = _basic_view(t, index)
    return torch.ops.aten.index.Tensor(view, advanced) if advanced else view


def _index_put(t: torch.Tensor, index: Any, value: Any) -> None:
    view, advanced = _basic_view(t, index)
    if advanced:
        if not isinstance(value, torch.Tensor):
            value = torch.full((), value, dtype=t.dtype, device=t.device)
        torch.ops.aten.index_put_.default(view, advanced, value)
    elif isinstance(value, torch.Tensor):
        torch.ops.aten.copy_.default(view, value)
    else:
        torch.ops.aten.fill_.Scalar(view, value)


def _basic_view(t: torch.Tensor, index: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The strided view of ``t`` that the basic part of ``index`` selects, and the index list ``aten.index``
    takes for the rest: one entry per dimension of the view up to the last tensor index (None: all of it; a
    boolean mask stands for as many dimensions as it has)."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 if not isinstance(i, torch.Tensor) or i.dtype not in (torch.bool, torch.uint8) else i.dim()
                   for i in items if i is not None and i is not Ellipsis and not isinstance(i, bool))
    shape, stride, offset = list(t.shape), list(t.stride()), t.storage_offset()
    out_shape: list[int] = []
    out_stride: list[int] = []
    indices: list[torch.Tensor | None] = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            for _ in range(t.dim() - consumed):
                out_shape.append(shape[dim])
                out_stride.append(stride[dim])
                indices.append(None)
                dim += 1
        elif item is None or isinstance(item, bool):
            out_shape.append(0 if item is False else 1)
            out_stride.append(0)
            indices.append(None)
        elif isinstance(item, (int, torch.SymInt)):
            offset += (item + shape[dim] if item < 0 else item) * stride[dim]
            dim += 1
        elif isinstance(item, slice):
            start, stop, step = item.indices(shape[dim])
            out_shape.append(len(range(start, stop, step)))
            out_stride.append(stride[dim] * step)
            offset += start * stride[dim]
            indices.append(None)
            dim += 1
        else:  # a tensor or a sequence: advanced indexing of this dimension (a mask: of as many as it has)
            idx = item if isinstance(item, torch.Tensor) else torch.tensor(item, device=t.device)
            if idx.dtype in (torch.bool, torch.uint8):  # as torch does: the mask's nonzero positions
                span = idx.dim()
                indices += list(torch.ops.aten.nonzero.default(idx).unbind(1))
            else:
                span = 1
                indices.append(idx)
            out_shape += shape[dim:dim + span]
            out_stride += stride[dim:dim + span]
            dim += span
    out_shape += shape[dim:]
    out_stride += stride[dim:]
    view = torch.ops.aten.as_strided.default(t, out_shape, out_stride, offset)
    while indices and indices[-1] is None:
        indices.pop()
    return view, indices


# -- Triton launches: recorded, never compiled or run ----------------------------------------------------------
LaunchObserver = Callable[[Any, tuple, dict, Any], None]


class _TritonLaunches:
    """Replaces ``JITFunction.run`` and the interpreter's ``run`` (what ``kernel[grid](...)`` calls) while
    installed: each launch is checked and costed, ``observers`` see it (the AOT check records its
    specialisation there), and nothing compiles or runs."""

    def __init__(self, ledger: _Ledger, observers: Sequence[LaunchObserver]) -> None:
        self.ledger, self.observers = ledger, list(observers)
        self._saved: list[tuple[type, Any]] = []

    def install(self) -> None:
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        launches = self

        def recording_run(original):
            def run(kernel, *args, grid, warmup, **kwargs):
                if warmup:
                    return None
                return launches.launch(kernel, args, kwargs, grid, sys._getframe(1))
            run.__wrapped__ = original  # Triton's own, for observers that bind arguments with it
            return run

        for cls in (JITFunction, InterpretedFunction):
            self._saved.append((cls, cls.__dict__["run"]))
            cls.run = recording_run(cls.__dict__["run"])

    def uninstall(self) -> None:
        for cls, original in self._saved:
            cls.run = original
        self._saved.clear()

    def launch(self, kernel, args, kwargs, grid, frame) -> None:
        ledger = self.ledger
        fn = _python_function(kernel)
        name = fn.__name__
        params = list(inspect.signature(fn).parameters)
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        for observer in self.observers:
            observer(kernel, args, kwargs, grid)
        grid = grid(bound) if callable(grid) else grid
        stored = stored_parameters(kernel)
        nbytes = 0.0
        reached = Reached()
        tables = False
        for arg, value in bound.items():
            if not isinstance(value, torch.Tensor):
                continue
            self._check(name, f"argument {arg}", value, frame)
            nbytes += _nbytes(value) * (2 if arg in stored else 1)
            contents = ledger.contents(value) if value.dtype == torch.int64 else None
            if contents is not None:
                tables |= self._reach(name, arg, contents, reached, frame)
        if tables:
            traffic = TABLE_TRAFFIC.get(name)
            nbytes += traffic(reached, bound) if traffic is not None else _generic_traffic(reached)
        if ledger.recording:
            ledger.result.grids.setdefault(name, set()).add(math.prod(int(g) for g in grid))
        ledger.launched(name, 1, nbytes, frame, triton=True)
        return None

    def _check(self, kernel: str, what: str, t: torch.Tensor, frame) -> None:
        if t.device.type != "cuda":
            self.ledger.problem(f"Triton {kernel}: {what} is on {t.device.type}, not CUDA", frame)
        elif not t.is_contiguous():
            self.ledger.problem(f"Triton {kernel}: {what} is not contiguous (the kernel indexes it flat)", frame)

    def _reach(self, kernel: str, arg: str, contents: np.ndarray, reached: Reached, frame) -> bool:
        """The tensors whose addresses a table holds: checked, and added to ``reached`` by role."""
        ledger, book = self.ledger, self.ledger.book
        roles = self._roles()
        found = False
        seen: set[int] = set()
        for value in np.asarray(contents).reshape(-1).tolist():
            if not book.is_candidate(value) or value in seen:
                continue
            seen.add(value)
            t = book.tensor_at(value)
            if t is None:
                if not book.inside_a_storage(value):
                    ledger.problem(f"Triton {kernel}: table {arg} holds an address of no tensor", frame)
                continue
            found = True
            self._check(kernel, f"an entry of table {arg}", t, frame)
            role = roles.get(book.storage_base(t))
            size = _nbytes(t)
            if role == "param":
                reached.params += size
                reached.param_numel += t.numel()
            elif role == "grad":
                reached.grads += size
            elif role is not None:
                reached.state[role] += size
            else:
                reached.other += size
        return found

    def _roles(self) -> dict[int, str]:
        ledger, book = self.ledger, self.ledger.book
        roles: dict[int, str] = {}
        if ledger.optimizer is not None:
            for state in getattr(ledger.optimizer, "state", {}).values():
                for key, value in (state.items() if isinstance(state, dict) else ()):
                    if isinstance(value, torch.Tensor) and isinstance(value, FakeTensor):
                        roles[book.storage_base(value)] = str(key)
        if ledger.model is not None:
            for p in ledger.model.parameters():
                roles[book.storage_base(p)] = "param"
                if isinstance(p.grad, FakeTensor):
                    roles[book.storage_base(p.grad)] = "grad"
        return roles


# -- the fake CUDA session -------------------------------------------------------------------------------------
class FakeCuda:
    """A context in which CUDA tensors are FakeTensors and every op, Triton launch, sync and problem is recorded
    into ``self.result`` (phases: "setup", then ``with session.phase("warm-up")``, ``session.phase("step")``:
    only the "step" phase's kernels and bytes are counted)::

        with FakeCuda("mine") as session:
            x = torch.empty(1024, device="cuda")
            with session.phase("step"):
                x.mul_(2)
        session.result.kernels  # 1
    """

    def __init__(self, case: str = "case", *, limits: ForeachLimits = FOREACH_4KB,
                 observers: Sequence[LaunchObserver] = ()) -> None:
        self.result = StepEstimate(case)
        self.book = _AddressBook()
        self.ledger = _Ledger(self.result, self.book)
        self.limits = limits
        self._triton = _TritonLaunches(self.ledger, observers)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FakeCuda:
        stack = self._stack
        book, ledger = self.book, self.ledger
        saved = {k: FakeTensor.__dict__.get(k) for k in ("data_ptr", "tolist")}

        def restore() -> None:
            for k, v in saved.items():
                if v is None:
                    with contextlib.suppress(AttributeError):
                        delattr(FakeTensor, k)
                else:
                    setattr(FakeTensor, k, v)

        FakeTensor.data_ptr = lambda t: book.address(t)
        FakeTensor.tolist = lambda t: (_read_list(ledger, t, sys._getframe(1)) if t.device.type == "cuda"
                                       else saved["tolist"](t))
        stack.callback(restore)
        self._triton.install()
        stack.callback(self._triton.uninstall)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(_PythonBindings(ledger))
        stack.enter_context(_Dispatch(ledger, self.limits))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"phase {name!r}: expected one of {', '.join(PHASES)}")
        before, self.ledger.phase = self.ledger.phase, name
        try:
            yield
        finally:
            self.ledger.phase = before

    def watch(self, model: torch.nn.Module | None = None, optimizer: Any = None) -> None:
        """Tell the session which tensors are parameters, gradients and optimizer state (address tables)."""
        self.ledger.model, self.ledger.optimizer = model, optimizer


# -- the cases -------------------------------------------------------------------------------------------------
BASELINES = ("adamw-fused", "adamw-foreach")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_names() -> list[str]:
    """torch's fused and foreach AdamW, then every registered optimizer of slimopt."""
    from slimopt.registry import SPECS

    return [*BASELINES, *(name for name, spec in SPECS.items() if spec.in_slimopt)]


def estimate_step(optimizer: str | Callable[[torch.nn.Module], Any], dtype: str = "fp32", *, preset: str = "1b",
                  weight_decay: float = 0.01, warmup_steps: int = 2, limits: ForeachLimits = FOREACH_4KB,
                  observers: Sequence[LaunchObserver] = (), model: torch.nn.Module | None = None) -> StepEstimate:
    """One optimizer step of ``preset`` (a harness model preset) with ``dtype`` parameters on fake CUDA tensors,
    after ``warmup_steps``. ``optimizer``: a harness name (``bench.baselines.make_optimizer``:
    ``"adammini"``, ``"adamw-fused"``, ``"microadam@backend=torch"``...) built with ``weight_decay`` and its
    default lr, or a function of the model. ``model``: a meta-device model instead of the preset."""
    from .baselines import make_optimizer
    from .model import build_model

    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if model is None:
        with torch.device("meta"):
            model = build_model(preset)
    model = model.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
    session = FakeCuda(f"{name}/{dtype}", limits=limits, observers=observers)
    with session:
        model.to_empty(device="cuda")
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        session.result.n_params = sum(p.numel() for p in model.parameters())
        session.result.n_tensors = sum(1 for _ in model.parameters())
        opt = (make_optimizer(model, optimizer, weight_decay=weight_decay) if isinstance(optimizer, str)
               else optimizer(model))
        session.watch(model, opt)
        with session.phase("warm-up"):
            for _ in range(warmup_steps):
                opt.step()
        with session.phase("step"):
            opt.step()
    session.result.seconds = time.perf_counter() - t0
    return session.result


def estimate_all(names: Sequence[str] | None = None, dtypes: Sequence[str] = ("fp32", "bf16"), *,
                 log: Callable[[str], None] | None = None, **kwargs: Any) -> dict[str, StepEstimate]:
    """``estimate_step`` for every name and dtype: ``{"name/dtype": estimate}``; a case that raises is reported
    with its error as a problem (and the others go on)."""
    out = {}
    for dtype in dtypes:
        for name in names or default_names():
            key = f"{name}/{dtype}"
            try:
                out[key] = estimate_step(name, dtype, **kwargs)
            except Exception as exc:  # noqa: BLE001 - one case failing must not hide the others
                failed = StepEstimate(key)
                failed.problems[(f"the case raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                 _where(exc.__traceback__.tb_frame if exc.__traceback__ else None))] += 1
                out[key] = failed
            if log:
                log(f"[{key}] {out[key].seconds:.1f} s")
    return out


def ratios_to(results: dict[str, StepEstimate], baseline: str = "adamw-fused",
              cal: Calibration = H200) -> dict[str, float]:
    """Predicted step time of each case over the baseline's of the same dtype."""
    out = {}
    for key, r in results.items():
        ref = results.get(f"{baseline}/{key.split('/')[1]}")
        if ref is not None and ref.n_params:
            out[key] = r.predict_s(cal) / ref.predict_s(cal)
    return out


def format_table(results: dict[str, StepEstimate], cal: Calibration = H200, *, top: int = 0) -> str:
    ratio = ratios_to(results, cal=cal)
    lines = [f"{'case':<22} {'kernels':>7} {'aten':>6} {'triton':>6} {'copies':>6} {'B/param':>8} {'GFLOP':>8} "
             f"{'syncs':>5} {'probl':>5} {'pred ms':>9} {'x fused':>7}"]
    for key, r in results.items():
        lines.append(f"{key:<22} {r.kernels:>7} {sum(r.aten_kernels.values()):>6} "
                     f"{sum(r.triton_launches.values()):>6} {r.copies:>6} {r.bytes_per_param:>8.2f} "
                     f"{r.matmul_flops / 1e9:>8.0f} {r.n_syncs:>5} {r.n_problems:>5} {r.predict_s(cal) * 1e3:>9.2f} "
                     f"{ratio.get(key, float('nan')):>7.2f}")
    lines.append("")
    for key, r in results.items():
        for label, counter in (("sync", r.syncs), ("PROBLEM", r.problems), ("note", r.notes),
                               ("early sync", r.early_syncs)):
            for (what, where), n in sorted(counter.items()):
                lines.append(f"  {label:<10} {key:<20} x{n:<4} {what}  @ {where}")
        if r.triton_launches:
            lines.append(f"  triton     {key:<20} " + ", ".join(
                f"{k} x{v} ({sorted(r.grids.get(k, ()))[:2]} programs)" for k, v in r.triton_launches.items()))
        for where, n in r.lines.most_common(top):
            lines.append(f"  top        {key:<20} {n:>6} launches {r.line_bytes[where] / 1e9:>7.2f} GB  @ {where}")
    lines.append(f"(roofline: {cal.bytes_per_s / 1e12:.2f} TB/s, {cal.launch_s * 1e6:.2f} us per launch, matmul "
                 f"fp32 {cal.fp32_flops / 1e12:g} / TF32 {cal.tf32_flops / 1e12:g} / bf16 {cal.half_flops / 1e12:g} "
                 f"TFLOP/s; {cal.source})")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated harness names (default: fused and foreach AdamW, every registered one)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="parameter dtypes: fp32, bf16")
    parser.add_argument("--preset", default="1b", help="harness model preset (default 1b: 1.34B parameters)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--foreach-limits", choices=("legacy", "32kb"), default="legacy",
                        help="multi_tensor_apply's launch limits: 4 KB kernel arguments (legacy, the H200 run's "
                             "torch) or 32 KB")
    parser.add_argument("--bw", type=float, default=H200.bytes_per_s, help="bytes/s (default: the H200 fit)")
    parser.add_argument("--t-launch", type=float, default=H200.launch_s, help="s per launch (default: the H200 fit)")
    parser.add_argument("--top", type=int, default=0, help="print the N source lines with most launches per case")
    parser.add_argument("--json", default=None, help="also write the results here")


def check_arguments(args: argparse.Namespace) -> tuple[list[str] | None, list[str]]:
    """The optimizer names and dtypes asked for; ``UsageError`` naming the argument and value if one is unknown."""
    from .args import UsageError
    from .baselines import harness_names
    from .model import PRESETS

    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise UsageError("--dtypes", args.dtypes, f"expected a comma-separated list of {', '.join(DTYPES)}")
    names = [n for n in args.optimizers.split(",") if n] if args.optimizers else None
    unknown = [n for n in names or () if n.split("@")[0] not in harness_names()]
    if unknown:
        raise UsageError("--optimizers", args.optimizers, f"unknown {', '.join(unknown)}")
    if getattr(args, "preset", "1b") not in PRESETS:
        raise UsageError("--preset", args.preset, f"expected one of {', '.join(PRESETS)}")
    return names, dtypes


def run(args: argparse.Namespace) -> int:
    from .args import UsageError

    try:
        names, dtypes = check_arguments(args)
    except UsageError as exc:
        print(f"gpu-estimate: {exc}", file=sys.stderr)
        return 2
    fitted = (args.bw, args.t_launch) == (H200.bytes_per_s, H200.launch_s)
    cal = Calibration("command line", args.bw, args.t_launch, H200.fp32_flops, H200.tf32_flops, H200.half_flops,
                      H200.source if fitted else "--bw/--t-launch")
    limits = FOREACH_4KB if args.foreach_limits == "legacy" else FOREACH_32KB
    t0 = time.perf_counter()
    results = estimate_all(names, dtypes, preset=args.preset, weight_decay=args.weight_decay, limits=limits,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(results, cal, top=args.top))
    print(f"({len(results)} cases in {time.perf_counter() - t0:.0f} s)")
    if args.json:
        from .report import run_metadata, write_json

        ratio = ratios_to(results, cal=cal)
        payload = {"meta": run_metadata(), "calibration": cal.__dict__, "foreach_limits": limits.name,
                   "preset": args.preset, "weight_decay": args.weight_decay,
                   "cases": {k: {**r.to_json(cal), "x_fused_adamw": ratio.get(k)} for k, r in results.items()}}
        write_json(args.json, json.loads(json.dumps(payload, default=str)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimopt.bench.gpu_estimate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
