"""Optimizer step time against torch AdamW, interleaved in one run (same as ``slimopt bench throughput``).

    python benchmarks/step_time.py                                  # step42m, all optimizers, this device
    python benchmarks/step_time.py --optimizers adamw-foreach,adamw-forloop,microadam --rounds 7 \
        --threads 2 --out benchmarks/results/cpu/step_time_microadam.json

Writes the JSON (every timing, machine, versions, commit, command line) and a Markdown summary beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from slimopt.bench.throughput import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from slimopt.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
