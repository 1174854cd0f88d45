"""Before HELLO is verified a connection costs the host a few KB: frame limit, deadline, caps.

The attack these tests replay: unauthenticated connections each sending one 64 MB frame
instead of HELLO used to take the host from 86 MB to 1.6 GB, and the memory stayed taken.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from solders.keypair import Keypair

from jupyter_io.protocol import SUBPROTOCOL, Channel
from provider_host.server import LISTENING_PREFIX

from ..raw_ws import RawConnection, flood, open_raw, rss_kib
from .conftest import TunnelClient, wait_until

pytestmark = pytest.mark.timeout(90)

ATTACKERS = 20
FRAME = 64 << 20
#: What the whole attack may add to the host's resident memory, at its peak and after.
BUDGET_KIB = 50 * 1024


async def _start_host_process(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_host",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line:
            raise AssertionError("the host exited before listening")
        if line.startswith(LISTENING_PREFIX):
            return proc, line[len(LISTENING_PREFIX) :].strip()


async def _attack(url: str, first_source: int) -> list[tuple[int, int | None]]:
    """ATTACKERS connections, each from its own loopback address, each sending one FRAME-byte
    frame instead of HELLO; returns (bytes sent, close code) per connection."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None

    async def one(i: int) -> tuple[int, int | None]:
        connection = await open_raw(
            parts.hostname or "",
            parts.port or 0,
            parts.path,
            source=f"127.0.0.{first_source + i}",
            subprotocol=SUBPROTOCOL,
        )
        try:
            assert connection.status == 101, connection.head
            sent = await flood(connection, FRAME)
            await connection.wait_closed()
            return sent, connection.close_code
        finally:
            await connection.close()

    return list(await asyncio.gather(*(one(i) for i in range(ATTACKERS))))


async def test_twenty_64mb_frames_instead_of_hello_cost_the_host_under_50mb_while_a_user_is_served(
    tmp_path: Path, client_keypair: Keypair, host_keypair_file: Path, jupyter_env: Path
):
    proc, url = await _start_host_process(
        "--listen",
        "127.0.0.1:0",
        "--allow",
        str(client_keypair.pubkey()),
        "--keypair",
        str(host_keypair_file),
        "--workspace",
        str(tmp_path / "ws"),
    )
    user = TunnelClient(url, client_keypair)
    try:
        warm = TunnelClient(url, client_keypair)  # the handshake's code paths, loaded once
        await warm.connect()
        await warm.disconnect()
        rss0, peak0 = rss_kib(proc.pid), rss_kib(proc.pid, "VmHWM")

        async def served(round_: int) -> None:
            if round_ == 0:  # HELLO, then a kernel, all while the attack runs
                await user.connect()
                await user.launch()
                await user.wait_ready()
            _, reply = await user.execute(f"{round_} + 1")
            assert reply is not None and reply["content"]["status"] == "ok"

        for round_ in range(3):
            results, _ = await asyncio.gather(_attack(url, 10 + round_ * ATTACKERS), served(round_))
            for sent, code in results:
                # Refused from the frame's header: 1009, long before 64 MB went through.
                assert code == 1009, (sent, code)
                assert sent < FRAME
            rss, peak = rss_kib(proc.pid), rss_kib(proc.pid, "VmHWM")
            assert rss - rss0 < BUDGET_KIB, f"round {round_}: RSS {rss0} -> {rss} KiB"
            assert peak - peak0 < BUDGET_KIB, f"round {round_}: peak {peak0} -> {peak} KiB"
        msg_id = await user.request(Channel.SHELL, "kernel_info_request", {})
        await user.message(Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id)
    finally:
        await user.disconnect()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_connection_that_sends_nothing_is_closed_at_the_handshake_deadline(make_host):
    host = await make_host(handshake_timeout=0.5)
    parts = urlsplit(host.url)
    silent = await open_raw(parts.hostname or "", parts.port or 0, "/", upgrade=False)
    try:  # not even the HTTP request: the TCP connection ends at the deadline
        assert await asyncio.wait_for(silent.reader.read(), 5) == b""
    finally:
        await silent.close()
    assert host.handshakes.waiting() == 0


async def _upgrade(host, source: str) -> RawConnection:
    parts = urlsplit(host.url)
    return await open_raw(
        parts.hostname or "", parts.port or 0, parts.path, source=source, subprotocol=SUBPROTOCOL
    )


async def test_connections_in_their_handshake_are_capped_per_address_and_in_all(
    make_host, client_keypair: Keypair
):
    host = await make_host(
        max_unauthenticated_per_address=2, max_unauthenticated=3, handshake_timeout=30
    )
    opened: list[RawConnection] = []
    clients: list[TunnelClient] = []
    try:
        # Authenticated connections do not count: two sessions from 127.0.0.1 first.
        for _ in range(2):
            clients.append(TunnelClient(host.url, client_keypair, local_addr=("127.0.0.1", 0)))
            await clients[-1].connect()
        for _ in range(2):
            opened.append(await _upgrade(host, "127.0.0.1"))
            assert opened[-1].status == 101
        third = await _upgrade(host, "127.0.0.1")
        opened.append(third)
        assert third.status == 503
        assert "127.0.0.1" in third.body.decode() and "try again" in third.body.decode()

        other = await _upgrade(host, "127.0.0.2")
        opened.append(other)
        assert other.status == 101  # its own address has room, and 3 in all are allowed
        full = await _upgrade(host, "127.0.0.3")
        opened.append(full)
        assert full.status == 503 and "3 tunnel connections" in full.body.decode()

        await opened[0].close()  # one of 127.0.0.1's leaves: a place is free again
        await wait_until(lambda: host.handshakes.waiting() == 2, what="the slot to be released")
        again = await _upgrade(host, "127.0.0.3")
        opened.append(again)
        assert again.status == 101
    finally:
        for client in clients:
            await client.disconnect()
        for connection in opened:
            await connection.close()
