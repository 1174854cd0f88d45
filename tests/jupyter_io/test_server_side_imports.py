"""What the Jupyter Server side loads (issue 13.3).

The server extension (:mod:`jupyter_io.serverext`) and the kernel provisioner
(:mod:`kernel_provisioner`) run inside every user's Jupyter Server. They talk to a coordinator
over HTTP and to a ledger over JSON-RPC; they must not carry the coordinator's internals, its
database layer, the embedded ledger (LiteSVM), torch or the provider host into that process.
Checked in a fresh interpreter, since this test process has imported all of them already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

#: Modules (and their submodules) the server side must not load.
FORBIDDEN = (
    "torch",
    "sqlalchemy",
    "alembic",
    "jupyter_io.coordinator.server",
    "jupyter_io.coordinator.store",
    "jupyter_io.coordinator.registry",
    "jupyter_io.coordinator.embedded_ledger",  # LiteSVM
    "jupyter_io.coordinator.ledger_rpc",  # its JSON-RPC server
    "provider_host",
)

# Imports every module of both packages and the extension's entry point, recording for each
# forbidden module the first of our files that asked for it; prints what got loaded.
_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback

    FORBIDDEN = tuple(json.loads(sys.argv[1]))
    OURS = ("/jupyter_io/", "/kernel_provisioner/")
    culprits = {}

    class Witness:
        # Finds nothing: it only notes who first imports a forbidden module.
        def find_spec(self, name, path=None, target=None):
            if name in FORBIDDEN and name not in culprits:
                ours = [f for f in traceback.extract_stack() if any(o in f.filename for o in OURS)]
                culprits[name] = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
            return None

    sys.meta_path.insert(0, Witness())
    for package_name in ("jupyter_io.serverext", "kernel_provisioner"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            importlib.import_module(info.name)
    import jupyter_io.serverext
    jupyter_io.serverext._jupyter_server_extension_points()

    # solders' own __init__ imports solders.litesvm whenever any solders module is imported
    # (a Keypair is), so its presence says nothing; what matters is that none of our modules
    # uses it.
    litesvm = sys.modules.get("solders.litesvm")
    svm = (litesvm, getattr(litesvm, "LiteSVM", None)) if litesvm is not None else ()
    users = sorted(
        name for name, module in list(sys.modules.items())
        if name.startswith(("jupyter_io", "kernel_provisioner"))
        and any(v is s for v in vars(module).values() for s in svm)
    )
    print(json.dumps({"loaded": sorted(sys.modules), "culprits": culprits, "litesvm_users": users}))
    """
)


def test_server_extension_and_provisioner_load_no_coordinator_internals() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = report["loaded"]
    # The probe did import the server side (a vacuous pass would list none of it).
    assert "jupyter_io.serverext.app" in loaded
    assert "kernel_provisioner.provisioner" in loaded

    bad = sorted(
        name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    )
    assert not bad, f"the Jupyter Server side loaded {bad}; first asked for by {report['culprits']}"
    assert report["litesvm_users"] == [], (
        f"server-side modules use LiteSVM (the coordinator's embedded ledger): "
        f"{report['litesvm_users']}"
    )
