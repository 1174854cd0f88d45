"""The handshake: CHALLENGE/HELLO/WELCOME, and every refusal with its ERROR code and close code."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from solders.keypair import Keypair
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from jupyter_io.protocol import SUBPROTOCOL, FrameKind, decode_frame

from .conftest import Refused

pytestmark = pytest.mark.timeout(60)


def assert_nothing_created(host, workspace_root: Path) -> None:
    assert host.sessions == {}
    # Only the warm kernel waiting for the next lease has a workspace, and it is not taken.
    spare = set() if host.warm is None else host.warm.spare_workspaces()
    assert not workspace_root.exists() or set(workspace_root.iterdir()) <= spare
    assert host.warm is None or host.warm.stats.taken == 0


async def test_challenge_names_the_host_and_a_fresh_nonce(host):
    nonces = set()
    for _ in range(2):
        async with connect(host.url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
            assert ws.subprotocol == SUBPROTOCOL
            frame = decode_frame(await asyncio.wait_for(ws.recv(), 10))
            assert frame.kind is FrameKind.CHALLENGE
            body = frame.body
            assert body["version"] == 1
            assert body["host"] == str(host.host_keypair.pubkey())
            assert len(bytes.fromhex(body["nonce"])) == 32
            nonces.add(body["nonce"])
    assert len(nonces) == 2


async def test_welcome_opens_a_session_with_its_own_workspace(host, client, workspace_root):
    welcome = await client.connect()
    assert set(welcome) == {"session", "received", "resumed", "kernel", "features"}
    assert welcome["features"] == ["files"]  # this host speaks the file channel
    assert welcome["received"] == 0
    assert welcome["resumed"] is False
    assert welcome["kernel"] == {"state": "none", "generation": 0, "exit_code": None}
    session = host.sessions[welcome["session"]]
    assert session.owner == client.keypair.pubkey()
    assert session.workspace.parent == workspace_root.resolve()
    assert session.workspace.is_dir()
    assert session.workspace.stat().st_mode & 0o777 == 0o700
    # The IPC sockets live in a short private directory, not under the (long) workspace path.
    assert session.runtime_dir is not None
    assert len(str(session.runtime_dir)) < 80
    assert session.runtime_dir.stat().st_mode & 0o777 == 0o700


async def test_key_not_on_the_allow_list_is_refused_before_anything_exists(
    host, make_client, workspace_root
):
    stranger = make_client(host, Keypair())
    with pytest.raises(Refused) as info:
        await stranger.connect()
    assert info.value.error["code"] == "auth"
    assert "allow-list" in info.value.error["reason"]
    assert info.value.code == 1008
    assert_nothing_created(host, workspace_root)


async def test_bad_signature_is_refused_before_anything_exists(host, client, workspace_root):
    with pytest.raises(Refused) as info:
        await client.connect(signer=Keypair())  # right pubkey, signed by someone else
    assert info.value.error["code"] == "auth"
    assert info.value.code == 1008
    assert_nothing_created(host, workspace_root)


async def test_wrong_version_is_refused_first(host, client, workspace_root):
    with pytest.raises(Refused) as info:
        # Also a bad signature: the version check comes first, per the contract.
        await client.connect(hello={"version": 2}, signer=Keypair())
    assert info.value.error["code"] == "version_mismatch"
    assert info.value.code == 4005
    assert_nothing_created(host, workspace_root)


async def test_unknown_session_is_refused(host, client, workspace_root):
    client.session_id = "no-such-session"
    with pytest.raises(Refused) as info:
        await client.connect(resume=True)
    assert info.value.error["code"] == "unknown_session"
    assert info.value.code == 4004
    assert_nothing_created(host, workspace_root)


async def test_session_of_another_key_is_refused(make_host, make_client, client_keypair):
    other = Keypair()
    host = await make_host(allow=[str(client_keypair.pubkey()), str(other.pubkey())])
    owner = make_client(host)
    await owner.connect()
    thief = make_client(host, other)
    thief.session_id = owner.session_id
    with pytest.raises(Refused) as info:
        await thief.connect(resume=True)
    assert info.value.error["code"] == "auth"
    assert info.value.code == 1008
    assert owner.session_id in host.sessions
    assert owner.ws is not None and owner.ws.close_code is None


async def test_capacity_is_refused_with_1013(make_host, make_client):
    host = await make_host(max_sessions=1)
    first = make_client(host)
    await first.connect()
    second = make_client(host)
    with pytest.raises(Refused) as info:
        await second.connect()
    assert info.value.error["code"] == "capacity"
    assert info.value.code == 1013
    assert list(host.sessions) == [first.session_id]


async def test_malformed_hello_closes_with_1002(host, workspace_root):
    async with connect(host.url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
        await ws.recv()
        await ws.send(b"\x02\x00\x00")  # a truncated HELLO header
        await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 1002
    assert "truncated" in ws.close_reason
    assert_nothing_created(host, workspace_root)


async def test_only_the_tunnel_path_and_subprotocol_are_served(host):
    base = host.url.rsplit("/", 1)[0]
    with pytest.raises(InvalidStatus) as info:
        await connect(f"{base}/other", subprotocols=[SUBPROTOCOL])
    assert info.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as info:
        await connect(host.url)  # no subprotocol offered
    assert info.value.response.status_code == 400


async def test_tls_serves_wss(make_host, make_client, certificate):
    cert, key = certificate
    host = await make_host(certfile=str(cert), keyfile=str(key))
    assert host.url.startswith("wss://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    client = make_client(host, ssl=trust)
    welcome = await client.connect()
    assert welcome["session"] in host.sessions


async def test_silent_client_is_dropped_after_the_handshake_timeout(make_host, workspace_root):
    host = await make_host(handshake_timeout=0.2)
    async with connect(host.url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
        await ws.recv()  # CHALLENGE, then say nothing
        await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 1008
    assert "HELLO" in ws.close_reason
    assert_nothing_created(host, workspace_root)
