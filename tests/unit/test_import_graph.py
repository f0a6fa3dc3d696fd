"""No import circle in amavisd/ and amavisd_client/, and the settings stay low.

The graph is read from the source (ast), not from a running interpreter, so
every import counts: at module level, inside functions (a deferred import
hides a circle from Python, not from a reader), in try/except. Only imports
under `if TYPE_CHECKING:` are left out: they never run.

Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so an
import of a submodule is also an edge to each package above it, except the
packages the importer is itself inside (their `__init__` ran before it).
That is how `compressed -> archives.external` was a circle: importing the
tool runner ran `archives/__init__`, which imports `freeze`, which imports
`compressed`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("amavisd", "amavisd_client")


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping `if TYPE_CHECKING:` bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _type_checking_only(node):
            children = list(node.orelse)
        todo.extend(children)


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> set[str]:
    """The modules of ours an import statement loads, most specific first."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            names.append(full if full in known else base)
    loaded: set[str] = set()
    for name in names:
        while name and name not in known:  # `import a.b.attr`: the module is a.b
            name = name.rpartition(".")[0]
        if not name:
            continue  # not ours
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages above run first
            target = ".".join(parts[:depth])
            inside = module == target or module.startswith(target + ".")
            # A package above us runs before us anyway (no edge), unless we
            # name it for one of its attributes: that reads a half-built
            # package (`from amavisd.config import load` inside amavisd.config).
            named = depth == len(parts) and target != module
            if target in known and (not inside or named):
                loaded.add(target)
    return loaded


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_names(root, packages)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(module, is_package, node, known)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each
    given as one circle through it, for the failure message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative: the graph may be deep
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(_circle(graph, set(component)))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One path a -> ... -> a inside a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for succ in sorted(graph[node] & component):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                frontier.append(succ)
    return sorted(component)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for succ in graph[todo.pop()]:
            if succ not in seen:
                seen.add(succ)
                todo.append(succ)
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO)


def test_no_import_circle(graph):
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


# What the settings may load: their own modules and the leaves that hold the
# vocabulary of other parts (beside those parts' registries). No scanner, no
# forwarder, no socket code, nothing above: the daemon's layers import config,
# never the other way round.
CONFIG_MAY_REACH = {
    "amavisd", "amavisd.config", "amavisd.config.setting", "amavisd.config.validators",
    "amavisd.config.table", "amavisd.config.values", "amavisd.config.loading",
    "amavisd.config.flags", "amavisd.config.rendering",
    "amavisd.scan", "amavisd.scan.definitions",  # the [scanners.*] schema
    "amavisd.actions", "amavisd.actions.methods",  # how a sending method is written
    "amavisd.policy", "amavisd.policy.banned", "amavisd.policy.destinies",
    "amavisd.decode", "amavisd.decode.parts", "amavisd.decode.window", "amavisd.verdict", "amavisd.sysexits",
    "amavisd_client", "amavisd_client.wire", "amavisd_client.wire.address",
}


def test_config_imports_nothing_above_it(graph):
    reached = reachable(graph, "amavisd.config")
    assert reached <= CONFIG_MAY_REACH, sorted(reached - CONFIG_MAY_REACH)
    assert not any(m.startswith("amavisd.config") for m in reachable(
        graph, "amavisd.scan.definitions") | reachable(graph, "amavisd.actions.methods"))


def test_clamd_and_the_forwarder_read_addresses_through_the_one_parser(graph):
    assert "amavisd.config" not in reachable(graph, "amavisd.scan.clamd")
    assert "amavisd_client.wire.address" in graph["amavisd.scan.clamd"]
    assert "amavisd_client.wire.address" in graph["amavisd.actions.methods"]


def test_the_client_side_never_imports_the_daemon(graph):
    """amavisd_client is stdlib-only: the daemon imports it, not the other way."""
    for module in (m for m in graph if m.startswith("amavisd_client")):
        above = {m for m in reachable(graph, module) if m.split(".")[0] == "amavisd"}
        assert not above, (module, sorted(above))


# -- the checker itself finds what it must --------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_sees_a_circle_behind_a_deferred_import(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def later():\n    from pkg.a import thing\n",
        "pkg/c.py": "import pkg.a\n",
    })
    found = cycles(import_graph(tmp_path, ("pkg",)))
    assert found == [["pkg.a", "pkg.b", "pkg.a"]]


def test_the_check_sees_a_circle_through_a_package_init(tmp_path):
    # compressed -> archives.external ran archives/__init__ -> freeze -> compressed
    write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/compressed.py": "def salvage():\n    from pkg.archives import external\n",
        "pkg/archives/__init__.py": "from pkg.archives import external, freeze\n",
        "pkg/archives/external.py": "",
        "pkg/archives/freeze.py": "from pkg.compressed import inner_name\n",
    })
    found = cycles(import_graph(tmp_path, ("pkg",)))
    assert found == [["pkg.archives", "pkg.archives.freeze", "pkg.compressed", "pkg.archives"]]


def test_the_check_skips_type_checking_imports_and_siblings_in_a_package(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": "from pkg.x import X\nfrom pkg.y import Y\n",
        "pkg/x.py": "X = 1\n",
        "pkg/y.py": "from typing import TYPE_CHECKING\nfrom pkg.x import X\n"
                    "if TYPE_CHECKING:\n    from pkg.z import Z\nY = X\n",
        "pkg/z.py": "from pkg.y import Y\nZ = Y\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.y"] == {"pkg.x"}
    assert graph["pkg.z"] == {"pkg.y"}
    assert cycles(graph) == []


def test_relative_imports_resolve(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from . import m\n",
        "pkg/sub/m.py": "from ..top import T\nfrom .n import N\n",
        "pkg/sub/n.py": "N = 1\n",
        "pkg/top.py": "T = 1\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub"] == {"pkg.sub.m"}
    assert graph["pkg.sub.m"] == {"pkg.top", "pkg.sub.n"}


def test_the_check_sees_a_submodule_reading_its_own_half_built_package(tmp_path):
    # from amavisd.config import load, inside amavisd.config.values: ImportError at run time
    write_tree(tmp_path, {
        "pkg/__init__.py": "from pkg.values import Config\nfrom pkg.loading import load\n",
        "pkg/values.py": "from pkg import load\nConfig = 1\n",
        "pkg/loading.py": "def load():\n    pass\n",
    })
    found = cycles(import_graph(tmp_path, ("pkg",)))
    assert found == [["pkg", "pkg.values", "pkg"]]
