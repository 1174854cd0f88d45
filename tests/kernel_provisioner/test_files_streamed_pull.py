"""A large file the kernel wrote comes back streamed (issue 15): the provider reads it once,
hashing each chunk as it sends it, and seals its content hash after the last chunk; the
notebook's side places it once the seal checks out. A real provider host, real ipykernel,
the provisioner's file channel over the real tunnel."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_io.files import STREAM_MIN, Incoming, Seal
from kernel_provisioner.provisioner import RemoteKernelProvisioner

MiB = 1024 * 1024


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


async def test_a_large_pull_is_streamed_and_placed_whole(
    kernelspecs: Any,
    provider_host: Any,
    cells: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seals: list[tuple[tuple[bool, ...], Seal]] = []  # (the offer's stream flags, its seal)
    sealing = Incoming.seal

    def seal(self: Incoming, message: Seal) -> list[str]:
        seals.append((tuple(e.stream for e in self.offer.files), message))
        return sealing(self, message)

    monkeypatch.setattr(Incoming, "seal", seal)
    nb = tmp_path / "notebook"
    nb.mkdir()
    spec = kernelspecs.install(
        "io-remote-stream-pulls",
        provider_host.url,
        provider_host.user_keypair_path,
        files_pull_max_size=1000,
    )
    km = AsyncKernelManager(kernel_name=spec)
    await km.start_kernel(cwd=str(nb))
    try:
        provisioner = km.provisioner
        assert isinstance(provisioner, RemoteKernelProvisioner)
        files = provisioner.files
        assert files is not None and files.enabled and files.endpoint is not None
        size = STREAM_MIN + 3 * MiB + 4321  # over the streaming threshold, a short last chunk
        kc = await cells.connect(km)
        try:
            ex = await cells.run(
                kc,
                "import hashlib, os\n"
                "with open('model.pt', 'wb') as f:\n"
                f"    for _ in range({size // MiB}): f.write(os.urandom({MiB}))\n"
                f"    f.write(os.urandom({size % MiB}))\n"
                "print(hashlib.sha256(open('model.pt', 'rb').read()).hexdigest())",
            )
            assert ex.status == "ok", ex.reply
            written = ex.stream().strip()
            assert await files.wait_for(lambda: "model.pt" in files.held_back, 30)
            transfer = await files.pull(["model.pt"], timeout=60)
        finally:
            kc.stop_channels()
        assert transfer.written == ["model.pt"] and not transfer.refused
        assert _sha256(nb / "model.pt") == written
        # It came streamed: offered under a key, its hash sealed after its chunks.
        [(flags, sealed)] = [(f, s) for f, s in seals if s.id == transfer.id]
        assert flags == (True,) and len(sealed.sealed) == 1 and sealed.sealed[0][1] is not None
        assert "model.pt" not in files.held_back
    finally:
        await km.shutdown_kernel(now=True)
