"""The package's layers, read from the source: every module has a layer, imports (function-level
ones included) only go down or sideways, there is no import cycle, and plan.py imports nothing
of fastdiff but schedules and the bottom layer's fastdiff.files (../shared/DESIGN.md §2)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "python" / "fastdiff"

# Bottom to top. A module's layer is that of its longest listed prefix; the package itself (its
# __init__, the public entry build_engine) is the top.
LAYERS = [
    ("_version", "_build_info", "dtypes", "files"),
    ("schedules",),
    ("plan",),
    ("program", "solvers", "gate"),
    ("ops", "graphs"),
    ("denoisers",),
    ("loops",),
    ("engines", "diffusers"),
    ("models",),
    ("calibration", "distill"),
    ("testing", "export", "aoti", "serving"),
    ("info", "cli"),
    ("",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
EXTENSIONS = {"_C"}  # compiled: imports nothing of the package


def layer(module: str) -> int:
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + ".") or name == "":
                if best is None or len(name) > len(best[1]):
                    best = (rank, name)
    return best[0]


def imports(module: str) -> set[str]:
    """The fastdiff modules `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [
                alias.name.removeprefix("fastdiff.") for alias in node.names if alias.name.startswith("fastdiff.")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "fastdiff" or node.module.startswith("fastdiff.")):
                stem = node.module.removeprefix("fastdiff").removeprefix(".")
            else:
                continue
            names = [f"{stem}.{a.name}".strip(".") for a in node.names if a.name not in EXTENSIONS]
            targets = [name if name in MODULES else stem for name in names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in MODULES)
    assert layer("") == len(LAYERS) - 1 and layer("loops.reference") == layer("loops")


def test_no_module_imports_a_layer_above_it():
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})" for m in GRAPH for t in GRAPH[m] if layer(t) > layer(m)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [m, t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(cycles)


def test_plan_imports_only_schedules():
    # and the bottom layer's standard-library helpers (fastdiff.files: atomic writes), which
    # import nothing of fastdiff themselves
    assert GRAPH["plan"] - {"files"} == {"schedules"}
    assert GRAPH["files"] == set()


def test_the_checker_sees_function_level_and_relative_imports():
    assert "loops.reference" in GRAPH["diffusers"]  # a module-level relative import
    assert "models.registry" in GRAPH[""]  # inside build_engine
    assert {"loops.reference", "program"} <= GRAPH["testing.gmm"]  # inside solver_error
