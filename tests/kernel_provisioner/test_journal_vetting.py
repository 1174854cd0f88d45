"""A hostile provider's state journal must not run code in the user's next kernel (issue 16).

The journal objects a provider serves are what its kernel (or the provider itself) wrote.
Before a failover pushes them into a kernel on another provider, the user's side reads each
pickle's imports without unpickling it and holds back every object that names anything but
data constructors (:mod:`jupyter_io.journal.vetting`): a forged object whose pickle would
call ``os.system`` is not restored and its command never runs; plain data (dicts of lists,
numpy arrays, tensors, tensors inside a dict) comes back; a function defined in the notebook
is reported with its cell, to be re-run. Real provider hosts, real ipykernels, the
provisioner's file channel.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

from jupyter_io.journal.snapshot import JOURNAL_DIR, OBJECTS
from kernel_provisioner.journal import COMPLETE, LocalJournal, restore

from .test_journal import _journal, _run

CELLS = [
    "import numpy as np, torch\nd = {'a': [1, 2], 'b': ['x']}",
    "a = np.arange(1_000, dtype=np.float32)\nt = torch.arange(6.0).reshape(2, 3)\n"
    "sd = {'w': t[0], 'b': [torch.ones(2)]}",
    "def f(x):\n    return x + 1",
]
CHECK = "print(d, float(a.sum()), t.tolist(), sd['w'].tolist(), sd['b'][0].tolist())"


class _Forged:
    """What provider A serves as a journal object: a pickle that calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _forge(journal: LocalJournal, name: str, data: bytes) -> None:
    """Add ``name`` to the journal kept here, as the previous provider could have served it."""
    sha = hashlib.sha256(data).hexdigest()
    Path(journal.directory, JOURNAL_DIR, OBJECTS, sha).write_bytes(data)
    path = Path(journal.directory, COMPLETE)
    manifest = json.loads(path.read_text())
    manifest["vars"][name] = {"sha256": sha, "kind": "pickle", "size": len(data), "cell": 1}
    path.write_text(json.dumps(manifest))


async def test_a_forged_journal_object_is_not_restored_and_its_code_never_runs(
    provider_host: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    spec = kernelspecs.install("io-jv", provider_host.url, provider_host.user_keypair_path)
    km = await start_kernel(spec)
    kc = await cells.connect(km)
    journal = _journal(km)
    try:
        for code in CELLS:
            await _run(cells, kc, code)
        expected = (await _run(cells, kc, CHECK)).stream()
        manifest = await journal.sync(60)
        assert manifest is not None and set(manifest.vars) == {"a", "d", "f", "sd", "t"}
        assert manifest.vars["f"]["cell"] == 3
    finally:
        kc.stop_channels()
    # The marker would appear in the new kernel's workspace (its HOME) if the pickle ran.
    _forge(journal, "evil", pickle.dumps(_Forged("touch ~/pwned-by-the-journal")))

    km2 = await start_kernel(spec)
    kc2 = await cells.connect(km2)
    try:
        result = await restore(_journal(km2), kc2, source=journal.directory, timeout=60)
        marker = "import os\nprint(os.path.exists(os.path.expanduser('~/pwned-by-the-journal')))"
        assert (await _run(cells, kc2, marker)).stream() == "False\n"
        # The push sends the objects from where they are kept here, beside the forged one
        # and f's: only those the vetting let through reach the new workspace.
        pushed = "print(sorted(os.listdir(os.path.expanduser('~/" + JOURNAL_DIR + "/objects'))))"
        vetted = {manifest.vars[n]["sha256"] for n in ("a", "d", "sd", "t")}
        assert (await _run(cells, kc2, pushed)).stream() == f"{sorted(vetted)}\n"
        assert result.restored == ["a", "d", "sd", "t"]
        missing = {m["name"]: m for m in result.missing}
        assert set(missing) == {"evil", "f"}
        assert missing["evil"]["why"] == (
            f"the previous provider's pickle references {os.system.__module__}.system"
        )
        assert missing["f"]["cell"] == 3
        assert "cloudpickle" in missing["f"]["why"]
        got = await _run(cells, kc2, CHECK + "\nprint('f' in dir(), 'evil' in dir())")
        assert got.stream() == expected + "False False\n"
        # Re-running the cell the notice names brings the function back.
        await _run(cells, kc2, CELLS[2])
        assert (await _run(cells, kc2, "print(f(41))")).stream() == "42\n"
    finally:
        kc2.stop_channels()


async def test_trusting_the_previous_provider_restores_everything(
    provider_host: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    spec = kernelspecs.install("io-jt", provider_host.url, provider_host.user_keypair_path)
    km = await start_kernel(spec)
    kc = await cells.connect(km)
    journal = _journal(km)
    try:
        await _run(cells, kc, "x = [1, 2]\n" + CELLS[2])
        assert await journal.sync(60) is not None
    finally:
        kc.stop_channels()
    km2 = await start_kernel(spec)
    kc2 = await cells.connect(km2)
    try:
        target = _journal(km2)
        target.trust_previous_provider = True  # journal_trust_previous_provider = True
        result = await restore(target, kc2, source=journal.directory, timeout=60)
        assert (result.restored, result.missing) == (["f", "x"], [])
        assert (await _run(cells, kc2, "print(f(x[1]))")).stream() == "3\n"
    finally:
        kc2.stop_channels()
