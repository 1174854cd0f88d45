"""Who may import whom: the boundaries between the coordinator, the provider host and the
Jupyter side, read from the source with ``ast`` (every ``import``, function-level and
``TYPE_CHECKING`` ones included), so a new import across a boundary fails here, not in a
provider's deployment.

* The coordinator (``jupyter_io.coordinator``, the marketplace server) is imported by neither
  the provider host nor the Jupyter side (the provisioner, the server extension), and imports
  neither of them: what two parties share lives in a contract module both import.
* The contracts two parties speak (``jupyter_io.protocol``, ``.provider_link``, ``.signing``,
  ``.gpu_names``, ``.leases``) do no I/O: they import the standard library, solders and each
  other only.
* No import circles among the modules of the three packages.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jupyter_io", "kernel_provisioner", "provider_host")

COORDINATOR = "jupyter_io.coordinator"
PROVIDER_HOST = "provider_host"
PROVISIONER = "kernel_provisioner"
SERVER_EXTENSION = "jupyter_io.serverext"
CONTRACTS = (
    "jupyter_io.protocol",
    "jupyter_io.provider_link",
    "jupyter_io.signing",
    "jupyter_io.gpu_names",
    "jupyter_io.leases",
    "jupyter_io.queue_tickets",
    "jupyter_io.gpu_challenge",
    "jupyter_io.coordinator_urls",
    "jupyter_io.cohorts",
    "jupyter_io.files",
    "jupyter_io.ping",
)
#: What a contract may import besides the standard library: its own package's error tree
#: and the other contracts, solders (keys and signatures) and numpy (pure arithmetic: the
#: GPU challenge's matrices, computed the same way on both sides; a base dependency).
CONTRACT_IMPORTS = ("jupyter_io.errors", *CONTRACTS, "solders", "numpy")

#: (importer, imported): no module under the first may import one under the second.
FORBIDDEN = [
    (PROVIDER_HOST, COORDINATOR),
    (PROVISIONER, COORDINATOR),
    (SERVER_EXTENSION, COORDINATOR),
    (COORDINATOR, PROVIDER_HOST),
    (COORDINATOR, PROVISIONER),
    (COORDINATOR, SERVER_EXTENSION),
    (PROVIDER_HOST, PROVISIONER),
    (PROVIDER_HOST, SERVER_EXTENSION),
    (PROVISIONER, PROVIDER_HOST),
    (SERVER_EXTENSION, PROVIDER_HOST),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the three packages: dotted name → (file, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The absolute names ``module`` imports (``from X import name`` gives ``X.name`` when
    that is a module of ours, else ``X``)."""
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                names.add(child if child in MODULES else source)
    return names


IMPORTS = {module: _imports(module) for module in MODULES}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scan_sees_the_imports_it_judges() -> None:
    # A scan that found nothing would pass every rule below.
    assert len(MODULES) > 50
    assert "jupyter_io.provider_link" in IMPORTS["provider_host.coordinator_link"]
    assert "jupyter_io.coordinator_client" in IMPORTS["kernel_provisioner.lease"]
    # Function-level and relative imports count too.
    assert "jupyter_io.coordinator_client" in IMPORTS["jupyter_io.demo"]
    assert "jupyter_io.serverext" in IMPORTS["jupyter_io"]


@pytest.mark.parametrize(
    ("importer", "imported"), FORBIDDEN, ids=[f"{a}-{b}" for a, b in FORBIDDEN]
)
def test_no_import_crosses_a_boundary(importer: str, imported: str) -> None:
    crossing = sorted(
        f"{module} imports {name}"
        for module, names in IMPORTS.items()
        if _under(module, importer)
        for name in names
        if _under(name, imported)
    )
    assert not crossing, (
        f"{importer} must not import {imported}: {crossing}. What both sides need belongs "
        f"in a contract module they both import (jupyter_io.provider_link, .signing, ...)"
    )


@pytest.mark.parametrize("contract", CONTRACTS)
def test_a_contract_imports_only_the_stdlib_solders_and_other_contracts(contract: str) -> None:
    assert contract in MODULES
    stray = sorted(
        name
        for name in IMPORTS[contract]
        if name.partition(".")[0] not in sys.stdlib_module_names
        and not any(_under(name, allowed) for allowed in CONTRACT_IMPORTS)
    )
    assert not stray, f"{contract} is a sans-I/O contract; it may not import {stray}"


def _cycle() -> list[str] | None:
    """One import circle, as the modules around it, or None.

    A module's import of one of its own packages (``from .. import __version__``) is left
    out: Python imports a module's packages before the module anyway, so that edge is always
    there and says nothing about how the modules depend on each other.
    """
    graph = {
        module: sorted(
            name
            for name in names
            if name in MODULES and name != module and not module.startswith(name + ".")
        )
        for module, names in IMPORTS.items()
    }
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for name in graph[module]:
            if name in on_path:
                return [*path[path.index(name) :], name]
            if name not in done and (found := visit(name)) is not None:
                return found
        on_path.discard(path.pop())
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (found := visit(module)) is not None:
            return found
    return None


def test_no_import_circles() -> None:
    cycle = _cycle()
    assert cycle is None, (
        f"import circle: {' -> '.join(cycle or [])}; pass what one side needs in (a callback, "
        f"a Protocol) instead of importing it back"
    )
