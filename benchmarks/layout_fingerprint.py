"""Bit-identity check for refactors: every optimizer's parameters after N steps on a model preset, hashed.

    python benchmarks/layout_fingerprint.py --preset step42m --steps 20 --out benchmarks/results/fp.json
    python benchmarks/layout_fingerprint.py --compare benchmarks/results/layout_fingerprint_before.json

Gradients are seeded random tensors (no forward pass: the check is of the optimizer, not the model), the
same for every optimizer and every run. Only the public API is used (``slimopt.create_optimizer``,
``slimopt.bench.model.build_model``), so the same script runs before and after a change of the layout.
Two runs on the same machine, torch and thread count give the same digests exactly when the optimizers
compute the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch

import slimopt
from slimopt.bench.model import build_model

OPTIMIZERS = {"adamw": 1e-3, "microadam": 1e-3, "adammini": 1e-3, "sinkgd": 0.02, "swan": 0.02}


def fingerprint(name: str, lr: float, preset: str, steps: int) -> str:
    torch.manual_seed(0)
    model = build_model(preset)
    optimizer = slimopt.create_optimizer(model, name, lr=lr, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 1e-2
        optimizer.step()
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="step42m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", help="write the digests here (JSON)")
    parser.add_argument("--compare", help="a JSON written by --out: exit 1 unless every digest is the same")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.optimizers.split(",")
    digests = {}
    for name in names:
        start = time.perf_counter()
        digests[name] = fingerprint(name, OPTIMIZERS[name], args.preset, args.steps)
        print(f"{name:10s} {digests[name]}  ({time.perf_counter() - start:.0f} s)", flush=True)
    result = {"preset": args.preset, "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
              "digests": digests}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [n for n in names if before["digests"].get(n) != digests[n]]
        print("identical" if not differ else f"DIFFERENT: {', '.join(differ)}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
