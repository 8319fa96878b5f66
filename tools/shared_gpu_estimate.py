"""Run the shared estimator (../shared/tools/gpu_step_estimate.py) on this tree.

The shared tool records MicroAdam's pointer tables by hooking ``slimopt.ops.microadam_triton.MultiTensorStep``,
the 0.1 name of ``slimopt.ops.sparse_window_triton.SparseWindowStep``; without that name it sees MicroAdam's
three launches but none of the tensors they reach (0 B/param). This puts the old name in ``sys.modules`` (not in
the package: kernels name no optimizer) and runs the tool with the arguments given, e.g.

    python tools/shared_gpu_estimate.py --src src

The project's own model of the step is ``slimopt bench gpu-estimate``; the two agree (README, GPU section).
"""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT.parent / "shared" / "tools" / "gpu_step_estimate.py"

if __name__ == "__main__":
    if not TOOL.exists():
        sys.exit(f"tools/shared_gpu_estimate.py: the shared tool is not at {TOOL}")
    sys.path.insert(0, str(ROOT / "src"))
    from slimopt.ops import sparse_window_triton

    old_name = types.ModuleType("slimopt.ops.microadam_triton")
    old_name.MultiTensorStep = sparse_window_triton.SparseWindowStep
    sys.modules[old_name.__name__] = old_name
    sys.argv = [str(TOOL), *sys.argv[1:]]
    runpy.run_path(str(TOOL), run_name="__main__")
