"""Command-line argument checks the ``slimopt bench`` tasks share.

A task checks every argument in its ``validate(args)`` before it loads data, builds a model or creates a
folder. A bad value raises :class:`UsageError`, which names the argument and the value it got; the task's
``run`` is wrapped by :func:`guarded`, which prints ``slimopt bench <task>: <message>`` on stderr and
returns exit status 2, without a traceback (a traceback means a bug, not a typo).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["UsageError", "check_choices", "check_device", "check_file", "check_int", "check_number", "check_optimizers",
           "check_out", "check_threads", "chosen_device", "guarded", "parse_list"]


class UsageError(ValueError):
    """An argument the command cannot run with: ``flag``, the ``value`` it got and ``why`` not."""

    def __init__(self, flag: str, value: Any, why: str) -> None:
        self.flag, self.value, self.why = flag, value, why
        super().__init__(f"{flag} {_show(value)}: {why}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if not value or any(c.isspace() or c in "'\"" for c in value) else value
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def guarded(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Turn a :class:`UsageError` raised by ``run`` into a message on stderr and exit status 2."""

    def wrap(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def checked(*args: Any, **kwargs: Any) -> int:
            try:
                return run(*args, **kwargs)
            except UsageError as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return 2

        return checked

    return wrap


def check_number(flag: str, value: float | None, *, minimum: float = 0.0, strict: bool = True,
                 what: str = "") -> None:
    """``value`` (when given) is a finite number above ``minimum`` (``strict``) or at least it."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise UsageError(flag, value, f"must be a finite number {bound}" + (f" ({what})" if what else ""))


def check_int(flag: str, value: int | None, *, minimum: int = 1, what: str = "") -> None:
    if value is not None and value < minimum:
        raise UsageError(flag, value, f"must be an integer >= {minimum}" + (f" ({what})" if what else ""))


def parse_list(flag: str, text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; an empty entry is an error."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise UsageError(flag, text, "expected a comma-separated list without empty entries")
    return items


def check_choices(flag: str, text: str, known: Iterable[str], what: str = "name") -> list[str]:
    """The comma-separated names of ``text``, each one of ``known``."""
    known = list(known)
    items = parse_list(flag, text)
    unknown = [item for item in items if item not in known]
    if unknown:
        raise UsageError(flag, text, f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                                     f"{', '.join(unknown)}; choose from {', '.join(known)}")
    return items


def check_optimizers(flag: str, text: str) -> list[str]:
    """The comma-separated optimizer names of ``text``: harness names, or variants ``NAME@key=value;...``."""
    from .baselines import harness_names, is_known

    items = parse_list(flag, text)
    unknown = [item for item in items if not is_known(item)]
    if unknown:
        raise UsageError(flag, text, f"unknown optimizer{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                                     f"choose from {', '.join(harness_names())} (NAME@key=value passes options)")
    return items


def check_device(flag: str, value: str | None) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(flag, value, "not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UsageError(flag, value, "the harness runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(flag, value, "CUDA is not available on this machine (torch "
                                      f"{torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(flag, value, f"this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_file(flag: str, value: str | None) -> None:
    """An input file that exists (None: not given)."""
    if value is None:
        return
    path = Path(value)
    if not path.exists():
        raise UsageError(flag, value, "no such file")
    if not path.is_file():
        raise UsageError(flag, value, "is not a file")


def chosen_device(value: str | None) -> torch.device:
    """``--device`` as given, else CUDA when this machine has it, else the CPU."""
    import torch

    return torch.device(value or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_threads(value: int | None) -> None:
    check_int("--threads", value, what="torch CPU threads")


def check_out(flag: str, value: str | None, *, file: bool = False) -> None:
    """An output folder (or, with ``file``, a file path) that can be created: not an existing file where a
    folder goes, nor under one."""
    if value is None:
        return
    path = Path(value)
    if not file and path.exists() and not path.is_dir():
        raise UsageError(flag, value, "is a file; give a folder for the results")
    if file and path.is_dir():
        raise UsageError(flag, value, "is a folder; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(flag, value, f"{parent} is a file, not a folder")
            break
