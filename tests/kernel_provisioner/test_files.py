"""The notebook's directory travels with its remote kernel (issue 15), end to end: a real
provider host, real ipykernel, AsyncKernelManager started with the notebook's ``cwd`` as
Jupyter Server starts it, the provisioner's file channel over the real tunnel."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair

from jupyter_io.files import FileEntry, Offer, chunk_digests, content_hash, parse_files_body
from jupyter_io.protocol import FrameKind, decode_frame, encode_control
from kernel_provisioner.connection import TunnelClient
from kernel_provisioner.files import FilesOverCap, NotebookFiles
from kernel_provisioner.provisioner import RemoteKernelProvisioner

DATA = "x,y\n1,2\n3,4\n"


def _notebook_dir(tmp_path: Path) -> Path:
    nb = tmp_path / "notebook"
    (nb / "sub").mkdir(parents=True)
    (nb / "data.csv").write_text(DATA)
    (nb / "sub" / "notes.txt").write_text("nested")
    (nb / ".gitignore").write_text("*.log\n")
    (nb / "run.log").write_text("ignored by .gitignore")
    (nb / ".jupyter-io-ignore").write_text("secret/\n")
    (nb / "secret").mkdir()
    (nb / "secret" / "key.txt").write_text("never sent")
    (nb / "node_modules").mkdir()
    (nb / "node_modules" / "a.js").write_text("skipped by default")
    (nb / "passwd").symlink_to("/etc/passwd")
    return nb


async def _start(spec: str, cwd: Path, managers: list[AsyncKernelManager]) -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=spec)
    managers.append(km)
    await km.start_kernel(cwd=str(cwd))
    return km


@pytest.fixture
async def managers() -> Any:
    started: list[AsyncKernelManager] = []
    yield started
    for km in started:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


def _files(km: AsyncKernelManager) -> NotebookFiles:
    provisioner = km.provisioner
    assert isinstance(provisioner, RemoteKernelProvisioner)
    files = provisioner.files
    assert files is not None and files.enabled
    return files


async def test_files_go_with_the_kernel_and_come_back(
    remote_spec: str, managers: Any, cells: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    km = await _start(remote_spec, nb, managers)
    files = _files(km)
    kc = await cells.connect(km)
    try:
        ex = await cells.run(
            kc,
            "import os\n"
            "print(open('data.csv').read(), end='')\n"
            "print(open('sub/notes.txt').read())\n"
            "print(sorted(p for p in ['run.log', 'secret', 'node_modules', 'passwd'] "
            "if os.path.lexists(p)))",
        )
        assert ex.status == "ok", ex.reply
        assert ex.stream() == DATA + "nested\n[]\n"

        # The kernel writes a model: it appears beside the notebook after the execution.
        ex = await cells.run(kc, "open('model.pt', 'wb').write(bytes(range(256)) * 400)")
        assert ex.status == "ok"
        assert await files.wait_for((nb / "model.pt").exists, 10)
        assert (nb / "model.pt").read_bytes() == bytes(range(256)) * 400

        # A local edit made while the kernel runs is there before the next execution.
        (nb / "data.csv").write_text("x,y\n5,6\n")
        ex = await cells.run(kc, "print(open('data.csv').read(), end='')")
        assert ex.stream() == "x,y\n5,6\n"
        assert not (nb / "data.remote-conflict.csv").exists()
    finally:
        kc.stop_channels()


async def test_both_changed_keeps_both(
    remote_spec: str, managers: Any, cells: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    km = await _start(remote_spec, nb, managers)
    files = _files(km)
    kc = await cells.connect(km)
    try:
        # The kernel rewrites data.csv, then waits for input; meanwhile the user saves it.
        msg_id = kc.execute(
            "open('data.csv', 'w').write('remote\\n')\ninput('go? ')", allow_stdin=True
        )
        await kc.get_stdin_msg(timeout=30)
        (nb / "data.csv").write_text("local\n")
        kc.input("yes")
        ex = await cells.collect(kc, msg_id)
        assert ex.status == "ok"
        conflict = nb / "data.remote-conflict.csv"
        assert await files.wait_for(conflict.exists, 10)
        assert conflict.read_text() == "remote\n"
        assert (nb / "data.csv").read_text() == "local\n"
        [transfer] = [t for t in files.endpoint.history if t.conflicts]  # type: ignore[union-attr]
        assert transfer.conflicts == [("data.csv", "data.remote-conflict.csv")]
        # The local copy wins the name on the provider too, before the next execution.
        ex = await cells.run(kc, "print(open('data.csv').read(), end='')")
        assert ex.stream() == "local\n"
    finally:
        kc.stop_channels()


async def test_a_second_session_re_sends_nothing(
    remote_spec: str, managers: Any, cells: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    (nb / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    km = await _start(remote_spec, nb, managers)
    first = _files(km).endpoint
    assert first is not None
    assert first.bytes_sent >= 3 * 1024 * 1024  # this user's store was empty: all of it
    sent = first.bytes_sent
    await km.restart_kernel(now=True)
    assert first.bytes_sent == sent  # a restart: the workspace and the store hold it
    await km.shutdown_kernel(now=True)

    km2 = await _start(remote_spec, nb, managers)
    second = _files(km2).endpoint
    assert second is not None and second is not first
    [sync] = [t for t in second.history if t.why == "sync"]
    # A new workspace, filled from the user's store on the provider: no content travelled.
    assert sync.bytes == 0
    assert sorted(sync.written) == [
        ".gitignore",
        ".jupyter-io-ignore",
        "data.csv",
        "sub/notes.txt",
        "weights.bin",
    ]
    kc = await cells.connect(km2)
    try:
        ex = await cells.run(kc, "import os; print(os.path.getsize('weights.bin'))")
        assert ex.stream() == f"{3 * 1024 * 1024}\n"
    finally:
        kc.stop_channels()


async def test_a_restart_of_an_unchanged_directory_sends_nothing(
    remote_spec: str, managers: Any, cells: Any, tmp_path: Path
) -> None:
    """A restart scans the notebook's directory once (the check's scan is the sync's) and,
    when nothing changed, sends no file channel message at all; one changed file is offered
    alone, and an edit made after the restart still reaches the kernel before it runs."""
    nb = _notebook_dir(tmp_path)
    for i in range(50):
        (nb / "sub" / f"part{i:02d}.csv").write_text(f"{i}\n")
    km = await _start(remote_spec, nb, managers)
    files = _files(km)
    endpoint = files.endpoint
    assert endpoint is not None
    client = km.provisioner._client  # type: ignore[union-attr]
    assert client is not None
    sent: list[dict[str, Any]] = []
    send_control = client.bridge.send_control

    async def spy(kind: FrameKind, body: dict[str, Any]) -> None:
        if kind is FrameKind.FILES:
            sent.append(body)
        await send_control(kind, body)

    client.bridge.send_control = spy
    scans = 0
    scan = files.scan

    def counted() -> Any:
        nonlocal scans
        scans += 1
        return scan()

    files.scan = counted  # type: ignore[method-assign]
    transfers = len(endpoint.history)

    await km.restart_kernel(now=True)
    assert sent == [] and len(endpoint.history) == transfers  # not even an empty offer
    assert scans == 1  # the check's scan, reused by the sync
    times = files.start_times
    assert times is not None and not times.offered and times.files == 0
    assert times.on_path == times.check + times.waited and times.check > 0

    # One file changed before the next restart: offered alone.
    (nb / "sub" / "part07.csv").write_text("seven\n")
    await km.restart_kernel(now=True)
    offers = [b for b in sent if b.get("op") == "offer"]
    assert [[e["path"] for e in b["files"]] for b in offers] == [["sub/part07.csv"]]
    assert files.start_times is not None and files.start_times.offered
    kc = await cells.connect(km)
    try:
        ex = await cells.run(kc, "print(open('sub/part07.csv').read(), end='')")
        assert ex.stream() == "seven\n"
        # Saved after the restart's scan: sent before the execution that reads it.
        (nb / "sub" / "part08.csv").write_text("eight\n")
        ex = await cells.run(kc, "print(open('sub/part08.csv').read(), end='')")
        assert ex.stream() == "eight\n"
    finally:
        kc.stop_channels()


async def test_a_start_over_the_cap_names_what_to_ignore(
    kernelspecs: Any, provider_host: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    (nb / "dataset.bin").write_bytes(b"\0" * 200_000)
    spec = kernelspecs.install(
        "io-remote-capped",
        provider_host.url,
        provider_host.user_keypair_path,
        files_max_bytes=100_000,
    )
    km = AsyncKernelManager(kernel_name=spec)
    with pytest.raises(FilesOverCap) as refused:
        await km.start_kernel(cwd=str(nb))
    message = str(refused.value)
    assert "dataset.bin (0.2 MB)" in message and ".jupyter-io-ignore" in message
    assert "files_max_bytes" in message


async def test_magics_pull_a_large_file_and_push_one_again(
    kernelspecs: Any, provider_host: Any, managers: Any, cells: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    spec = kernelspecs.install(
        "io-remote-small-pulls",
        provider_host.url,
        provider_host.user_keypair_path,
        files_pull_max_size=1000,
    )
    km = await _start(spec, nb, managers)
    files = _files(km)
    kc = await cells.connect(km)
    try:
        # Over files_pull_max_size: held back, unless the cell asks for it.
        ex = await cells.run(
            kc,
            "%load_ext jupyter_io.magics\n"
            "open('big.bin', 'wb').write(b'b' * 5000)\n"
            "open('other.bin', 'wb').write(b'o' * 5000)\n"
            "%io pull big.bin",
        )
        assert ex.status == "ok", ex.reply
        assert "big.bin comes back" in ex.stream()
        assert await files.wait_for(lambda: "other.bin" in files.held_back, 10)
        assert (nb / "big.bin").read_bytes() == b"b" * 5000
        assert not (nb / "other.bin").exists()

        # The kernel lost its copy of data.csv; %io push sends the notebook's again.
        ex = await cells.run(kc, "import os\nos.remove('data.csv')\n%io push data.csv")
        assert "data.csv is sent again" in ex.stream()
        assert await files.wait_for(
            lambda: any(t.why == "push" for t in files.endpoint.history),  # type: ignore[union-attr]
            10,
        )
        ex = await cells.run(kc, "print(open('data.csv').read(), end='')")
        assert ex.stream() == DATA
        # A path the rules keep back is not sent, whoever asks.
        await cells.run(kc, "%io push secret/key.txt")
        assert await files.wait_for(lambda: "secret/key.txt" in files.push_refused, 10)
        ex = await cells.run(kc, "import os; print(os.path.exists('secret/key.txt'))")
        assert ex.stream() == "False\n"
    finally:
        kc.stop_channels()
    # What was held back for its size comes back when the session ends.
    assert "other.bin" in files.held_back
    await km.shutdown_kernel(now=True)
    assert (nb / "other.bin").read_bytes() == b"o" * 5000


async def test_a_transfer_cut_mid_way_completes_after_the_resume(
    provider_host: Any, kernelspecs: Any, proxy_to: Any, managers: Any, cells: Any, tmp_path: Path
) -> None:
    proxy = await proxy_to(provider_host)
    spec = kernelspecs.install("io-remote-cut", proxy.url, provider_host.user_keypair_path)
    nb = _notebook_dir(tmp_path)
    km = await _start(spec, nb, managers)
    files = _files(km)
    assert files.endpoint is not None
    content = os.urandom(24 * 1024 * 1024)
    (nb / "weights.bin").write_bytes(content)
    pushing = asyncio.ensure_future(files.push())
    # Cut the connection once part of the file is on its way (a transfer records its
    # bytes as its chunks are sent; there is no event for "some of it left").
    deadline = asyncio.get_running_loop().time() + 30
    while not any(t.bytes >= 4 * 1024 * 1024 for t in files.endpoint.active.values()):
        assert asyncio.get_running_loop().time() < deadline, "the push never started"
        await asyncio.sleep(0.005)
    proxy.cut()
    assert not pushing.done()
    proxy.restore()
    transfer = await asyncio.wait_for(pushing, 60)
    assert transfer is not None and transfer.written == ["weights.bin"]
    kc = await cells.connect(km)
    try:
        ex = await cells.run(
            kc,
            "import hashlib\nprint(hashlib.sha256(open('weights.bin', 'rb').read()).hexdigest())",
        )
        assert ex.stream() == hashlib.sha256(content).hexdigest() + "\n"
    finally:
        kc.stop_channels()


async def test_the_provider_refuses_files_over_its_workspace_limit(
    start_host: Any, kernelspecs: Any, managers: Any, cells: Any, tmp_path: Path
) -> None:
    host = start_host("--ProviderConfig.max_workspace_bytes=3000000")
    spec = kernelspecs.install("io-remote-quota", host.url, host.user_keypair_path)
    nb = _notebook_dir(tmp_path)
    (nb / "dataset.bin").write_bytes(os.urandom(4_000_000))
    km = await _start(spec, nb, managers)
    files = _files(km)
    assert files.endpoint is not None
    [sync] = [t for t in files.endpoint.history if t.why == "sync"]
    assert sync.written == [] and sync.bytes == 0  # refused before any content travelled
    assert "over this host's limit of 3,000,000" in sync.refused[0][1]
    kc = await cells.connect(km)
    try:
        ex = await cells.run(kc, "import os; print(os.path.exists('dataset.bin'))")
        assert ex.stream() == "False\n"
    finally:
        kc.stop_channels()


async def test_the_kernel_cannot_plant_files_where_they_would_run_here(
    remote_spec: str, managers: Any, cells: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    (nb / ".git" / "hooks").mkdir(parents=True)
    km = await _start(remote_spec, nb, managers)
    files = _files(km)
    kc = await cells.connect(km)
    try:
        ex = await cells.run(
            kc,
            "import os\n"
            "for p in ['.git/hooks/pre-commit', 'node_modules/x.js', 'result.txt']:\n"
            "    os.makedirs(os.path.dirname(p) or '.', exist_ok=True)\n"
            "    open(p, 'w').write('echo pwned')\n",
        )
        assert ex.status == "ok"
        assert await files.wait_for((nb / "result.txt").exists, 10)
    finally:
        kc.stop_channels()
    assert not (nb / ".git" / "hooks" / "pre-commit").exists()
    assert not (nb / "node_modules" / "x.js").exists()
    [pull] = [t for t in files.endpoint.history if "result.txt" in t.written]  # type: ignore[union-attr]
    assert sorted(p for p, _ in pull.refused) == [".git/hooks/pre-commit", "node_modules/x.js"]


async def test_files_the_notebook_side_never_asked_for_are_refused(tmp_path: Path) -> None:
    nb = _notebook_dir(tmp_path)
    files = NotebookFiles(
        str(nb),
        max_bytes=0,
        pull_max_size=1000,
        store_root=str(tmp_path / "store"),
        store_max_bytes=0,
        window=1 << 20,
    )
    # A real client, never connected: its bridge keeps what the endpoint answers.
    client = TunnelClient("ws://127.0.0.1:9/tunnel", Keypair(), outbound={}, inbound={})
    files.attach(client)
    assert files.endpoint is not None
    content = b"print('pwned')\n"
    sha = content_hash(chunk_digests(content))
    offer = Offer("ab" * 16, (FileEntry("run_me.py", len(content), 0o755, sha),), "push")
    await files.endpoint.handle(
        decode_frame(encode_control(FrameKind.FILES, offer.to_body(), seq=1))
    )
    [done] = [
        parse_files_body(f.body)
        for f in map(decode_frame, client.tunnel.replay(0))
        if f.kind is FrameKind.FILES
    ]
    assert done.refused == (("run_me.py", "this end asked for no files under that id"),)
    assert not (nb / "run_me.py").exists()


@pytest.mark.parametrize(
    ("asked", "offered", "size", "refusal"),
    [
        (["model.pt"], "notebook.ipynb", 10, "the offer names files this pull did not ask for"),
        (None, "model.pt", 2_000_000, "over files_max_bytes (1,000,000)"),
    ],
)
async def test_a_pull_takes_only_what_it_asked_for(
    tmp_path: Path, asked: list[str] | None, offered: str, size: int, refusal: str
) -> None:
    nb = _notebook_dir(tmp_path)
    files = NotebookFiles(
        str(nb),
        max_bytes=1_000_000,
        pull_max_size=1000,
        store_root=str(tmp_path / "store"),
        store_max_bytes=0,
        window=1 << 20,
    )
    client = TunnelClient("ws://127.0.0.1:9/tunnel", Keypair(), outbound={}, inbound={})
    client.features = frozenset({"files"})  # as a WELCOME would say
    files.attach(client)
    endpoint = files.endpoint
    assert endpoint is not None
    pulling = asyncio.ensure_future(files.pull(asked, timeout=10))
    sent: list[Any] = []
    while not sent:  # the PULL is kept by the never-connected tunnel
        await asyncio.sleep(0)
        sent = [
            parse_files_body(f.body)
            for f in map(decode_frame, client.tunnel.replay(0))
            if f.kind is FrameKind.FILES
        ]
    sha = content_hash(chunk_digests(b"x" * 10))
    offer = Offer(sent[0].id, (FileEntry(offered, size, 0o644, sha),), "pull")
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, offer.to_body(), seq=1)))
    transfer = await pulling
    [(path, why)] = transfer.refused
    assert path == offered and refusal in why and transfer.bytes == 0
    assert not (nb / offered).exists() or offered == "notebook.ipynb"


async def test_a_pulled_file_in_conflict_is_no_longer_held_back(
    kernelspecs: Any, provider_host: Any, managers: Any, cells: Any, tmp_path: Path
) -> None:
    nb = _notebook_dir(tmp_path)
    spec = kernelspecs.install(
        "io-remote-held-conflict",
        provider_host.url,
        provider_host.user_keypair_path,
        files_pull_max_size=1000,
    )
    km = await _start(spec, nb, managers)
    files = _files(km)
    kc = await cells.connect(km)
    try:
        # The kernel rewrites data.csv past files_pull_max_size: held back, not pulled.
        ex = await cells.run(kc, "open('data.csv', 'w').write('r' * 5000)")
        assert ex.status == "ok", ex.reply
        assert await files.wait_for(lambda: "data.csv" in files.held_back, 10)
        # The user saves it here too; pulled by name, both copies are kept, and it is
        # no longer listed as waiting on the provider.
        (nb / "data.csv").write_text("local\n")
        transfer = await files.pull(["data.csv"], timeout=30)
        assert transfer.conflicts == [("data.csv", "data.remote-conflict.csv")]
        assert (nb / "data.remote-conflict.csv").read_text() == "r" * 5000
        assert (nb / "data.csv").read_text() == "local\n"
        assert "data.csv" not in files.held_back
        assert files.status()["held_back"] == []
    finally:
        kc.stop_channels()
