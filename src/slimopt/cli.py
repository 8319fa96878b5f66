"""The ``slimopt`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives with the code it drives; a module listed in ``_SUBCOMMANDS`` provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command runs
(the harness needs the ``bench`` extra; ``slimopt memory`` must not).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

_SUBCOMMANDS = {
    "memory": ("slimopt.memory.formulas", "analytic optimizer-state memory of published models"),
    "data": ("slimopt.bench.fetch", "fetch the real text, labels, tokenizer and weights into the cache"),
    "bench": ("slimopt.bench.cli", "run the papers' experiments against the baselines"),
    "plan": ("slimopt.memory.fit", "which optimizers fit a model on a GPU"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimopt", description="memory-efficient optimizers for LLM training")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv else None
    for name, (module, help_text) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module whose command runs
            add = importlib.import_module(module).add_arguments
            if "chosen" in inspect.signature(add).parameters:  # slimopt bench: only the task that runs
                add(sub, chosen=argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None)
            else:
                add(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    sys.exit(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    main()
