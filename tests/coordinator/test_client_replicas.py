"""The coordinator client given the replicas' URLs (two real coordinators on one database):
a request that cannot have reached a coordinator goes to the next URL and the client stays
there; a POST whose connection broke after it went out is never sent to another replica (it
may have been applied), while a GET is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator_client import CoordinatorClient, CoordinatorError

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def hang_up() -> AsyncIterator[tuple[str, list[str]]]:
    """An ``http://`` URL whose server reads each request and cuts the connection without
    answering (a replica killed with the request in hand), and the request lines it read."""
    lines: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            if line.endswith("HTTP/1.1"):
                lines.append(line)
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", lines
    finally:
        server.close()
        await server.wait_closed()


async def _provider_at(url: str, providers: list[FakeProvider]) -> FakeProvider:
    provider = FakeProvider(url, [gpu_offer("RTX 4090")])
    providers.append(provider)
    await provider.connect()
    return provider


async def test_a_request_a_replica_refuses_goes_to_the_next_and_stays_there(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    first = await start_coordinator()
    second = await start_coordinator()  # the same database and key
    provider = await _provider_at(second.url, providers)
    client = CoordinatorClient(f"{first.url}, {second.url}", Keypair(), timeout=WAIT)
    try:
        assert (await client.info())["coordinator"]
        assert client.url == first.url
        await first.shutdown()  # its port is closed: connections are refused

        grant = await client.request_lease("RTX 4090")
        assert grant.provider == provider.pubkey
        assert client.url == second.url
        # Applied once: the lease the refused replica never saw, and no other.
        assert [lease.lease for lease in await client.list_leases()] == [grant.lease]
        assert client.url == second.url
    finally:
        client.close()


async def test_a_post_cut_after_it_was_sent_is_not_sent_again_but_a_get_is(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    replica = await start_coordinator()
    await _provider_at(replica.url, providers)
    async with hang_up() as (cut, seen):
        client = CoordinatorClient([cut, replica.url], Keypair(), timeout=WAIT)
        try:
            with pytest.raises(CoordinatorError, match="it may have acted on it"):
                await client.request_lease("RTX 4090")
            assert seen == ["POST /api/v1/leases HTTP/1.1"]
            assert client.url == cut  # nothing moved: the POST went nowhere else

            # A GET may be repeated: it goes on to the replica, which never saw the POST.
            assert await client.list_leases() == []
            assert seen[-1].startswith("GET /api/v1/leases?limit=20 ")
            assert client.url == replica.url
        finally:
            client.close()
