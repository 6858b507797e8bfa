"""The package's shape: layers import downward only, no import cycle (imports inside functions count), gradio only
in the app, and plain run data that does not pull in diffusers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "visualizer"
# lowest first: a module may import its own layer and the layers below it, never one above
LAYERS = ["errors", "engine", "demo_model", "analysis", "media", "toy", "api", "app", "serve", "bench", "cli",
          "__main__", "__init__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports(path: Path) -> set[str]:
    """The visualizer modules `path` imports, wherever the import statement stands."""
    name, found = module_name(path), set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            if target.split(".")[0] != "visualizer":
                continue
            for alias in node.names:  # `from . import api` names a module; `from .run import Settings` a symbol
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "visualizer"}
    return found - {name}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_sits_in_a_named_layer():
    assert {m.split(".")[1] for m in GRAPH if "." in m} <= set(LAYERS)


def test_layers_import_downward_only():
    upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
              if d in GRAPH and layer(d) > layer(m) and not d.endswith(".__init__")]
    assert upward == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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


def test_no_import_cycle():
    # a package's __init__ re-exporting its modules is not a cycle of ideas; every other module is counted
    graph = {m: {d for d in deps if not (d == "visualizer")} for m, deps in GRAPH.items() if m != "visualizer"}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_app_imports_gradio():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] in ("gradio", "gradio_client") for n in names):
                importers.append(module_name(path))
    assert importers and {m.split(".")[1] for m in importers} <= {"app", "bench"}, importers


@pytest.mark.parametrize("module", ["visualizer.engine.run", "visualizer.engine.samplers", "visualizer.api"])
def test_plain_data_and_the_api_import_no_gradio(module):
    """Settings and Run are plain data: importing them loads neither diffusers nor gradio; the API loads no gradio."""
    code = (f"import sys, {module}; print(sorted(m for m in ('diffusers', 'gradio', 'transformers') "
            f"if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    forbidden = ["gradio"] if module == "visualizer.api" else ["diffusers", "gradio", "transformers"]
    assert not set(eval(loaded)) & set(forbidden), loaded


def test_the_top_level_holds_only_the_faces():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "api", "cli", "errors", "serve"]
