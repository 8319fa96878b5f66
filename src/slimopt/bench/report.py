"""What every benchmark result carries (machine, versions, commit, command line) and how it is written.

A result is a folder or a file pair: ``results.json`` with every number, and a Markdown report with the
tables a reader wants. Plots live in ``plots.py``-style helpers below and need matplotlib only when drawn.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["markdown_table", "peak_rss_bytes", "release_freed_memory", "reset_peak_rss", "rss_bytes",
           "run_metadata", "write_json"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, library versions, git commit and the command line, for the top of every result file."""
    cuda = torch.cuda.is_available()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cuda": torch.version.cuda if cuda else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "slimopt": _version("slimopt"),
            "transformers": _version("transformers"),
            "triton": _version("triton"),
        },
    }


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CPU memory: resident set size and its high-water mark (Linux /proc; None elsewhere)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int | None:
    return _status_kib("VmRSS")


def peak_rss_bytes() -> int | None:
    return _status_kib("VmHWM")


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return freed heap memory to the OS, so that the next run's RSS peak counts only its own memory.

    glibc raises its mmap threshold after large frees and then serves big tensors from the heap, which it
    keeps after they are freed; a later run would reuse those pages without raising RSS. Pinning the
    threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``) keeps large tensors in their own mappings.
    """
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
