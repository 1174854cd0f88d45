"""The state journal end to end (issue 16.1): real provider hosts, real ipykernels, the
provisioner's tunnel and file channel. The kernel's variables come back to this machine after
each cell, outside the notebook's directory; after the provider is killed they are restored
into a kernel on a second provider, and what could not be kept is named with its cell."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jupyter_core.paths import jupyter_data_dir

from jupyter_io.errors import JupyterIOError
from jupyter_io.files import UnsafePath
from jupyter_io.journal.snapshot import JOURNAL_DIR, OBJECTS, Manifest, serialise
from kernel_provisioner.journal import COMPLETE, LocalJournal, _stage, restore
from kernel_provisioner.provisioner import RemoteKernelProvisioner

CELLS = [
    "import numpy as np, torch\nn = 42\nd = {'a': [1, 2], 'b': 'x'}",
    "a = np.arange(10_000, dtype=np.float32)\nt = torch.randn(512, 512)\nt2 = t",
    "class Point:\n    def __init__(self, x): self.x = x\np = Point(3)",
    "gen = (i for i in range(3))",
]


def _journal(km: Any) -> LocalJournal:
    provisioner = km.provisioner
    assert isinstance(provisioner, RemoteKernelProvisioner)
    journal = provisioner.state_journal
    assert journal is not None and journal.enabled
    return journal


async def _run(cells: Any, kc: Any, code: str) -> Any:
    ex = await cells.run(kc, code, timeout=60)
    assert ex.reply["content"]["status"] == "ok", ex.reply["content"]
    return ex


async def test_the_journal_comes_back_and_restores_on_a_second_provider(
    start_host: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    first = start_host()
    km = await start_kernel(kernelspecs.install("io-j1", first.url, first.user_keypair_path))
    kc = await cells.connect(km)
    journal = _journal(km)
    # Kept per kernel id in Jupyter's data directory: never among the user's files.
    assert Path(journal.directory).is_relative_to(jupyter_data_dir())
    assert km.kernel_id in journal.directory
    try:
        for code in CELLS:
            await _run(cells, kc, code)
        manifest = await journal.sync(60)
        assert manifest is not None
        assert set(manifest.vars) == {"n", "d", "a", "t", "t2", "p", "Point"}
        assert manifest.missing["gen"]["source"] == CELLS[3]
        # t and t2 are one tensor: one object, carried once.
        assert manifest.vars["t"]["sha256"] == manifest.vars["t2"]["sha256"]
        objects = os.listdir(Path(journal.directory, JOURNAL_DIR, OBJECTS))
        assert sorted(objects) == sorted(manifest.objects())
        received = journal.endpoint.bytes_received if journal.endpoint else 0
        assert manifest.vars["t"]["size"] < received < 2 * manifest.vars["t"]["size"] + 200_000

        # A cell that changes nothing: no new snapshot, no object travels (one that names a
        # variable has it checked, and only a manifest a few hundred bytes long comes back).
        assert journal.endpoint is not None
        await _run(cells, kc, "print(1 + 1)")
        again = await journal.sync(30)
        assert again is not None and again.seq == manifest.seq
        assert journal.endpoint.bytes_received == received
        await _run(cells, kc, "print(n + 1, d['a'])")
        again = await journal.sync(30)
        assert again is not None and again.seq == manifest.seq
        assert journal.endpoint.bytes_received - received < 4096
        expected = await _run(cells, kc, "print(float(t.sum()), float(a.sum()), p.x, d)")
    finally:
        kc.stop_channels()

    # The provider dies; a kernel on another provider gets the variables back.
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = start_host()
    km2 = await start_kernel(kernelspecs.install("io-j2", second.url, second.user_keypair_path))
    kc2 = await cells.connect(km2)
    try:
        result = await restore(_journal(km2), kc2, source=journal.directory, timeout=60)
        assert result.restored == ["a", "d", "n", "t", "t2"]
        # A class defined in the notebook travels by value (cloudpickle): code, so it is not
        # loaded into a kernel on another provider (test_journal_vetting.py); its cell is
        # named to be re-run, and re-running it brings it and its instance back.
        missing = {m["name"]: m for m in result.missing}
        assert missing["gen"]["source"] == CELLS[3]
        assert (missing["Point"]["cell"], missing["p"]["cell"]) == (3, 3)
        assert set(missing) == {"gen", "Point", "p"}
        assert result.pushed_bytes >= manifest.vars["t"]["size"]
        await _run(cells, kc2, CELLS[2])
        got = await _run(cells, kc2, "print(float(t.sum()), float(a.sum()), p.x, d)")
        assert got.stream() == expected.stream()
        # What was restored is not written again by the new kernel's journal.
        await _run(cells, kc2, "m = 7")
        manifest2 = await _journal(km2).sync(60)
        assert manifest2 is not None and manifest2.vars["m"]["cell"] >= 1
        assert manifest2.vars["t"]["sha256"] == manifest.vars["t"]["sha256"]
    finally:
        kc2.stop_channels()


async def test_a_kernelspec_opts_out(
    provider_host: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    spec = kernelspecs.install(
        "io-nojournal", provider_host.url, provider_host.user_keypair_path, journal=False
    )
    km = await start_kernel(spec)
    assert km.provisioner.state_journal is None
    kc = await cells.connect(km)
    try:
        ex = await _run(
            cells,
            kc,
            "import os, sys\nx = 1\n"
            "print('jupyter_io.journal.kernel_ext' in sys.modules, "
            "os.path.exists(os.path.expanduser('~/.jupyter-io/journal')))",
        )
        assert ex.stream().strip() == "False False"
    finally:
        kc.stop_channels()


async def test_a_journal_over_the_local_cap_is_not_brought_back(
    provider_host: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    # The provider is not trusted with this machine's disk: a manifest naming more than the
    # local cap is refused before any object is pulled.
    spec = kernelspecs.install("io-jcap", provider_host.url, provider_host.user_keypair_path)
    km = await start_kernel(spec)
    kc = await cells.connect(km)
    journal = _journal(km)
    journal.max_bytes = 100_000
    try:
        await _run(cells, kc, "import numpy as np\nsmall = 1\nbig = np.zeros(50_000)")
        with pytest.raises(JupyterIOError, match="over this machine's cap"):
            await journal.sync(60)
        objects = os.path.join(journal.directory, JOURNAL_DIR, OBJECTS)
        assert not await asyncio.to_thread(os.path.exists, objects)
        assert journal.complete is None
    finally:
        kc.stop_channels()


def test_the_push_reads_each_object_beneath_the_journal_once_and_checks_it(tmp_path: Path) -> None:
    # The push sends the objects from where the journal keeps them (no copy): each is opened
    # as the file channel opens what it sends, so a link planted there (to a file of the
    # user's) is refused rather than followed, and a one-chunk object must hold what its
    # name says. The listing is what the channel sends: the vetted objects, then the manifest.
    source = tmp_path / "journal"
    objects = source / JOURNAL_DIR / OBJECTS
    objects.mkdir(parents=True)
    kept = serialise(np.arange(4))
    (objects / kept.sha256).write_bytes(kept.data)
    manifest = Manifest(1, {"a": {"sha256": kept.sha256, "kind": "numpy", "size": len(kept.data)}})
    (source / COMPLETE).write_text(manifest.to_json())
    staged = _stage(str(source), str(tmp_path / "staging"))
    assert [e.path for e in staged.objects] == [f"{JOURNAL_DIR}/{OBJECTS}/{kept.sha256}"]
    assert staged.manifest.path == f"{JOURNAL_DIR}/manifest.json"
    assert staged.modules == ["numpy"]
    assert sorted(p.name for p in (tmp_path / "staging").rglob("*") if p.is_file()) == [
        "manifest.json"
    ]

    secret = tmp_path / "secret.npy"
    secret.write_bytes(kept.data)
    (objects / kept.sha256).unlink()
    (objects / kept.sha256).symlink_to(secret)
    with pytest.raises(UnsafePath, match="link"):
        _stage(str(source), str(tmp_path / "staging"))
    (objects / kept.sha256).unlink()
    os.link(secret, objects / kept.sha256)
    with pytest.raises(UnsafePath, match="hard links"):
        _stage(str(source), str(tmp_path / "staging"))
    (objects / kept.sha256).unlink()
    (objects / kept.sha256).write_bytes(serialise(np.arange(5)).data)
    with pytest.raises(JupyterIOError, match="changed since it was brought back"):
        _stage(str(source), str(tmp_path / "staging"))
