"""TunnelClient against a real provider host: the handshake's refusals, the session's end,
and what counts as 'the host is down'."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from solders.keypair import Keypair
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidMessage

from jupyter_io.errors import AuthError, ProtocolError, TunnelError
from jupyter_io.identity import load_keypair
from jupyter_io.protocol import FrameKind, decode_frame, encode_control
from kernel_provisioner.connection import TunnelClient, _is_refusal
from kernel_provisioner.facade import Facade


@pytest.fixture
async def make_client(provider_host: Any) -> AsyncIterator[Callable[..., TunnelClient]]:
    made: list[tuple[TunnelClient, Facade]] = []

    def make(keypair: Keypair | None = None, **kwargs: Any) -> TunnelClient:
        facade = Facade()
        facade.bind()
        client = TunnelClient(
            provider_host.url,
            keypair or load_keypair(provider_host.user_keypair_path),
            outbound=facade.outbound,
            inbound=facade.inbound,
            **kwargs,
        )
        made.append((client, facade))
        return client

    yield make
    for client, facade in made:
        await client.close()
        facade.close()


async def test_a_key_off_the_allow_list_is_refused(make_client: Any) -> None:
    stranger = Keypair()
    with pytest.raises(AuthError, match=f"refused key {stranger.pubkey()}"):
        await make_client(stranger).open()


async def test_a_pinned_host_key_must_match(make_client: Any) -> None:
    with pytest.raises(AuthError, match="not the expected"):
        await make_client(host_pubkey=Keypair().pubkey()).open()


async def test_resuming_an_unknown_session_is_refused(make_client: Any) -> None:
    with pytest.raises(TunnelError, match="no longer has this session"):
        await make_client().open(resume="no-such-session")


async def test_end_is_confirmed_and_the_session_is_gone(make_client: Any) -> None:
    client = make_client()
    welcome = await client.open()
    assert welcome["resumed"] is False and client.session_id == welcome["session"]
    assert client.connected and client.alive and client.exit_code is None
    assert await client.end(timeout=10)
    assert client.ended and not client.alive
    with pytest.raises(TunnelError, match="no longer has this session"):
        await make_client().open(resume=client.session_id)


async def test_a_new_sessions_launch_goes_out_behind_hello_without_waiting_for_welcome(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Observed on the real websocket (the calls go through): which frames the client sent
    # before the host's WELCOME reached it. One round trip less per kernel start.
    events: list[str] = []
    real_send = ClientConnection.send
    real_recv = TunnelClient._recv_handshake

    async def send(ws: ClientConnection, message: Any, *args: Any) -> None:
        if isinstance(message, bytes):
            events.append(f"sent {decode_frame(message).kind.name}")
        await real_send(ws, message, *args)

    async def recv(client: TunnelClient, ws: ClientConnection, kind: FrameKind) -> Any:
        body = await real_recv(client, ws, kind)
        events.append(f"received {kind.name}")
        return body

    monkeypatch.setattr(ClientConnection, "send", send)
    monkeypatch.setattr(TunnelClient, "_recv_handshake", recv)
    client = make_client()
    await client.open(launch=("k" * 32, {}))
    assert events[:4] == ["received CHALLENGE", "sent HELLO", "sent LAUNCH", "received WELCOME"]
    started = await client.launch("k" * 32, {}, timeout=30)  # only waits: sent already
    # The replay after WELCOME repeated the LAUNCH (nothing was acknowledged yet); the host
    # dropped it as a duplicate instead of restarting the kernel.
    assert events.count("sent LAUNCH") == 2
    assert started.generation == 1 and client.kernel.generation == 1
    assert await client.end(timeout=10)


def test_only_refused_connections_count_as_a_dead_host() -> None:
    assert _is_refusal(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    both = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 9)"
    )
    assert _is_refusal(both)
    mixed = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 9), "
        "[Errno 101] Network is unreachable"
    )
    assert not _is_refusal(mixed)
    # A connection accepted and dropped during the handshake is a broken path, not a dead host.
    assert not _is_refusal(InvalidMessage("did not receive a valid HTTP response"))
    assert not _is_refusal(TimeoutError())


@pytest.mark.parametrize(
    ("kind", "body"),
    [(FrameKind.STARTED, {"generation": "x"}), (FrameKind.EXITED, {"generation": []}),
     (FrameKind.STARTED, {"generation": True}), (FrameKind.STARTED, {"generation": 1, "pid": "1"}),
     (FrameKind.EXITED, {"generation": 1, "exit_code": [0]})],
)  # fmt: skip
async def test_a_kernel_report_of_the_wrong_types_is_a_protocol_error(
    kind: FrameKind, body: dict[str, Any]
) -> None:
    # A hostile provider's STARTED/EXITED must close the tunnel as a protocol error (the
    # Bridge's handling), not raise TypeError/ValueError into it or reach poll() as a string.
    facade = Facade()
    facade.bind()
    client = TunnelClient(
        "ws://127.0.0.1:9/tunnel", Keypair(), outbound=facade.outbound, inbound=facade.inbound
    )
    try:
        with pytest.raises(ProtocolError, match="the contract says an integer"):
            client._on_control(decode_frame(encode_control(kind, body, seq=1)))
        started = encode_control(FrameKind.STARTED, {"generation": 2, "pid": 7}, seq=2)
        client._on_control(decode_frame(started))
        assert (client.kernel.generation, client.kernel.pid) == (2, 7)
    finally:
        await client.close()
        facade.close()


async def test_why_the_provider_stopped_a_kernel_reaches_the_users_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The host kills a kernel past its memory cgroup or workspace limit and says why in
    # EXITED's reason; the user's side must not reduce that to an exit code.
    facade = Facade()
    facade.bind()
    client = TunnelClient(
        "ws://127.0.0.1:9/tunnel", Keypair(), outbound=facade.outbound, inbound=facade.inbound
    )
    try:
        started = encode_control(FrameKind.STARTED, {"generation": 1}, seq=1)
        client._on_control(decode_frame(started))
        reason = "out of memory: the session's limit is 200 MiB"
        exited = {"generation": 1, "exit_code": -9, "reason": reason}
        with caplog.at_level(logging.WARNING):
            client._on_control(decode_frame(encode_control(FrameKind.EXITED, exited, seq=2)))
        assert client.kernel.exit_code == -9
        assert any(reason in record.getMessage() for record in caplog.records)
    finally:
        await client.close()
        facade.close()
