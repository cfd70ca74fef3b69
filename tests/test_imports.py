"""The engine's import graph, read from the source with ast (imports at module level and inside
functions alike): no cycles, and the layering the architecture promises.

An import of `a.b.c` also runs the `__init__` of every package on the way (`a`, `a.b`) that does
not already hold the importer, so those count as edges too.
"""
import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "wan22_core"
COMFYUI = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "folder_paths", "server", "execution", "nodes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def imported_names(name: str) -> set[str]:
    """Absolute names `name` imports (`from p import x` gives p and p.x: x may be a module).
    A relative import that climbs out of wan22_core gives "<outside>.<module>"."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level > len(package):
                found.add(f"<outside>.{node.module}")
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def edges(name: str) -> set[str]:
    """The engine modules whose code runs when `name` is imported (not its own packages)."""
    targets = set()
    for imported in imported_names(name):
        parts = imported.split(".")
        for end in range(1, len(parts) + 1):
            target = ".".join(parts[:end])
            if target in MODULES and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


GRAPH = {name: edges(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1 or node in graph[node]:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def under(package: str) -> list[str]:
    return [name for name in MODULES if name == package or name.startswith(package + ".")]


def test_the_graph_is_read():
    """The reading itself: relative imports resolve, and a package import counts its __init__."""
    assert {"wan22_core.checkpoints", "wan22_core.config"} <= GRAPH["wan22_core.cli.parser"]
    assert "wan22_core.checkpoints.loading" in GRAPH["wan22_core.checkpoints"]
    assert "wan22_core.parallel" in GRAPH["wan22_core.cli.torchrun"]  # parallel/__init__ runs first
    assert GRAPH["wan22_core.sampling.moe"] == {"wan22_core.config"}  # its own package is already running
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_engine():
    assert cycles(GRAPH) == []


def test_parallel_never_imports_the_cli():
    for name in under("wan22_core.parallel"):
        assert not any(target.startswith("wan22_core.cli") for target in reachable(name)), name


def test_sampling_is_math_without_models_or_placement():
    for name in under("wan22_core.sampling"):
        reached = reachable(name)
        assert not [t for t in reached if t.startswith(("wan22_core.models", "wan22_core.placement"))], name


def attribute_chains(source: str) -> set[str]:
    """Dotted names the code spells (`torch.distributed.all_reduce`, ...)."""
    chains = set()
    for node in ast.walk(ast.parse(source)):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and parts:
            chains.add(".".join([node.id, *reversed(parts)]))
    return chains


def test_models_never_import_or_call_torch_distributed():
    for name in under("wan22_core.models"):
        assert not [n for n in imported_names(name) if n.startswith("torch.distributed")], name
        chains = attribute_chains(MODULES[name].read_text(encoding="utf-8"))
        assert not [c for c in chains if c.startswith("torch.distributed")], name
    # what the second check catches: a call through `import torch`, which imports nothing more
    assert "torch.distributed.all_reduce" in attribute_chains("import torch\ntorch.distributed.all_reduce(x)\n")


def test_the_engine_never_imports_comfyui():
    for name in MODULES:
        names = imported_names(name)
        assert not [n for n in names if n.split(".")[0] in COMFYUI or n.startswith("<outside>")], name
