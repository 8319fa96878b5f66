"""What every benchmark result carries (machine, versions, commit, command line) and how it is written.

A result is a folder or a file pair: ``results.json`` with every number, and a Markdown report with the
tables a reader wants. Plots live in ``plots.py``-style helpers below and need matplotlib only when drawn.
"""

from __future__ import annotations

import io
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

__all__ = ["console_table", "markdown_table", "peak_rss_bytes", "print_results", "read_results",
           "release_freed_memory", "reset_peak_rss", "rss_bytes", "run_metadata", "write_json"]


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
    """``data`` as JSON, one record per line: a list or dict holding no container of containers is written on
    one line (a curve, a run's settings, a summary row), the containers above them one entry per line, so that
    a file of long curves stays readable and diffable. Every result file of the harness is written so;
    ``json.load`` reads it back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_compact(data, 0) + "\n")
    return path


def read_results(folders: Sequence[str | Path], same: Sequence[str]) -> list[dict[str, Any]]:
    """The ``results.json`` of each folder (``--merge``: parts of one comparison run in parallel processes),
    after checking that every part has one and that their settings agree in the keys ``same``; a
    ``ValueError`` naming the folder otherwise."""
    parts = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ValueError(f"--merge: {folder} has no results.json")
        parts.append(json.loads(path.read_text()))
    first = parts[0]["settings"]
    for folder, part in zip(folders[1:], parts[1:]):
        differ = [k for k in same if part["settings"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--merge: {folder} differs from {folders[0]} in {', '.join(differ)}")
    return parts


def _flat(obj: Any) -> bool:
    """No container inside a container inside ``obj``: small enough to stand on one line."""
    children = obj.values() if isinstance(obj, dict) else obj
    return all(not isinstance(c, (dict, list, tuple)) or all(not isinstance(g, (dict, list, tuple))
                                                             for g in (c.values() if isinstance(c, dict) else c))
               for c in children)


def _compact(obj: Any, depth: int) -> str:
    if isinstance(obj, (dict, list, tuple)) and obj and not _flat(obj):
        pad, inner = " " * depth, " " * (depth + 1)
        if isinstance(obj, dict):
            items = [f"{inner}{json.dumps(str(k))}: {_compact(v, depth + 1)}" for k, v in obj.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        return "[\n" + ",\n".join(inner + _compact(v, depth + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, default=_jsonable)


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


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def console_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                  width: int | None = None) -> str:
    """The table a run prints at its end, for a terminal (rich when installed, plain columns otherwise);
    at most ``width`` columns (default: the terminal's, at most 100), where the Markdown report keeps the
    wide one. Numbers are right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows if row[i] is not None) and any(row[i] is not None
               for row in rows) for i in range(len(headers))]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain_table(title, headers, cells, numeric)
    import shutil

    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for i, (header, right) in enumerate(zip(headers, numeric)):
        # a long row name (``microadam@bias_correction=window``) folds rather than squeezing the numbers
        table.add_column(header, justify="right" if right else "left", overflow="fold",
                         max_width=24 if i == 0 else None)
    for row in cells:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


_NUMERIC_TEXT = re.compile(r"[-+]?[\d,.]+(e[-+]?\d+)?%?( \(.*\))?")


def _is_number(v: Any) -> bool:
    """A number, or text that shows one (``"1,280"``, ``"0.52"``, ``"3,840 (1/2 seeds)"``): right-aligned."""
    if isinstance(v, str):
        return _NUMERIC_TEXT.fullmatch(v) is not None
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain_table(title: str, headers: Sequence[str], cells: list[list[str]], numeric: list[bool]) -> str:
    lines = [list(headers), *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    out = [title]
    for i, line in enumerate(lines):
        out.append("  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(line, widths, numeric)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_results(table: str, out: Path, files: Sequence[str]) -> None:
    """The end of a run: its console table, then where everything went, as an absolute path."""
    print(table)
    print(f"results: {Path(out).resolve()}{os.sep}")
    print(f"  {', '.join(files)}")


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
