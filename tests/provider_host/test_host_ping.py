"""The latency ping on a real provider host's tunnel endpoint (jupyter_io.ping): the nonce
back in fewer bytes than were sent, nothing for a short ping, a rate limit per address, and
the same caps on strangers as every tunnel connection."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import pytest

from jupyter_io.latency import PingFailed, ping
from jupyter_io.ping import PING_MAX_REPLY, build_ping_request, ping_target
from provider_host.server import ProviderServer

from .conftest import HostFactory, wait_until

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


async def _exchange(host: ProviderServer, request: bytes) -> bytes:
    """Send ``request`` on a fresh TCP connection; everything the host sends back, to EOF."""
    parts = urlsplit(host.url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_a_ping_gets_its_nonce_back_in_fewer_bytes_than_it_sent(host: ProviderServer) -> None:
    nonce = os.urandom(16)
    request = build_ping_request(ping_target(host.url), nonce)
    reply = await _exchange(host, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == nonce.hex().encode()
    assert len(reply) <= PING_MAX_REPLY < len(request)
    rtt = await ping(host.url, timeout=WAIT)
    assert 0 < rtt < 1000
    # The connection's place among strangers is given back once it is answered.
    await wait_until(lambda: host.handshakes.waiting() == 0, WAIT, "the ping's slot back")


async def test_a_short_or_malformed_ping_is_cut_without_a_word(host: ProviderServer) -> None:
    nonce = os.urandom(16).hex()
    bare = f"GET /tunnel/ping?n={nonce} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    assert await _exchange(host, bare) == b""  # a reply could be bigger than this request
    padded = build_ping_request(ping_target(host.url), bytes(16))
    malformed = padded.replace(bytes(16).hex().encode(), b"z" * 32)
    assert await _exchange(host, malformed) == b""


async def test_pings_over_the_rate_limit_get_no_answer(make_host: HostFactory) -> None:
    host = await make_host(ping_rate=0.5)  # bursts of 10, then one every 2 s
    answered = 0
    for _ in range(12):
        try:
            await ping(host.url, timeout=WAIT)
            answered += 1
        except PingFailed:
            break
    assert answered == 10
    assert host.pings is not None and host.pings.refused == 1
    none = await make_host(ping_rate=0)
    with pytest.raises(PingFailed):
        await ping(none.url, timeout=WAIT)


async def test_pings_do_not_get_around_the_caps_on_strangers(make_host: HostFactory) -> None:
    host = await make_host(max_unauthenticated_per_address=2)
    parts = urlsplit(host.url)
    assert parts.hostname is not None and parts.port is not None
    held = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(2)]
    await wait_until(lambda: host.handshakes.waiting() == 2, WAIT, "two strangers waiting")
    # Past the per-address cap a ping is dropped like any stranger: no answer at all (not
    # even the 503 a tunnel connection gets, which could outweigh a ping).
    with pytest.raises(PingFailed):
        await ping(host.url, timeout=WAIT)
    for _, writer in held:
        writer.close()
    await wait_until(lambda: host.handshakes.waiting() == 0, WAIT, "the strangers gone")
    assert await ping(host.url, timeout=WAIT) > 0
