"""The package's folders are its layers: no module imports a layer above it, none imports a peer
wing, and there are no import cycles. Read from the source (ast), so the rule holds for imports
inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import hpstore

ROOT = Path(hpstore.__file__).parent

# Lower numbers are lower layers. A module may import its own folder and any lower layer.
LAYER = {
    "errors": 0,
    "counters": 1,
    "checksum": 1,
    "threads": 1,
    "options": 1,
    "memory": 1,
    "storage": 2,
    "format": 3,
    "gather": 4,
    "dataset": 5,
    "loading": 6,
    "checkpoint": 6,  # a peer of loading: neither imports the other
    "images": 6,  # a peer of loading: the loader calls transforms through a protocol (batch.FieldTransform)
    "tokens": 7,  # views over a split that the loader streams
}

# The only imports of a higher layer, each imported inside the one function that needs it.
ALLOWED_UP = {
    ("hpstore.dataset", "hpstore.tokens.windows"): "Dataset.windows() constructs the view",
}


def _unit(module: str) -> str:
    """``hpstore.format.writer`` -> ``format``; ``hpstore.dataset`` -> ``dataset``."""
    return module.split(".")[1]


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if module == "hpstore":  # the package's API re-exports every layer
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "hpstore" or node.module.startswith("hpstore."):
                    # ``from hpstore.storage import direct_io`` imports the submodule
                    for a in node.names:
                        sub = f"{node.module}.{a.name}"
                        names.add(sub if _is_module(sub) else node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("hpstore.")}
        found[module] = names
    return found


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _imports()}
    assert units <= set(LAYER), f"give {sorted(units - set(LAYER))} a layer in tests/test_layers.py"


def test_no_module_imports_a_layer_above_it_or_a_peer() -> None:
    bad = []
    for module, names in _imports().items():
        mine = _unit(module)
        for name in names:
            theirs = _unit(name)
            if theirs != mine and LAYER[theirs] >= LAYER[mine] and (module, name) not in ALLOWED_UP:
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles_between_modules() -> None:
    graph = _imports()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph or n == m or (m, n) in ALLOWED_UP:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join([*path[path.index(n) :], n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_ingest_command_does_not_import_torch() -> None:
    # Every ingest run would pay torch's import (~3 s here, against ~1.5 s for a whole small ingest).
    import subprocess
    import sys

    code = "import sys, tools.ingest, tools.ingest_tokens, tools.prepare; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
