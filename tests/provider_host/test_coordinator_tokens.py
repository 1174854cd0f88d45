"""Lease tokens in the tunnel HELLO, against a real coordinator on loopback: a lease by type
reaches the right provider and runs a kernel; every bad token is refused before anything
exists; one lease serves one session; one user cannot reach another's kernel; session events
and signed usage reports land in the coordinator's store."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.leases import LeaseClaims, issue_token
from jupyter_io.protocol import FrameKind
from provider_host.server import ProviderServer

from .conftest import DEFAULT_TIMEOUT, HostFactory, Refused, TunnelClient, UserFactory

pytestmark = pytest.mark.timeout(90)


def pubkey(host: ProviderServer) -> str:
    assert host.host_keypair is not None
    return str(host.host_keypair.pubkey())


def claims_of(token: str) -> LeaseClaims:
    text = token.split(".")[0]
    return LeaseClaims.from_json(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def workspaces(root: Path, *hosts: ProviderServer) -> list[Path]:
    """The session workspaces under ``root`` (not those of ``hosts``' spare warm kernels)."""
    spare = {path for host in hosts if host.warm for path in host.warm.spare_workspaces()}
    return [path for path in root.iterdir() if path not in spare] if root.exists() else []


async def refused(client: TunnelClient, *, resume: bool = False) -> Refused:
    with pytest.raises(Refused) as info:
        await client.connect(resume=resume)
    return info.value


async def test_a_lease_by_type_runs_a_kernel_on_the_right_provider_and_is_metered(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    rtx = await market_host(simulate_gpu=["RTX 4090:24"], direct=True)
    a100 = await market_host(simulate_gpu=["A100:80"], direct=True)
    registry, store = coordinator.registry, coordinator.store
    assert registry is not None and store is not None
    user = make_user()
    grant = await user.request_lease("A100")
    assert grant.provider == pubkey(a100) and not grant.relay
    assert grant.tunnel_url == a100.config.public_url
    assert grant.gpu_indices == (0,)

    client = TunnelClient(grant.tunnel_url, user.keypair, token=grant.token)
    try:
        welcome = await client.connect()
        session = a100.sessions[welcome["session"]]
        assert session.lease_id == grant.lease and rtx.sessions == {}
        assert session.gpus == ()  # a simulated GPU is no device: the kernel sees none
        await client.launch()
        await client.wait_ready()
        msg_id, reply = await client.execute("1+1")
        assert reply is not None and reply["content"]["status"] == "ok"
        results = [m for m in await client.outputs(msg_id) if m["msg_type"] == "execute_result"]
        assert results[0]["content"]["data"]["text/plain"] == "2"
        assert await client.evaluate("__import__('os').environ['CUDA_VISIBLE_DEVICES']") == ""

        def active() -> bool:
            state = registry.provider(pubkey(a100))
            tracked = state.leases.get(grant.lease) if state is not None else None
            return tracked is not None and tracked.state is LeaseState.ACTIVE

        await registry.wait_for(active, DEFAULT_TIMEOUT)
        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ACTIVE and lease.active_at

        # More than a second of service, then the client ends the session.
        _, reply = await client.execute("import time; time.sleep(1.2)")
        assert reply is not None and reply["content"]["status"] == "ok"
        await client.send_control(FrameKind.END)
        await asyncio.wait_for(session.ended.wait(), DEFAULT_TIMEOUT)

        def over() -> bool:
            state = registry.provider(pubkey(a100))
            return state is not None and grant.lease not in state.leases

        await registry.wait_for(over, DEFAULT_TIMEOUT)
        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ENDED
        assert await store.usage_for_lease(grant.lease) >= 1
        assert registry.stats.usage_refused == 0
    finally:
        await client.disconnect()


async def test_bad_tokens_are_refused_before_anything_exists(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    make_user: UserFactory,
    workspace_root: Path,
) -> None:
    host = await market_host(simulate_gpu=["RTX 4090:24", "RTX 4090:24"], direct=True)
    other_host = await market_host(simulate_gpu=["A100:80"], direct=True)
    user = make_user()
    grant = await user.request_lease("RTX 4090")
    other_grant = await user.request_lease("A100")
    url = grant.tunnel_url
    claims = claims_of(grant.token)
    assert coordinator.keypair is not None
    mallory = Keypair()
    now = time.time()
    cases = {
        "no token": (None, "send the lease token"),
        "forged": (
            issue_token(mallory, dataclasses.replace(claims, coordinator=mallory.pubkey())),
            "trusts coordinator",
        ),
        "altered": (
            grant.token[:-4] + ("1111" if not grant.token.endswith("1111") else "2222"),
            "forged or altered",
        ),
        "expired": (
            issue_token(
                coordinator.keypair,
                dataclasses.replace(claims, issued_at=now - 120, expires_at=now - 60),
            ),
            "expired",
        ),
        "another provider's": (other_grant.token, "is for provider"),
        "not JSON": ("bm90IGpzb24.3xyz", "malformed"),
    }
    for name, (token, message) in cases.items():
        refusal = await refused(TunnelClient(url, user.keypair, token=token))
        assert refusal.error is not None, name
        assert (refusal.error["code"], refusal.code) == ("auth", 1008), name
        assert message in refusal.error["reason"], (name, refusal.error["reason"])
    # Someone else presenting the user's real token.
    thief = Keypair()
    refusal = await refused(TunnelClient(url, thief, token=grant.token))
    assert refusal.error is not None and refusal.error["code"] == "auth"
    assert "issued to user" in refusal.error["reason"]
    assert host.sessions == {} and other_host.sessions == {}
    assert workspaces(workspace_root, host, other_host) == []


async def test_a_lease_serves_one_session_and_users_cannot_reach_each_others_kernels(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    make_user: UserFactory,
    workspace_root: Path,
) -> None:
    host = await market_host(simulate_gpu=["RTX 4090:24", "RTX 4090:24"], direct=True)
    alice, bob = make_user(), make_user()
    a_grant = await alice.request_lease("RTX 4090")
    b_grant = await bob.request_lease("RTX 4090")
    assert a_grant.gpu_indices != b_grant.gpu_indices
    b_client = TunnelClient(b_grant.tunnel_url, bob.keypair, token=b_grant.token)
    a_client = TunnelClient(a_grant.tunnel_url, alice.keypair, token=a_grant.token)
    try:
        b_session = (await b_client.connect())["session"]
        await a_client.connect()
        assert len(host.sessions) == 2

        # The token again, for a second session: a replay.
        replay = await refused(TunnelClient(b_grant.tunnel_url, bob.keypair, token=b_grant.token))
        assert replay.error is not None and replay.error["code"] == "lease_in_use"
        assert replay.code == 1008

        # Alice with Bob's token: the token is Bob's.
        stolen = await refused(TunnelClient(b_grant.tunnel_url, alice.keypair, token=b_grant.token))
        assert stolen.error is not None and stolen.error["code"] == "auth"

        # Alice resuming Bob's session, with her own valid token: the session is Bob's.
        intruder = TunnelClient(a_grant.tunnel_url, alice.keypair, token=a_grant.token)
        intruder.session_id = b_session
        attach = await refused(intruder, resume=True)
        assert attach.error is not None and attach.error["code"] == "auth"
        assert "another key" in attach.error["reason"]

        # Bob resuming his own session with Alice's lease: a token must match its session.
        bob_with_alices = TunnelClient(b_grant.tunnel_url, bob.keypair, token=a_grant.token)
        bob_with_alices.session_id = b_session
        mixed = await refused(bob_with_alices, resume=True)
        assert mixed.error is not None and mixed.error["code"] == "auth"

        # Bob's own resume with his own token works.
        await b_client.disconnect()
        welcome = await b_client.connect(resume=True)
        assert welcome["resumed"] is True and welcome["session"] == b_session
        assert len(host.sessions) == 2
        assert len(workspaces(workspace_root, host)) == 2

        # The coordinator ends Bob's lease: the host ends the session and refuses the token.
        session = host.sessions[b_session]
        await bob.end_lease(b_grant.lease)
        await asyncio.wait_for(session.ended.wait(), DEFAULT_TIMEOUT)
        code, _ = await b_client.wait_closed()
        assert code in (1000, 4010)
        after = TunnelClient(b_grant.tunnel_url, bob.keypair, token=b_grant.token)
        ended = await refused(after)
        assert ended.error is not None and ended.error["code"] == "auth"
        assert "ended" in ended.error["reason"]
        assert list(host.sessions) != [b_session] and len(host.sessions) == 1
    finally:
        await a_client.disconnect()
        await b_client.disconnect()
