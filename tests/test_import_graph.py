"""The package layering of docs/design.md ("Packages"), read from the source: every stage package
(streamer, reducer, inference, dashboards) and the sinks and simulator packages import only
beamkin/ and themselves; beamkin/ imports no other project package except in its command line
(beamkin.cli, beamkin.phases_command) and its lazy notebook façade (beamkin/__init__.py); and no module imports, directly
or through others, itself. Imports inside functions count: they are imports all the same."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("streamer", "reducer", "inference", "dashboards")
SIDE_PACKAGES = ("sinks", "simulator")
PACKAGES = ("beamkin",) + STAGES + SIDE_PACKAGES
#: the modules that put the stages together (the command line, and ``beamkin.analyze`` for notebooks)
ASSEMBLERS = {"beamkin.cli", "beamkin.__init__", "beamkin.__main__", "beamkin.phases_command"}


def module_files() -> dict[str, pathlib.Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules that module ``name`` imports anywhere in its source (``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module, else ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, [alias.name for alias in node.names])]
        else:
            continue
        for base, names in targets:
            if base.split(".")[0] not in PACKAGES:
                continue
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            if submodules:
                found.update(submodules)
            if len(submodules) < len(names) or not names:
                found.add(base if base in known else f"{base}.__init__")
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    known = set(modules) | {m.removesuffix(".__init__") for m in modules if m.endswith(".__init__")}
    graph = {}
    for name, path in modules.items():
        edges = imported_modules(name, path, known)
        graph[name] = {e if e in modules else f"{e}.__init__" for e in edges}
    return graph


def test_stages_sinks_and_simulator_import_only_beamkin_and_themselves():
    wrong = []
    for name, edges in import_graph().items():
        own = name.split(".")[0]
        if name in ASSEMBLERS:
            continue
        for target in sorted(edges):
            other = target.split(".")[0]
            if other != own and other != "beamkin":
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports across packages (stages meet only through the protocol):\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import inside a function is an edge (a test that cannot fail is no test)."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from reducer.integrate import Integrator\n    from beamkin import protocol\n")
    assert imported_modules("streamer.probe", module, {"reducer.integrate", "beamkin.protocol"}) == {
        "reducer.integrate", "beamkin.protocol"}


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_readable(package):
    """No module over ~500 lines (issue 14: one module per idea)."""
    long = {str(path.relative_to(ROOT)): n for path in (ROOT / package).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 520}
    assert not long, f"modules over 520 lines: {long}"


def test_readme_layout_table_names_every_package():
    """README's layout table lists exactly the project's packages."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1].rstrip("/") for line in section.splitlines() if line.startswith("| `")}
    assert listed == set(PACKAGES)
