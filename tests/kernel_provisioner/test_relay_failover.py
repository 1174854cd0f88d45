"""A relayed tunnel whose relay dies resumes through another replica's relay: two loopback
TCP relays in front of one real provider host, the first closed mid-session (its port then
refuses), the resume goes to the second and the session carries on, nothing lost; and the
provisioner gives a relayed lease's tunnel the other configured coordinators' relays."""

from __future__ import annotations

from typing import Any

from solders.keypair import Keypair

from jupyter_io.identity import load_keypair
from kernel_provisioner.connection import TunnelClient
from kernel_provisioner.facade import Facade
from kernel_provisioner.provisioner import RemoteKernelProvisioner

WAIT = 20.0


async def test_a_resume_goes_to_the_next_relay_when_the_first_refuses(
    provider_host: Any, proxy_to: Any
) -> None:
    first, second = await proxy_to(provider_host), await proxy_to(provider_host)
    facade = Facade()
    facade.bind()
    client = TunnelClient(
        first.url,
        load_keypair(provider_host.user_keypair_path),
        outbound=facade.outbound,
        inbound=facade.inbound,
        refused_limit=None,  # as through a relay: a refusal is the relay's, not the host's
        alternates=[second.url],
    )
    try:
        welcome = await client.open()
        assert client.url == first.url and second.connections_accepted == 0
        await first.close()  # the relay dies: its connections cut, its port refuses

        assert await client.wait_for(lambda: client.resumes == 1 and client.connected, WAIT)
        assert client.url == second.url and second.connections_accepted == 1
        assert client.session_id == welcome["session"] and client.alive
    finally:
        await client.close()
        facade.close()


async def test_a_relayed_lease_resumes_on_the_other_configured_coordinators() -> None:
    prov = RemoteKernelProvisioner(coordinator_url="http://a.example:8700, http://b.example:8700")
    keypair = Keypair()
    relayed = "ws://b.example:8700/relay/lease-1?side=client"
    lease = prov._lease = prov._new_lease(keypair)
    saved = {
        "lease": "lease-1",
        "token": "t",
        "provider": str(Keypair().pubkey()),
        "gpu": "RTX 4090",
        "gpu_indices": [0],
        "price_lamports_per_hour": 1,
    }
    lease.restore({**saved, "tunnel_url": relayed, "relay": True})
    facade = Facade()
    facade.bind()
    try:
        client = prov._new_client(relayed, keypair, facade)
        assert client.urls == (relayed, "ws://a.example:8700/relay/lease-1?side=client")
        # A direct provider's tunnel has no other address.
        lease.restore({**saved, "tunnel_url": "ws://gpu.example:9000/tunnel", "relay": False})
        direct = prov._new_client("ws://gpu.example:9000/tunnel", keypair, facade)
        assert direct.urls == ("ws://gpu.example:9000/tunnel",)
    finally:
        facade.close()
