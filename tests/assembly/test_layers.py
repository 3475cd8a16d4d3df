"""
The package's imports point one way: down the layers, never back up.

Read from the source with L{ast}, so the test needs nothing imported and
sees imports inside functions and under C{TYPE_CHECKING} too.  The layers,
lowest first, are the subpackages of C{txpypi}; see C{docs/ARCHITECTURE.md}.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "txpypi"

#: Lowest first: a module may import its own layer and the ones before it.
LAYERS = ("core", "concurrency", "storage", "fetch", "cache", "web")

#: The modules that assemble the layers (options, the twistd plugin, the
#: services) and the test support; they may import any layer, and no layer
#: may import them.  C{txpypi/__init__.py} holds only C{__version__}.
ASSEMBLY = ("config", "options", "upstreams", "tap", "services", "workers", "worker", "reactor", "testing")

#: What the pure core may import: computation on values, nothing that
#: touches a socket, a file, a thread, a clock or the reactor.
PURE = (
    "__future__",
    "attrs",
    "base64",
    "collections",
    "dataclasses",
    # For reading dates and times; that the core never asks it the time
    # is test_the_core_never_reads_the_clock's.
    "datetime",
    "enum",
    "fnmatch",
    "functools",
    "hashlib",
    "hmac",
    "html",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "math",
    "packaging",
    "re",
    "string",
    "typing",
    "urllib.parse",
    "txpypi.core",
)


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(path: Path) -> Iterator[str]:
    """
    Every module the file imports, absolute.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; write it absolute"
            assert node.module is not None
            if node.module == "txpypi":
                # from txpypi import config: the names are modules too.
                for alias in node.names:
                    yield f"txpypi.{alias.name}" if alias.name != "__version__" else "txpypi"
            else:
                yield node.module
                # from twisted.internet import reactor: the name may be a module.
                for alias in node.names:
                    yield f"{node.module}.{alias.name}"


def layer(module: str) -> str | None:
    """
    The layer (or assembly module) of a txpypi module, or None for the
    package itself (its C{__version__}) and for anything outside txpypi.
    """
    parts = module.split(".")
    if parts[0] != "txpypi" or len(parts) == 1:
        return None
    return parts[1]


def test_every_module_lives_in_a_layer_or_assembles_them() -> None:
    """
    A new module is put in a layer (or added to the assembly on purpose),
    so that where it sits says what it may import.
    """
    homeless = [name for name, _ in modules() if layer(name) not in (*LAYERS, *ASSEMBLY, None)]
    assert homeless == []


@pytest.mark.parametrize("name,path", list(modules()), ids=[name for name, _ in modules()])
def test_imports_point_down(name: str, path: Path) -> None:
    """
    A module in a layer imports only its own layer and those below it, and
    never the assembly above all of them.
    """
    mine = layer(name)
    if mine not in LAYERS:
        return
    up = [
        target
        for target in imports(path)
        if (other := layer(target)) is not None
        and (other not in LAYERS or LAYERS.index(other) > LAYERS.index(mine))
    ]
    assert up == [], f"{name} imports upward"


@pytest.mark.parametrize(
    "name,path",
    [(name, path) for name, path in modules() if layer(name) == "core"],
    ids=[name for name, _ in modules() if layer(name) == "core"],
)
def test_the_core_is_pure(name: str, path: Path) -> None:
    """
    The core decides (names, index formats, HTTP rules, the fetch policy)
    and does no I/O: no reactor, no sockets, no files, no threads, no clock.
    """
    impure = [
        target
        for target in imports(path)
        if not any(target == allowed or target.startswith(allowed + ".") for allowed in PURE)
    ]
    assert impure == [], f"{name} imports I/O"


@pytest.mark.parametrize(
    "name,path",
    [(name, path) for name, path in modules() if layer(name) in LAYERS],
    ids=[name for name, _ in modules() if layer(name) in LAYERS],
)
def test_no_layer_imports_the_global_reactor(name: str, path: Path) -> None:
    """
    Clocks and reactors are passed in, so that tests drive them; only the
    assembly (C{tap.makeService}) picks the global reactor.
    """
    assert "twisted.internet.reactor" not in set(imports(path))


def test_no_module_imports_itself_round_a_circle() -> None:
    """
    No circle of imports, even inside one layer (nor under
    C{TYPE_CHECKING}): a circle means two modules are one job split in
    two, or a third module is missing.
    """
    names = {name for name, _ in modules()}
    graph = {
        name: {target for target in imports(path) if target in names and target != name}
        for name, path in modules()
    }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path[path.index(name) :], name))}"
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """
    The readers above see what they must: a nested import, a C{from
    txpypi import module}, an upward arrow.
    """
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from txpypi import tap\n    import twisted.internet.reactor\n"
        "from txpypi.web.app import Proxy\n"
    )
    found = set(imports(source))
    assert found >= {"txpypi.tap", "twisted.internet.reactor", "txpypi.web.app"}
    assert not any(target.startswith("os") for target in found)
    assert layer("txpypi.web.app") == "web" and layer("txpypi") is None


#: How code would read the clock through an allowed module.
CLOCK_READS = re.compile(r"\.(now|today|utcnow)\(")


def test_the_core_never_reads_the_clock() -> None:
    """
    The core may parse dates (C{datetime}), never ask the time: it is
    passed in, so that tests drive it.
    """
    for name, path in modules():
        if name.startswith("txpypi.core"):
            assert CLOCK_READS.search(path.read_text(encoding="utf-8")) is None, name
