"""The layers point down only (models <- cache <- pipeline <- its rooms <- cli, scripts), each room imports only what
docs/ARCHITECTURE.md allows it, there are no import cycles, no module uses another module's private name, and the
code imports itself as `lookalike`, never through a generic top-level name. Relative imports count as the imports they
resolve to, and scripts/ is checked like the rest."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "cache", "pipeline", "cli")
# The rooms inside pipeline/: one job each, with its own import rule.
ROOMS = ("pipeline.engines", "pipeline.evaluation", "pipeline.serve", "pipeline.training")
EVERYTHING = {"models", "cache", "pipeline", *ROOMS}
# What each layer or room may import from this project (itself included).
ALLOWED = {
    "models": {"models"},
    "cache": {"models", "cache"},
    "pipeline": {"models", "cache", "pipeline", "pipeline.engines"},  # engines only through their front (below)
    "pipeline.engines": {"models", "cache", "pipeline", "pipeline.engines"},
    "pipeline.evaluation": {"models", "cache", "pipeline", "pipeline.engines", "pipeline.evaluation"},
    "pipeline.serve": {"models", "cache", "pipeline", "pipeline.serve"},
    "pipeline.training": {"models", "cache", "pipeline", "pipeline.training"},
    "cli": EVERYTHING,
    "scripts": EVERYTHING | {"cli"},
}
# (importer, room): the importer reaches the room only through its front, the room's package itself: the pipeline
# picks an engine by name (`create_engine`) and never imports an engine's code.
FRONT_ONLY = {("pipeline", "pipeline.engines")}
# Private names used outside their module, each with the reason it is not fixed yet.
PRIVATE_EXCEPTIONS: set[tuple[str, str]] = set()


def layer(module: str) -> str:
    """The layer or room a module belongs to."""
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return module.split(".")[0]


def project_modules() -> dict[str, Path]:
    """Every module of the package and every script, by dotted name (scripts as `scripts.NAME`)."""
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES[:-1]:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found.update({f"scripts.{path.stem}": path for path in (ROOT / "scripts").glob("*.py")})
    return found


def names_in(source: str, package: tuple[str, ...]) -> list[str]:
    """Every module name `source` imports, anywhere in it (a lazy import is still a dependency); relative imports
    are resolved against `package`, the file's own package under the repository root."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["lookalike", *package[:len(package) - node.level + 1], *([base] if base else [])])
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def imported_names(path: Path) -> list[str]:
    return names_in(path.read_text(), path.relative_to(ROOT).with_suffix("").parts[:-1])


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules (named without the `lookalike.` prefix) that a file imports."""
    found = {name.removeprefix("lookalike.") for name in imported_names(path) if name.startswith("lookalike.")}
    return found & set(modules)


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def forbidden_imports(edges: dict[str, set[str]]) -> list[str]:
    """Each import a module's layer or room may not make."""
    found = []
    for module, targets in edges.items():
        for target in targets:
            rule = (layer(module), layer(target))
            if layer(target) not in ALLOWED[layer(module)] or (rule in FRONT_ONLY and target != layer(target)):
                found.append(f"{module} imports {target}")
    return sorted(found)


def test_no_module_imports_outside_what_its_layer_or_room_may():
    assert forbidden_imports(graph()) == []


def test_the_rule_refuses_upward_imports_and_a_room_reached_past_its_front():
    edges = {"cache.search": {"pipeline.query"}, "pipeline.training.loop": {"pipeline.serve.app"},
             "pipeline.api": {"pipeline.engines.ray_engine"}, "pipeline.build": {"pipeline.engines"},
             "pipeline.serve.app": {"pipeline.api"}}
    assert forbidden_imports(edges) == ["cache.search imports pipeline.query",
                                        "pipeline.api imports pipeline.engines.ray_engine",
                                        "pipeline.training.loop imports pipeline.serve.app"]


def test_every_subpackage_of_pipeline_is_a_room_with_a_rule():
    subpackages = {f"pipeline.{path.parent.name}" for path in (ROOT / "pipeline").glob("*/__init__.py")}
    assert subpackages == set(ROOMS) and set(ROOMS) <= set(ALLOWED)


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
    """The graph is not empty by accident: known edges are found, in every room and in scripts."""
    edges = graph()
    assert "cache.store" in edges["cache.search"] and "pipeline.pipeline" in edges["pipeline.query"]
    assert layer("pipeline.evaluation.speed") == "pipeline.evaluation" and "cli" in edges
    assert "pipeline.api" in edges["pipeline.serve.app"] and "pipeline.pipeline" in edges["pipeline.engines.ray_engine"]
    assert "pipeline.training.objective" in edges["pipeline.training.loop"]
    assert "cache.reranking" in edges["scripts.rerank_study"]


def test_relative_imports_resolve_to_the_modules_they_name():
    names = names_in("from . import guard\nfrom .limits import Limits\nfrom ...cache import store\n",
                     ("pipeline", "serve"))
    assert {"lookalike.pipeline.serve.guard", "lookalike.pipeline.serve.limits", "lookalike.cache.store"} <= set(names)


def test_nothing_imports_a_generic_top_level_name():
    """`models`, `pipeline`, `cache` and `cli` exist only as `lookalike.*`: an import by the bare name would load a
    second copy from the checkout, or a user's own package of that name."""
    files = [*project_modules().values(), *(ROOT / "tests").glob("*.py")]
    bare = [f"{path.relative_to(ROOT)}: {name}" for path in files for name in imported_names(path)
            if name.split(".")[0] in PACKAGES]
    assert bare == []


def test_nothing_imports_a_script():
    """Scripts sit above everything: nothing of the package imports one."""
    package = [path for name, path in project_modules().items() if not name.startswith("scripts.")]
    scripts = {path.stem for path in (ROOT / "scripts").glob("*.py")}
    assert not [(path, name) for path in package for name in imported_names(path)
                if name.split(".")[0] in scripts or "scripts" in name.split(".")]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def private_names_defined(tree: ast.AST) -> set[str]:
    """The private names a module defines: functions, classes, variables, attributes it assigns, arguments."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
    return {name for name in found if _private(name)}


def private_uses(tree: ast.AST, ours: set[str]) -> set[str]:
    """Private names of this project (`ours`) a module imports from another module, or reads as an attribute of
    something else without defining them itself (`searcher._index`)."""
    own = private_names_defined(tree)
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lookalike"):
            used |= {alias.name for alias in node.names if _private(alias.name)}
            used |= {part for part in node.module.split(".") if _private(part)}
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr in ours and node.attr not in own:
            used.add(node.attr)
    return used


def test_no_module_uses_another_modules_private_name():
    trees = {path: ast.parse(path.read_text()) for path in project_modules().values()}
    ours = set().union(*(private_names_defined(tree) for tree in trees.values()))
    found = {(str(path.relative_to(ROOT)), name) for path, tree in trees.items() for name in private_uses(tree, ours)}
    assert found - PRIVATE_EXCEPTIONS == set()
    assert PRIVATE_EXCEPTIONS <= found  # an exception that no longer happens is removed from the list


def test_the_private_name_check_sees_imports_and_attributes():
    source = ("from lookalike.pipeline.build import _merge\nfrom lookalike.cache import store\n"
              "store._write_npy(1)\nsearcher._index(-1)\nself._own = 1\nself._own\n")
    assert private_uses(ast.parse(source), {"_merge", "_write_npy", "_index", "_own"}) == {
        "_merge", "_write_npy", "_index"}
