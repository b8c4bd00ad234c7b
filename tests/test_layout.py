"""The package layout: no import circles, lower layers never import higher ones, every module says its job.

Imports are read from the source (every ``import`` / ``from ... import`` statement, function-level ones
included, since a lazy import is how a circle usually hides), so the checks hold without importing anything.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mr1jax"

#: Layers from the bottom up; a module may import its own layer and the ones below it, never one above.
LAYERS = ("parallel", "models", "data", "generate", "rl", "testing", "trainer", "planning", "commands")
COMMANDS = ("train", "eval", "export", "plan", "demo")
#: Modules over this many lines must say why in their docstring ("Over 500 lines: ...").
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """mr1jax modules `path` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mr1jax"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mr1jax":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return "commands" if parts[1] in COMMANDS else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_graph_is_read(graph):
    """The walk finds the edges it must (a broken walk would pass every check below vacuously)."""
    assert "mr1jax.models.qwen2_vl.model" in graph["mr1jax.generate.sampler"]
    assert "mr1jax.trainer.state" in graph["mr1jax.trainer.loop"]
    assert "mr1jax.models.lora" in graph["mr1jax.trainer.build"]          # via "from mr1jax.models import lora"


def test_every_module_is_in_a_layer(graph):
    unknown = {m for m in graph if _layer(m) not in LAYERS + ("package",)}
    assert not unknown, f"modules outside the known layers {LAYERS}: {sorted(unknown)}"
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == set(COMMANDS), f"the package's top level holds only the commands, found {sorted(top)}"


def test_no_import_circles(graph):
    """Tarjan's strongly connected components: every component must be a single module."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_lower_layers_never_import_higher_ones(graph):
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, deps in graph.items() for b in deps
           if _layer(a) in rank and _layer(b) in rank and rank[_layer(b)] > rank[_layer(a)]]
    assert not bad, "\n".join(bad)


def test_every_module_says_its_job_and_long_ones_say_why():
    for name, path in _modules().items():
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc and doc.strip(), f"{name} has no module docstring"
        if source.count("\n") > MAX_LINES:
            assert "Over 500 lines:" in doc, f"{name} has {source.count(chr(10))} lines and no stated reason"


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The same functions flag a hand-made circle and a lower layer importing a higher one."""
    graph = {"mr1jax.models.a": {"mr1jax.trainer.b"}, "mr1jax.trainer.b": {"mr1jax.models.a"}}
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles(graph)
    with pytest.raises(AssertionError, match="imports mr1jax.trainer.b"):
        test_lower_layers_never_import_higher_ones(graph)
