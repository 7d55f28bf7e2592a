"""The layers stay layered: only the entry points import the command line, and no qimg module takes part in an
import circle (lazy imports inside functions count too: a circle broken only by import order is still one)."""

import ast
from pathlib import Path

import qimg

PACKAGE = Path(qimg.__file__).resolve().parent
ENTRY_POINTS = {"qimg.cli.main", "qimg.__main__", "qimg.worker.server"}  # they start the program: cli is theirs to run


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The qimg modules `name` imports anywhere in its file, by full name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from .pkg import mod` imports the submodule where one exists, else a name from the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def test_only_entry_points_import_the_cli():
    importers = sorted(name for name, deps in graph().items() if "qimg.cli.app" in deps and name not in ENTRY_POINTS)
    assert importers == []


def test_no_import_circles():
    edges = graph()
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_graph_sees_imports():
    # The checks above pass trivially if the parser finds nothing: the engine's own imports must show.
    assert {"qimg.engine.latents", "qimg.engine.request"} <= graph()["qimg.engine.engine"]


def test_ray_is_imported_only_when_asked_for():
    # Ray is an optional extra (qimg[ray]): no module imports it, or the module that does, at its top level
    # (where any run would), and only qimg.jobs.ray_runner imports it at all.
    found = modules()
    importers, top_level = set(), set()
    for name, path in found.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
                importers.add(name)
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and (
                    any(a.name.split(".")[0] == "ray" or a.name == "ray_runner" for a in node.names)
                    or (getattr(node, "module", None) or "").split(".")[-1] in ("ray", "ray_runner")):
                top_level.add(name)
    assert importers == {"qimg.jobs.ray_runner"} and top_level == set()
    assert "qimg.jobs.ray_runner" in graph()["qimg.cli.app"]  # the walk does see the lazy import
