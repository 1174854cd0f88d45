"""The local facade: kernel-shaped sockets on 127.0.0.1 that route by identity."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from jupyter_io.errors import ConfigError
from jupyter_io.protocol import Channel
from kernel_provisioner.facade import CHANNEL_PORT_NAMES, Facade


@pytest.fixture
async def facade() -> AsyncIterator[Facade]:
    f = Facade()
    f.bind()
    yield f
    f.close()


@pytest.fixture
def ctx() -> Iterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


async def test_connection_info_names_five_local_ports(facade: Facade) -> None:
    info = facade.connection_info(b"secret", "io-remote-x")
    assert info["transport"] == "tcp"
    assert info["ip"] == "127.0.0.1"
    assert info["key"] == b"secret"
    assert info["signature_scheme"] == "hmac-sha256"
    assert info["kernel_name"] == "io-remote-x"
    ports = [info[name] for name in CHANNEL_PORT_NAMES.values()]
    assert len(set(ports)) == 5 and all(ports)
    for port in ports:  # bound on loopback: taken there
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", port))
    assert set(facade.outbound) == {Channel.SHELL, Channel.CONTROL, Channel.STDIN, Channel.HB}
    assert set(facade.inbound) == set(Channel)


async def test_router_keeps_each_clients_identity(facade: Facade, ctx: zmq.asyncio.Context) -> None:
    port = facade.ports[Channel.SHELL]
    clients = {}
    for name in (b"client-a", b"client-b"):
        s = ctx.socket(zmq.DEALER)
        s.identity = name
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        clients[name] = s
    shell = facade.sockets[Channel.SHELL]
    for name, s in clients.items():
        await s.send_multipart([b"<IDS|MSG>", b"sig", b"from " + name])
    got = [await asyncio.wait_for(shell.recv_multipart(), 10) for _ in clients]
    assert sorted(got) == sorted(
        [[name, b"<IDS|MSG>", b"sig", b"from " + name] for name in clients]
    )
    # Replies go back by their first frame, to that client only.
    await shell.send_multipart([b"client-b", b"<IDS|MSG>", b"for b"])
    await shell.send_multipart([b"client-a", b"<IDS|MSG>", b"for a"])
    assert await asyncio.wait_for(clients[b"client-a"].recv_multipart(), 10) == [
        b"<IDS|MSG>",
        b"for a",
    ]
    assert await asyncio.wait_for(clients[b"client-b"].recv_multipart(), 10) == [
        b"<IDS|MSG>",
        b"for b",
    ]


async def test_iopub_reaches_subscribers(facade: Facade, ctx: zmq.asyncio.Context) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.subscribe(b"")
    sub.connect(f"tcp://127.0.0.1:{facade.ports[Channel.IOPUB]}")
    iopub = facade.sockets[Channel.IOPUB]
    # PUB/SUB has no handshake to await: publish until the subscription has landed.
    for _ in range(200):
        await iopub.send_multipart([b"kernel.status", b"<IDS|MSG>", b"x"])
        if await sub.poll(50):
            break
    assert await sub.recv_multipart() == [b"kernel.status", b"<IDS|MSG>", b"x"]


async def test_new_subscribers_get_a_signed_iopub_welcome(
    facade: Facade, ctx: zmq.asyncio.Context
) -> None:
    facade.connection_info(b"secret", "io-remote-x")
    session = Session(key=b"secret", signature_scheme="hmac-sha256")
    for topic in (b"", b"kernel."):
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(topic)
        sub.connect(f"tcp://127.0.0.1:{facade.ports[Channel.IOPUB]}")
        frames = await asyncio.wait_for(sub.recv_multipart(), 10)
        idents, parts = session.feed_identities(frames)
        assert idents == ([topic] if topic else [])
        msg = session.deserialize(parts)  # checks the HMAC signature
        assert msg["header"]["msg_type"] == "iopub_welcome"
        assert msg["content"] == {"subscription": topic.decode()}
        sub.close()


async def test_rebind_on_the_same_ports_and_refuse_taken_ones() -> None:
    first = Facade()
    ports = first.bind()
    first.close()
    again = Facade()
    try:
        assert again.bind(ports) == ports
        clash = Facade()
        with pytest.raises(ConfigError, match="another process holds it"):
            clash.bind({Channel.SHELL: ports[Channel.SHELL]})
        assert not clash.bound
    finally:
        again.close()
