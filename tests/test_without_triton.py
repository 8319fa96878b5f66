"""A CPU-only install has no Triton (the `bench` extra and torch's CPU wheel do not bring it): every optimizer
must import, build from a model and step there. Triton is hidden from a fresh interpreter (``sys.modules``
entry None makes its import fail), as on such an install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # import triton -> ImportError, as where it is not installed
    sys.modules["triton.language"] = None
    import torch
    import slimopt
    from slimopt.ops import triton_support
    from slimopt.registry import default_names
    assert not triton_support.triton_available()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    for name in default_names():
        opt = slimopt.create_optimizer(model, name, lr=1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        print(name, moved)
        assert moved > 0, name
""")


def test_every_optimizer_imports_and_steps_without_triton():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stepped = [line.split()[0] for line in done.stdout.splitlines()]
    assert len(stepped) >= 5, done.stdout
