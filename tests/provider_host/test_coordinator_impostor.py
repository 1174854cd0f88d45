"""A peer that names the coordinator's public key but lacks its secret key is not trusted."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.server import ServerConnection, serve

from jupyter_io.identity import new_nonce
from jupyter_io.provider_link import Dial, End, Inventory, SignSettlement
from jupyter_io.signing import sign_welcome
from provider_host.coordinator_link import CoordinatorLink


class _Host:
    """The least a link needs of a host: nothing to publish, nothing hosted."""

    def __init__(self) -> None:
        self.pinned: list[Pubkey] = []

    def link_inventory(self) -> Inventory:
        return Inventory(name="t", region="", reachable_url=None, max_kernels=1, offers=())

    def hosted_leases(self) -> frozenset[str]:
        return frozenset()

    def load(self) -> float:
        return 0.0

    def coordinator_pinned(self, coordinator: Pubkey) -> None:
        self.pinned.append(coordinator)

    def dial(self, message: Dial) -> None:  # pragma: no cover - never reached
        raise AssertionError("an unproven coordinator must not make the host dial")

    def end_lease(self, message: End) -> None:  # pragma: no cover - never reached
        raise AssertionError("an unproven coordinator must not end leases")

    def settle(self, message: SignSettlement) -> None:  # pragma: no cover - never reached
        raise AssertionError("an unproven coordinator must not get settlements signed")


async def _coordinator(named: Pubkey, signer: Keypair | None, hellos: asyncio.Queue[Any]):
    """A link endpoint that names ``named`` and signs welcomes with ``signer``."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "challenge",
                    "version": 1,
                    "nonce": new_nonce().hex(),
                    "coordinator": str(named),
                }
            )
        )
        hello = json.loads(await ws.recv())
        await hellos.put(hello)
        welcome: dict[str, Any] = {
            "type": "welcome",
            "heartbeat_interval": 5.0,
            "coordinator": str(named),
        }
        if signer is not None:
            welcome["signature"] = sign_welcome(
                signer, Pubkey.from_string(hello["pubkey"]), bytes.fromhex(hello["nonce"])
            )
        await ws.send(json.dumps(welcome))
        await ws.wait_closed()

    return await serve(handler, "127.0.0.1", 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signer", ["impostor", "nobody"])
async def test_a_welcome_not_signed_by_the_named_coordinator_is_refused(signer: str) -> None:
    real = Keypair()
    hellos: asyncio.Queue[Any] = asyncio.Queue()
    server = await _coordinator(real.pubkey(), Keypair() if signer == "impostor" else None, hellos)
    port = server.sockets[0].getsockname()[1]
    host = _Host()
    link = CoordinatorLink(
        f"ws://127.0.0.1:{port}/api/v1/providers/connect",
        Keypair(),
        host,
        coordinator=real.pubkey(),
        backoff_max=0.2,
    )
    link.start()
    try:
        hello = await asyncio.wait_for(hellos.get(), 10)
        assert len(bytes.fromhex(hello["nonce"])) == 32
        await asyncio.wait_for(hellos.get(), 10)  # it refused and is trying again
        assert not link.linked.is_set() and link.links == 0 and host.pinned == []
        error = link.last_error or ""
        assert "not signed by coordinator" in error or "no valid coordinator signature" in error
    finally:
        await link.stop()
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(30)
async def test_a_welcome_signed_by_the_named_coordinator_links() -> None:
    real = Keypair()
    hellos: asyncio.Queue[Any] = asyncio.Queue()
    server = await _coordinator(real.pubkey(), real, hellos)
    port = server.sockets[0].getsockname()[1]
    host = _Host()
    link = CoordinatorLink(
        f"ws://127.0.0.1:{port}/api/v1/providers/connect",
        Keypair(),
        host,
        coordinator=real.pubkey(),
    )
    link.start()
    try:
        await asyncio.wait_for(link.wait_linked(), 10)
        assert host.pinned == [real.pubkey()]
    finally:
        await link.stop()
        server.close()
        await server.wait_closed()
