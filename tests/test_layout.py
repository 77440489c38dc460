"""The package layout is the architecture: each layer imports only the layers below it, and no module imports
itself back through others. Checked on the source (every import statement, also those inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A module may import its own layer and the layers before it, never one after it.
LAYERS = ["paths", "models", "versions", "data", "evaluation", "serve", "train", "bases", "jobs", "bench", "cli",
          "__main__", "app"]


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def import_graph(packages=("llaca", "app", "experiments")) -> dict[str, set[str]]:
    """module -> the modules of these packages it imports (relative imports resolved; `from pkg import mod` is an
    edge to `pkg.mod`)."""
    files = {module_name(f): f for p in packages for f in (ROOT / p).rglob("*.py")}
    modules = {name for name, _ in files}
    graph = {}
    for (name, is_package), path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    target = ".".join(here + (node.module.split(".") if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    edges.add(child if child in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "app" if parts[0] == "app" else (parts[1] if len(parts) > 1 else "llaca")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 80  # the whole tree was read
    assert cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_layer_imports_only_downward():
    graph = import_graph(("llaca", "app"))
    upward = []
    for module, targets in graph.items():
        if layer_of(module) == "llaca":  # the package's own __init__ (environment defaults only)
            assert not targets, module
            continue
        rank = LAYERS.index(layer_of(module))
        upward += [f"{module} -> {t}" for t in targets if LAYERS.index(layer_of(t)) > rank]
    assert upward == []


def test_the_product_never_imports_experiments():
    graph = import_graph()
    assert not [(m, t) for m, t_set in graph.items() if not m.startswith("experiments")
                for t in t_set if t.startswith("experiments")]
