"""The import structure of docs/design.md §2, checked on the real source with grimp.

The layering rules (cli → engine → indexes, the core never imports ConceptWorld) are import-linter
contracts in pyproject.toml, run by `lint-imports` in CI; this test adds what a contract cannot
say: no module imports itself back through any chain, lazy imports inside functions and
TYPE_CHECKING imports included.
"""

from __future__ import annotations

import grimp


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
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
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("engine", "indexes")
    # The faces of the two top packages re-export their contents and are imported by nobody inside.
    for face in ("engine", "indexes"):
        for importer in graph.find_modules_that_directly_import(face):
            graph.remove_import(importer=importer, imported=face)
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y"]]


def test_the_public_api_resolves_and_import_engine_stays_light():
    import subprocess
    import sys

    import engine

    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
    code = "import sys, engine, engine.cli; print('torch' in sys.modules, 'engine.world.build' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # `atlas --help` loads neither torch nor the world's modules


def test_the_core_cli_imports_no_plugin_and_no_world():
    """The import contract lets the CLI's plug-ins (engine.cli.plugins) import the world; no other
    CLI module may import a plug-in, so the core CLI reaches no world module by any chain."""
    graph = grimp.build_graph("engine", "indexes")
    core = {m for m in graph.find_children("engine.cli") if not m.startswith("engine.cli.plugins")} | {"engine.cli"}
    assert "engine.cli.align_cmds" in core and "engine.cli.common" in core
    plugins = graph.find_descendants("engine.cli.plugins") | {"engine.cli.plugins"}
    assert {"engine.cli.plugins.world", "engine.cli.plugins.eval", "engine.cli.plugins.demo"} <= plugins
    for module in sorted(core):
        assert not graph.find_modules_directly_imported_by(module) & plugins, module
        for world in ("engine.world", "engine.demo"):
            assert graph.find_shortest_chain(importer=module, imported=world) is None, (module, world)
