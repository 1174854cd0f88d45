"""Direct providers configured on the extension: one kernelspec each, in the io-remote
provisioner's direct mode (no coordinator, no lease), and a kernel started on one runs."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from traitlets import TraitError

from jupyter_io.identity import load_keypair, write_keypair
from jupyter_io.serverext.app import JupyterIOExtension
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer


@pytest.fixture
async def direct_host(tmp_path: Path, user_keypair_path: Path) -> AsyncIterator[ProviderServer]:
    """A provider host of its own (no coordinator) that admits the user's key."""
    host = ProviderServer(
        ProviderConfig(
            listen="127.0.0.1:0",
            keypair_path=str(write_keypair(Keypair(), tmp_path / "direct-host.json")),
            workspace_root=str(tmp_path / "direct-workspaces"),
            allow=[str(load_keypair(user_keypair_path).pubkey())],
            simulate_gpu=["RTX 3090:24"],
            benchmark=False,
        ),
        stdout=io.StringIO(),
    )
    await host.startup()
    try:
        yield host
    finally:
        await host.shutdown()


@pytest.fixture
def io_config(direct_host: ProviderServer, user_keypair_path: Path) -> dict[str, Any]:
    # No coordinator at all: direct providers need none.
    return {
        "coordinator_url": "",
        "keypair_path": str(user_keypair_path),
        "direct_providers": [
            {"name": "GPU Box", "url": direct_host.url,
             "pubkey": str(direct_host.host_keypair.pubkey())},
            {"name": "lab-pc", "url": "ws://127.0.0.1:9/tunnel", "display_name": "Lab PC"},
        ],
    }  # fmt: skip


async def test_each_direct_provider_is_a_kernelspec_in_direct_mode(
    fetch_json: Any, direct_host: ProviderServer, user_keypair_path: Path
) -> None:
    status, body = await fetch_json("api", "kernelspecs")
    assert status == 200
    box = body["kernelspecs"]["jupyter-io-direct-gpu-box"]["spec"]
    assert box["display_name"] == "Python 3 · GPU Box · direct"
    assert box["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "io-remote",
        "config": {
            "provider_url": direct_host.url,
            "keypair_path": str(user_keypair_path),
            "provider_pubkey": str(direct_host.host_keypair.pubkey()),
        },
    }
    assert box["metadata"]["jupyter_io"]["direct"] is True
    pc = body["kernelspecs"]["jupyter-io-direct-lab-pc"]["spec"]
    assert pc["display_name"] == "Lab PC"
    assert "provider_pubkey" not in pc["metadata"]["kernel_provisioner"]["config"]
    # Not GPU types: the picker's offers know nothing of them (and no coordinator here).
    status, _ = await fetch_json("jupyter-io", "offers")
    assert status == 503


async def test_a_kernel_on_a_direct_provider_runs_a_cell(
    fetch_json: Any, jp_serverapp: Any, direct_host: ProviderServer
) -> None:
    status, kernel = await fetch_json(
        "api", "kernels", method="POST", body={"name": "jupyter-io-direct-gpu-box"}
    )
    assert status == 201, kernel
    km = jp_serverapp.kernel_manager.get_kernel(kernel["id"])
    await asyncio.wait_for(km.ready, 60)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        outputs: list[str] = []
        reply = await kc.execute_interactive(
            "print(6 * 7)",
            timeout=60,
            output_hook=lambda msg: outputs.append(msg["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok" and "42" in "".join(outputs)
    finally:
        kc.stop_channels()
    _, body = await fetch_json("jupyter-io", "sessions")
    (session,) = body["sessions"]
    assert session["provider_url"] == direct_host.url
    assert session["lease"] is None and session["escrow_lamports"] is None
    await fetch_json("api", "kernels", kernel["id"], method="DELETE")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"url": "ws://h:1/tunnel"}, 'needs a "name"'),
        ({"name": "x", "url": "http://h:1/"}, "ws:// or wss://"),
        ({"name": "x", "url": "ws://h:1/tunnel", "gpu": "A100"}, "unknown key(s) gpu"),
        ("ws://h:1/tunnel", "expected a dict"),
    ],
)
def test_a_bad_direct_provider_is_refused_naming_what_to_fix(entry: Any, says: str) -> None:
    with pytest.raises(TraitError, match="direct_providers") as info:
        JupyterIOExtension(direct_providers=[entry])
    assert says in str(info.value)


def test_two_direct_providers_with_one_name_are_refused() -> None:
    twice = [{"name": "box", "url": "ws://a:1/t"}, {"name": "Box", "url": "ws://b:1/t"}]
    with pytest.raises(TraitError, match="two providers named jupyter-io-direct-box"):
        JupyterIOExtension(direct_providers=twice)
