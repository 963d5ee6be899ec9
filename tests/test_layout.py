"""The tree is the architecture (docs/architecture.md), and this holds it so.

Every module's imports are read from its source (all of them: at the top,
inside functions, and under ``TYPE_CHECKING``) and checked against the
rules of the wings:

* the **broker wing** (``brokerq.broker``) imports itself and the shared
  modules, never the client wing or the top;
* the **client wing** (``brokerq.client``) imports itself and the shared
  modules, never the broker wing or the top;
* the **shared modules** (protocol, validation, errors, spawn, pause, version) import
  only each other;
* the **integrations** (``brokerq.kombu``, the kombu transport;
  ``brokerq.nats``, the queue API on NATS JetStream) import
  the client wing, the shared modules and the library they plug into,
  never the broker wing or the top: they are clients like any other;
* the **top** (the public face, the CLI, ``brokerq.testing``, the demo)
  may import anything;

and there is no import circle anywhere. The old module paths users may
import keep working.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import brokerq

PACKAGE = Path(brokerq.__file__).resolve().parent
SHARED = {
    f"brokerq.{name}" for name in ("errors", "protocol", "validation", "spawn", "pause", "version")
}
WINGS = ("brokerq.broker", "brokerq.client")
#: Packages that plug brokerq into another library: clients of the broker.
INTEGRATIONS = ("brokerq.kombu", "brokerq.nats")
#: Third-party imports each part may make (the stdlib and msgspec: everyone).
THIRD_PARTY = {
    "brokerq.broker": {"trio", "click"},  # (click: local-queue-broker's options)
    "brokerq.client": {"anyio"},
    "shared": set(),
    "integrations": set(),
}
#: What each part may import of brokerq besides itself and the shared modules.
MAY_IMPORT = {"integrations": {"brokerq.client"}}


def module_name(path: Path) -> str:
    parts = ["brokerq", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> Iterator[str]:
    """Every module ``name`` imports: brokerq's by full name, others by their top name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # ``from . import protocol``: the module, if it is one.
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def part_of(name: str) -> str:
    if name in SHARED:
        return "shared"
    for wing in WINGS:
        if name == wing or name.startswith(wing + "."):
            return wing
    if any(name == part or name.startswith(part + ".") for part in INTEGRATIONS):
        return "integrations"
    return "top"


def brokerq_imports(name: str) -> set[str]:
    return {found for found in imports_of(name) if found in MODULES and found != name}


@pytest.mark.parametrize("name", [n for n in MODULES if part_of(n) != "top"])
def test_a_module_imports_only_what_its_part_may(name: str) -> None:
    part = part_of(name)
    allowed = {part, "shared", *MAY_IMPORT.get(part, ())}
    wrong = {found for found in brokerq_imports(name) if part_of(found) not in allowed}
    assert not wrong, f"{name} ({part}) imports {sorted(wrong)}"
    outside = {found.split(".")[0] for found in imports_of(name) if not found.startswith("brokerq")}
    foreign = {top for top in outside if top in {"trio", "anyio", "click"}}
    assert foreign <= THIRD_PARTY[part], f"{name} imports {sorted(foreign - THIRD_PARTY[part])}"


#: The sans-IO cores: no I/O, no event loop, given the time. They import
#: only each other and the shared modules. The broker's is a folder of its
#: own (all of ``brokerq.broker.core``); the client's sans-IO modules are
#: named.
CLIENT_SANS_IO = {
    f"brokerq.client.{name}" for name in ("calls", "wire", "window", "prefetch", "api")
}
#: The NATS backend's pure rules: names, and what a consumer does with a message.
NATS_SANS_IO = {"brokerq.nats.naming", "brokerq.nats.rules"}
SANS_IO_MODULES = (
    CLIENT_SANS_IO
    | NATS_SANS_IO
    | {
        name
        for name in MODULES
        if name == "brokerq.broker.core" or name.startswith("brokerq.broker.core.")
    }
)


def test_the_sans_io_cores_are_where_the_layout_says() -> None:
    """The sets checked below are not empty: a core moved or renamed fails
    here instead of leaving the check with nothing to check."""
    assert not CLIENT_SANS_IO - MODULES.keys(), sorted(CLIENT_SANS_IO - MODULES.keys())
    assert not NATS_SANS_IO - MODULES.keys(), sorted(NATS_SANS_IO - MODULES.keys())
    broker_core = SANS_IO_MODULES - CLIENT_SANS_IO - NATS_SANS_IO
    assert "brokerq.broker.core" in broker_core
    assert len(broker_core) > 1, "brokerq.broker.core is a folder of modules"


@pytest.mark.parametrize("name", sorted(SANS_IO_MODULES))
def test_a_sans_io_core_module_imports_no_io(name: str) -> None:
    wrong = {
        found
        for found in brokerq_imports(name)
        if part_of(found) != "shared" and found not in SANS_IO_MODULES
    }
    assert not wrong, f"{name} (sans-IO) imports {sorted(wrong)}"
    outside = {found.split(".")[0] for found in imports_of(name)}
    assert not outside & {"trio", "anyio", "socket", "select", "threading"}, name


def test_docs_architecture_names_every_module() -> None:
    doc = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()
    for name in MODULES:
        leaf = name.rpartition(".")[2]
        if leaf not in {"brokerq", "broker", "client", "cli", "core", "base"}:
            assert leaf in doc, f"docs/architecture.md does not name {name}"


def test_no_import_circles() -> None:
    graph = {name: brokerq_imports(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circle = [*path[path.index(name) :], name]
            raise AssertionError("an import circle: " + " -> ".join(circle))
        if name in done:
            return
        for found in sorted(graph[name]):
            visit(found, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_no_module_is_over_500_lines() -> None:
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long


@pytest.mark.parametrize(
    ("old", "names"),
    [
        ("brokerq.client", ["Client", "Queue", "Message", "Subscription", "connect"]),
        ("brokerq.async_client", ["AsyncClient", "AsyncQueue", "open_async_client"]),
        ("brokerq.errors", ["BrokerqError", "Empty", "Full", "ConnectionLost"]),
        ("brokerq.protocol", ["encode_frame", "decode_request", "PROTOCOL_VERSION"]),
        ("brokerq.testing", ["private_broker"]),
        ("brokerq.cli", ["cli", "main"]),
    ],
)
def test_the_old_module_paths_users_import_still_work(old: str, names: list[str]) -> None:
    module = importlib.import_module(old)
    for name in names:
        assert getattr(module, name) is not None
    if old == "brokerq.client":
        assert module.Client is brokerq.Client
    if old == "brokerq.async_client":
        assert module.AsyncClient is brokerq.AsyncClient
