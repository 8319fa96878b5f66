"""slimopt's import graph, checked against its layers and drawn: ``python tools/import_graph.py [--png PATH]``.

Every ``import`` of a slimopt module by a slimopt module counts, also those inside functions and the
``"slimopt.module:attribute"`` strings the registry and the command line import by name (imported on first
use is still a dependency). A module's layer is the first entry of :data:`LAYERS` whose prefix it
has; an edge may go down or stay in its layer, never up, and the graph has no cycle. Exit status 1 and
the offending edges when either fails (tests/test_layout.py runs the same check).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom up: (layer, module prefixes)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("slimopt.ops",)),
    ("bookkeeping", ("slimopt.core",)),
    ("plans", ("slimopt.plans",)),
    ("optimizers", ("slimopt.optim",)),
    ("registry", ("slimopt.registry",)),
    ("memory, comm, integrations", ("slimopt.memory", "slimopt.comm", "slimopt.integrations")),
    ("public API", ("slimopt.__init__",)),
    ("harness", ("slimopt.bench",)),
    ("command line", ("slimopt.cli", "slimopt.__main__")),
]


def module_name(path: Path) -> str:
    """``slimopt/optim/sinkgd.py`` -> ``slimopt.optim.sinkgd``; a package's ``__init__`` is the package, but
    the top one is ``slimopt.__init__`` (the public API, a layer of its own)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts == ["slimopt", "__init__"]:
        return "slimopt.__init__"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == "slimopt":
        module = "slimopt.__init__"
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise KeyError(f"{module}: in no layer of tools/import_graph.py")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "slimopt" or a.name.startswith("slimopt.")]
    if node.level:
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == "slimopt" or target.startswith("slimopt.")):
        return []
    known = modules()
    out = []
    for alias in node.names:  # "from slimopt.optim import sinkgd" imports the submodule
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


_MODULES: dict[str, Path] = {}
_TARGET = re.compile(r"^(slimopt(?:\.\w+)+)(?::\w+)?$")


def modules() -> dict[str, Path]:
    if not _MODULES:
        for path in sorted((SRC / "slimopt").rglob("*.py")):
            _MODULES[module_name(path)] = path
    return _MODULES


def edges() -> set[tuple[str, str]]:
    out = set()
    for name, path in modules().items():
        is_package = path.name == "__init__.py"
        importer = "slimopt" if name == "slimopt.__init__" else name
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _resolve(importer, is_package, node)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # "slimopt.optim.sinkgd:SinkGD" (registry targets) and "slimopt.bench.cli" (the cli's
                # subcommands): imported by name on first use, still a dependency
                match = _TARGET.match(node.value)
                if match and match.group(1) in modules():
                    targets = [match.group(1)]
            for target in targets:
                target = "slimopt.__init__" if target == "slimopt" else target
                if target != name:
                    out.add((name, target))
    return out


def upward_edges(graph: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, b in graph if layer_of(b) > layer_of(a))


def cycles(graph: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    adjacency: dict[str, list[str]] = {}
    for a, b in graph:
        adjacency.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adjacency.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted({x for e in graph for x in e}):
        if v not in index:
            visit(v)
    return found


def draw(graph: set[tuple[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_layer: dict[int, list[str]] = {}
    for name in modules():
        by_layer.setdefault(layer_of(name), []).append(name)
    position = {}
    width = max(len(v) for v in by_layer.values())
    for layer, names in by_layer.items():
        for i, name in enumerate(sorted(names)):
            position[name] = ((i + 0.5) * width / len(names), layer)
    fig, ax = plt.subplots(figsize=(22, 11))
    for a, b in sorted(graph):
        (x0, y0), (x1, y1) = position[a], position[b]
        ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                    arrowprops={"arrowstyle": "->", "color": "red" if y1 > y0 else "0.6", "lw": 0.6,
                                "shrinkA": 2, "shrinkB": 2})
    for name, (x, y) in position.items():
        short = name.removeprefix("slimopt.").replace("__init__", "slimopt")
        ax.text(x, y, short, ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.3", "lw": 0.6})
    for layer, (label, _) in enumerate(LAYERS):
        ax.text(-0.6, layer, label, ha="right", va="center", fontsize=10, weight="bold")
        ax.axhline(layer, color="0.93", lw=8, zorder=0)
    ax.set_xlim(-4.5, width + 0.5)
    ax.set_ylim(-0.6, len(LAYERS) - 0.4)
    ax.axis("off")
    ax.set_title("slimopt imports: every arrow points down or sideways (an upward one would be red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", help="draw the graph into this file")
    args = parser.parse_args(argv)
    graph = edges()
    up, loops = upward_edges(graph), cycles(graph)
    for a, b in up:
        print(f"upward: {a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})")
    for loop in loops:
        print("cycle: " + " <-> ".join(loop))
    if args.png:
        draw(graph, Path(args.png))
    print(f"{len(modules())} modules, {len(graph)} imports, {len(up)} upward, {len(loops)} cycles")
    return 1 if up or loops else 0


if __name__ == "__main__":
    sys.exit(main())
