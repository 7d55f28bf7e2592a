"""The layers stay layered: every import (lazy ones inside functions too) goes down the layers below, and no
qimg module takes part in an import circle (a circle broken only by import order is still one).

    layer (modules)                      may import (besides itself)
    entry (qimg.__main__)                cli
    cli (qimg.cli.*, cli.main included)  jobs, engine, parallel, sampling, masks, weights, model, worker, basics
    jobs                                 engine, parallel, segment, sampling, masks, weights, model, basics
    segment (masks from words)           weights, basics
    engine                               parallel, sampling, masks, weights, model, basics
    parallel (one image on many ranks)   weights, model, basics
    sampling, masks                      basics
    weights                              model, basics
    model                                basics
    basics (qimg, errors, small_files,   basics: usable from anywhere, they import only each other
            images, cache, cache_folder,
            option_values)
    worker                               qimg, errors, small_files; qimg.worker.runner also cli
    train (a separate tool)              engine, model, weights, sampling, basics; nothing imports it

So only the CLI, the worker's job process and qimg.__main__ import the CLI, nothing below the CLI imports the worker,
and model code imports neither the weights nor the engine.
"""

import ast
from pathlib import Path

import qimg

PACKAGE = Path(qimg.__file__).resolve().parent
BASICS = {"qimg", "qimg.errors", "qimg.small_files", "qimg.images", "qimg.cache", "qimg.cache_folder",
          "qimg.option_values"}  # qimg: version
MAY_IMPORT = {
    "entry": {"cli"},
    "cli": {"jobs", "engine", "parallel", "sampling", "masks", "weights", "model", "worker", "basics"},
    "jobs": {"engine", "parallel", "segment", "sampling", "masks", "weights", "model", "basics"},
    "segment": {"weights", "basics"},
    "engine": {"parallel", "sampling", "masks", "weights", "model", "basics"},
    "parallel": {"weights", "model", "basics"},
    "sampling": {"basics"},
    "masks": {"basics"},
    "weights": {"model", "basics"},
    "model": {"basics"},
    "basics": set(),
    "worker": set(),  # only the modules below: the client must stay light, the server runs the CLI
    "train": {"engine", "model", "weights", "sampling", "basics"},
}
WORKER_MAY_IMPORT = {"qimg", "qimg.errors", "qimg.small_files"}
WORKER_SERVER = "qimg.worker.runner"


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


def layer(name: str) -> str:
    """The layer of a qimg module: basics, entry, or its package (cli, jobs, engine, ...) or flat module."""
    if name in BASICS:
        return "basics"
    return "entry" if name == "qimg.__main__" else name.split(".")[1]


def allowed(importer: str, imported: str) -> bool:
    ours, theirs = layer(importer), layer(imported)
    if ours == "worker":
        return theirs == "worker" or imported in WORKER_MAY_IMPORT or (importer == WORKER_SERVER and theirs == "cli")
    return theirs == ours or theirs in MAY_IMPORT[ours]


def test_the_layering_rules_say_what_they_mean():
    # The check below passes trivially if the rules allow everything: a few imports each way.
    assert allowed("qimg.engine.components", "qimg.weights.folders") and allowed("qimg.weights.lora", "qimg.errors")
    assert not allowed("qimg.model.text", "qimg.weights.folders") and not allowed("qimg.images", "qimg.masks")
    assert not allowed("qimg.jobs.chain_steps", "qimg.cli.presets") and not allowed("qimg.jobs.common", "qimg.worker")
    assert allowed("qimg.worker.runner", "qimg.cli.app") and not allowed("qimg.worker.server", "qimg.cli.app")
    assert not allowed("qimg.worker.runner", "qimg.jobs.kept_engine")
    assert not allowed("qimg.engine.engine", "qimg.train") and not allowed("qimg.sampling", "qimg.model.rope")
    assert allowed("qimg.engine.components", "qimg.parallel.group") and not allowed("qimg.parallel.group",
                                                                                    "qimg.engine.components")
    assert not allowed("qimg.model.transformer", "qimg.parallel.ulysses")


def test_imports_go_down_the_layers():
    edges = graph()
    unknown = sorted({layer(name) for name in edges} - MAY_IMPORT.keys())
    assert unknown == [], f"modules of no layer (add them to MAY_IMPORT): {unknown}"
    offending = [f"{name} -> {dep}" for name, deps in sorted(edges.items()) for dep in sorted(deps)
                 if not allowed(name, dep)]
    assert offending == [], "imports against the layering:\n" + "\n".join(offending)


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
    assert "qimg.jobs.ray_runner" in graph()["qimg.cli.execute"]  # the walk does see the lazy import



def named(node) -> list[str]:
    """The modules an import statement names (for `from a import b`: a and a.b)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
    return []


def test_transformers_is_imported_only_for_masks_from_words():
    # transformers is the optional extra qimg[masks]: only qimg.segment.providers imports it (besides the separate
    # training tool, qimg[train]), and no module imports it, or providers, at its top level (where every run would).
    importers, top_level = set(), set()
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        importers |= {name for node in ast.walk(tree) for n in named(node) if n.split(".")[0] == "transformers"}
        top_level |= {name for node in tree.body for n in named(node)
                      if n.split(".")[0] == "transformers" or n == "qimg.segment.providers"}
    importers = {name for name in importers if layer(name) != "train"}
    assert importers == {"qimg.segment.providers"} and top_level == set()
    assert "qimg.segment.providers" in graph()["qimg.jobs.word_masks"]  # the walk does see the lazy import
