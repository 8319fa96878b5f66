"""Install slimopt into the current Python environment without ever pulling a CUDA torch by accident.

    python install.py            # the library only
    python install.py bench      # + the benchmark harness (matplotlib, rich, transformers, ...)
    python install.py dev        # + tests and linting
    python install.py bench,baselines   # + the other optimizers the harness compares against

A torch >= 2.4 that is already installed is kept as it is (CPU or CUDA build). Only when there is none
(or an older one) do we install the pinned ``torch==2.13.0``, so that pip never resolves an unpinned
``torch`` to the newest release and its several GB of CUDA packages.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

PINNED_TORCH = "torch==2.13.0"
MIN_TORCH = (2, 4)


def installed_torch() -> tuple[int, int] | None:
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str]) -> None:
    extras = ",".join(a for arg in argv for a in arg.split(",") if a)
    unknown = set(extras.split(",")) - {"", "bench", "dev", "gpu", "baselines"}
    if unknown:
        sys.exit(f"install.py: unknown extra(s) {sorted(unknown)}; choose from bench, dev, gpu, baselines")
    torch_version = installed_torch()
    if torch_version is None or torch_version < MIN_TORCH:
        pip(PINNED_TORCH)
    else:
        print(f"keeping the installed torch {torch_version[0]}.{torch_version[1]}", flush=True)
    root = Path(__file__).resolve().parent
    pip("-e", f"{root}[{extras}]" if extras else str(root))


if __name__ == "__main__":
    main(sys.argv[1:])
