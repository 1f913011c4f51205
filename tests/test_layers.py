"""The layers point down only (models <- cache <- pipeline <- evaluation, training <- cli), with no import cycles,
and the code imports itself as `lookalike`, never through a generic top-level name."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "cache", "pipeline", "cli")
# What each layer may import from this project (itself included); evaluation and training are rooms of their own.
ALLOWED = {
    "models": {"models"},
    "cache": {"models", "cache"},
    "pipeline": {"models", "cache", "pipeline"},
    "pipeline.evaluation": {"models", "cache", "pipeline", "pipeline.evaluation"},
    "pipeline.training": {"models", "cache", "pipeline", "pipeline.training"},
    "cli": {"models", "cache", "pipeline", "pipeline.evaluation", "pipeline.training"},
}


def layer(module: str) -> str:
    for name in ("pipeline.evaluation", "pipeline.training"):
        if module == name or module.startswith(name + "."):
            return name
    return module.split(".")[0]


def project_modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES[:-1]:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(path: Path) -> list[str]:
    """Every module name a file imports, anywhere in it (a lazy import is still a dependency); relative imports
    are resolved against the file's own package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["lookalike", *package[:len(package) - node.level + 1], *([base] if base else [])])
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules (named without the `lookalike.` prefix) that a file imports."""
    found = {name.removeprefix("lookalike.") for name in imported_names(path) if name.startswith("lookalike.")}
    return found & set(modules)


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{module} imports {target}" for module, targets in graph().items() for target in targets
              if layer(target) not in ALLOWED[layer(module)]]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_see_real_imports():
    """The graph is not empty by accident: known edges are found."""
    edges = graph()
    assert "cache.store" in edges["cache.search"] and "pipeline.build" in edges["pipeline.query"]
    assert layer("pipeline.evaluation.speed") == "pipeline.evaluation" and "cli" in edges


def test_nothing_imports_a_generic_top_level_name():
    """`models`, `pipeline`, `cache` and `cli` exist only as `lookalike.*`: an import by the bare name would load a
    second copy from the checkout, or a user's own package of that name."""
    files = [*project_modules().values(), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    bare = [f"{path.relative_to(ROOT)}: {name}" for path in files for name in imported_names(path)
            if name.split(".")[0] in PACKAGES]
    assert bare == []


def test_scripts_import_only_the_library():
    """Scripts sit above everything: they may use any layer, and nothing imports them."""
    modules = project_modules()
    used = {name for path in (ROOT / "scripts").glob("*.py") for name in imports_of(path, modules)}
    assert used and all(layer(name) in ALLOWED["cli"] for name in used)
    assert not any("scripts" in name for path in modules.values() for name in imported_names(path))
