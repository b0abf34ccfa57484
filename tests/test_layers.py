"""The package layering of docs/ARCHITECTURE.md ("Packages"), checked over the source with `ast`.

- Imports go one way: a package imports only packages below it (LAYERS, lowest first) or itself.
- No module imports another first-party module from inside a function, except to defer a heavy optional dependency
  (torch, dlib, scikit-learn, matplotlib, cryptography), with a comment on the import's line saying so.
- No cycle among modules' top-level imports.
- No module over 500 lines and no class over 250, unless the module's docstring gives the reason in a paragraph
  that starts with "Size:".
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lowest first. A package may import the packages before it in this list, and itself.
LAYERS = ["protos", "lookalike", "encoder", "jobs", "shard", "router", "control", "bench", "tools"]
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
SIZE_REASON = "Size:"


def _modules(packages=LAYERS) -> dict[str, pathlib.Path]:
    out = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if pkg == "protos" and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, module: str):
    """(line, imported module, at module level) for each first-party import of a module's syntax tree."""
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` / `try:` at module level are still module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
                names += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
        else:
            continue
        for name in names:
            if name.split(".")[0] in LAYERS:
                yield node.lineno, name, id(node) in top_level


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def reverse_imports(sources: dict[str, str]) -> list[str]:
    """Imports that go up the layers, as sentences; ``sources`` maps module names to their text."""
    bad = []
    for module, text in sources.items():
        for line, name in sorted({(line, name.split(".")[0]) for line, name, _ in _imports(ast.parse(text), module)}):
            if _layer(name) > _layer(module):
                bad.append(f"{module}:{line} imports {name}: {LAYERS[_layer(module)]} sits below "
                           f"{LAYERS[_layer(name)]}")
    return bad


def local_imports(sources: dict[str, str]) -> list[str]:
    """First-party imports inside functions without a comment on their line saying why."""
    bad = []
    for module, text in sources.items():
        lines = text.splitlines()
        found = {(line, name.split(".")[0]) for line, name, top in _imports(ast.parse(text), module) if not top}
        for line, name in sorted(found):
            if "#" not in lines[line - 1]:
                bad.append(f"{module}:{line} imports {name} inside a function, without a comment saying why")
    return bad


def _sources() -> dict[str, str]:
    return {m: p.read_text() for m, p in _modules().items()}


def test_imports_go_down_the_layers():
    assert reverse_imports(_sources()) == []


def test_the_check_catches_a_reverse_import():
    sources = {"lookalike.config": "import shard.index\n", "shard.core": "from lookalike import errors\n",
               "router.core": "def f():\n    from control.controller import Controller  # deferred\n"}
    assert [s.split(" imports")[0] for s in reverse_imports(sources)] == ["lookalike.config:1", "router.core:2"]


def test_no_unexplained_function_local_first_party_import():
    assert local_imports(_sources()) == []
    assert local_imports({"tools.cli": "def f():\n    import encoder.torchscript\n"}) != []


def test_no_import_cycles():
    sources = _sources()
    known = set(sources)
    graph = {}
    for module, text in sources.items():
        deps = set()
        for _, name, top in _imports(ast.parse(text), module):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if top and name and name != module:
                deps.add(name)
        graph[module] = deps
    cycles = []
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue  # a package and its own modules
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("pkg", LAYERS)
def test_modules_and_classes_stay_small(pkg):
    bad = []
    for module, path in _modules([pkg]).items():
        text = path.read_text()
        tree = ast.parse(text)
        doc = ast.get_docstring(tree) or ""
        if SIZE_REASON in doc:
            continue
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            bad.append(f"{module}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                bad.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert bad == [], f"over {MAX_MODULE_LINES} lines a module or {MAX_CLASS_LINES} a class, with no '{SIZE_REASON}' reason"


if __name__ == "__main__":  # `python tests/test_layers.py [PACKAGE]`: every finding, for one package or all
    import sys

    wanted = sys.argv[1:] or LAYERS
    found = {m: t for m, t in _sources().items() if m.split(".")[0] in wanted}
    for finding in reverse_imports(found) + local_imports(found):
        print(finding)
    for module, path in _modules(wanted).items():
        tree = ast.parse(text := path.read_text())
        if SIZE_REASON in (ast.get_docstring(tree) or ""):
            continue
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            print(f"{module}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                print(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
