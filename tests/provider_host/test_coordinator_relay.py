"""The relay path end to end: a host with no public URL, a client that connects to the
coordinator's relay with its lease token, the host dialling out on the coordinator's ``dial``;
a real kernel runs, a dropped client resumes through a new dial, and ending the lease ends
the session."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.protocol import Channel

from .conftest import DEFAULT_TIMEOUT, HostFactory, TunnelClient, UserFactory, pid_alive

pytestmark = pytest.mark.timeout(90)


async def test_the_relay_path_runs_a_real_kernel_end_to_end(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    host = await market_host(simulate_gpu=["RTX 4090:24"])  # no public URL: relayed
    registry, store, relay = coordinator.registry, coordinator.store, coordinator.relay
    assert registry is not None and store is not None and relay is not None
    user = make_user()
    grant = await user.request_lease("RTX 4090")
    assert grant.relay and grant.tunnel_url.startswith(relay.base_url + "/")
    client = TunnelClient(
        grant.tunnel_url,
        user.keypair,
        token=grant.token,
        additional_headers=grant.relay_headers(),
    )
    try:
        welcome = await client.connect()
        session = host.sessions[welcome["session"]]
        assert session.lease_id == grant.lease
        started = await client.launch()
        await client.wait_ready()
        msg_id, reply = await client.execute("1+1")
        assert reply is not None and reply["content"]["status"] == "ok"
        results = [m for m in await client.outputs(msg_id) if m["msg_type"] == "execute_result"]
        assert results[0]["content"]["data"]["text/plain"] == "2"

        # Output produced while the client is away is replayed after a resume, which goes
        # through a new relay connection and so a new dial.
        await client.execute("import time; time.sleep(0.3); print('while away')", wait=False)
        await client.disconnect()
        welcome = await client.connect(resume=True)
        assert welcome["resumed"] is True and welcome["kernel"]["state"] == "running"
        printed = await client.message(
            Channel.IOPUB,
            lambda m: m["msg_type"] == "stream" and "while away" in m["content"]["text"],
        )
        assert printed["content"]["name"] == "stdout"
        assert relay.stats.pairs == 2

        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ACTIVE

        # The user ends the lease at the coordinator: the host ends the session.
        await user.end_lease(grant.lease)
        await asyncio.wait_for(session.ended.wait(), DEFAULT_TIMEOUT)
        await asyncio.wait_for(client.wait_closed(), DEFAULT_TIMEOUT)
        assert not pid_alive(started["pid"]) and host.sessions == {}
        assert host.hosted_leases() == frozenset()
    finally:
        await client.disconnect()
