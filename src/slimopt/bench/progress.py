"""The progress display of a comparison (``slimopt bench pretrain``, ``finetune-lm``): rich bars when rich is
installed, plain log lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from .train import RunResult

__all__ = ["Progress"]


class Progress:
    """One bar per training run (steps, elapsed, time remaining, losses) and, under rich, one for all the
    runs planned (``expect``), whose time remaining is the whole comparison's."""

    def __init__(self, plain: bool) -> None:
        self.rich = None
        self.overall = None
        self.started = time.perf_counter()
        self.total = self.done = 0
        if not plain:
            try:
                from rich import progress as bars

                self.rich = bars.Progress(bars.TextColumn("{task.description:<26}"), bars.BarColumn(bar_width=16),
                                          bars.MofNCompleteColumn(), bars.TimeElapsedColumn(), bars.TextColumn("eta"),
                                          bars.TimeRemainingColumn(), bars.TextColumn("{task.fields[info]}"))
            except ImportError:
                pass

    def __enter__(self) -> Progress:
        if self.rich:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.rich:
            self.rich.__exit__(*exc)

    def log(self, message: str) -> None:
        (self.rich.console.print if self.rich else print)(message)

    def expect(self, steps: int) -> None:
        """``steps`` more training steps are planned (the overall bar's total)."""
        self.total += steps
        if self.rich:
            if self.overall is None:
                self.overall = self.rich.add_task("all runs", total=self.total, info="")
            self.rich.update(self.overall, total=self.total)

    def settle(self, planned: int, done: int) -> None:
        """A run stopped after ``done`` of its ``planned`` steps (diverged, interrupted)."""
        self.expect(done - planned)

    def _eta(self) -> str:
        if not self.done or self.total <= self.done:
            return ""
        left = (time.perf_counter() - self.started) / self.done * (self.total - self.done)
        return f", all runs: eta {int(left // 60)}:{int(left % 60):02d}"

    def tracker(self, label: str, total: int):
        task = self.rich.add_task(label, total=total, info="") if self.rich else None
        last_val: list[float | None] = [None]
        last_step = [0]

        def update(result: RunResult, val: float | None) -> None:
            if val is not None:
                last_val[0] = val
            self.done += result.steps_done - last_step[0]
            if self.rich and self.overall is not None:
                self.rich.advance(self.overall, result.steps_done - last_step[0])
            last_step[0] = result.steps_done
            parts = [f"train {result.train_curve[-1][2]:.3f}"] if result.train_curve else []
            parts += [f"val {last_val[0]:.3f}"] if last_val[0] is not None else []
            info = "  ".join(parts)
            if self.rich:
                self.rich.update(task, completed=result.steps_done, info=info)
            elif val is not None:
                print(f"  {label} step {result.steps_done}/{total}: {info}{self._eta()}", flush=True)

        return update
