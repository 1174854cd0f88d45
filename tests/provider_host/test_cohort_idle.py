"""A class's idle timeout on the provider's word (issue 14.3): the host measures how long
its kernel has been idle from what the kernel itself says (iopub status for an
execute_request, the execute_reply), never from what the client sends, and its signed usage
reports carry it. A real provider host, real ipykernel processes, a real coordinator: a
kernel left idle is stopped on the provider's reports alone while the student's client
claims activity (and forges requests the kernel drops); a silent cell longer than the
timeout is not stopped."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import pytest
from jupyter_client.session import Session
from solders.pubkey import Pubkey

from jupyter_io.activity import ExecutionClock
from jupyter_io.cohorts import CohortSettings
from jupyter_io.coordinator.cohort_limits import idle_reason
from jupyter_io.coordinator.scheduler import LeaseRequest
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.errors import JupyterIOError
from jupyter_io.gpu_names import CPU_OFFER
from jupyter_io.protocol import Channel
from jupyter_io.usage_acks import UsageAck
from provider_host.server import ProviderServer

from .conftest import CLIENT_ID, DEFAULT_TIMEOUT, HostFactory, TunnelClient, UserFactory

pytestmark = pytest.mark.timeout(90)

#: The class's idle timeout here (the API's least is 60 s: set in the store, as a test may),
#: longer than a kernel takes to start on a loaded machine; and a silent cell longer than it.
IDLE = 3.0
CELL = IDLE * 1.5


async def forge_execute(client: TunnelClient) -> None:
    """An execute_request signed with a key that is not the kernel's: the kernel drops it."""
    forger = Session(key=b"not-the-kernel-key", username="test")
    message = forger.msg("execute_request", {"code": "1", "silent": False})
    await client.send_data(Channel.SHELL, forger.serialize(message, ident=CLIENT_ID))


async def test_the_host_counts_what_the_kernel_executes_not_what_the_client_sends(
    host: ProviderServer, client: TunnelClient
) -> None:
    await client.connect()
    await client.launch()
    await client.wait_ready()
    session = host.sessions[str(client.session_id)]
    now = [1000.0]
    session.activity.executions = ExecutionClock(lambda: now[0])
    now[0] += 50
    await client.wait_ready()  # kernel_info: busy and idle on iopub, but no execution
    assert session.activity.idle_seconds() == 50
    await forge_execute(client)
    await client.wait_ready()  # the kernel read (and dropped) the forged request before this
    assert session.activity.idle_seconds() == 50
    msg_id, _ = await client.execute(
        "print('go', flush=True); import time; time.sleep(1)", wait=False
    )
    await client.message(
        Channel.IOPUB,
        lambda m: m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id,
    )
    now[0] += 3600  # a silent hour-long cell
    assert session.activity.idle_seconds() == 0
    await client.message(Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id)
    now[0] += 90
    assert session.activity.idle_seconds() == 90


async def new_cohort(coordinator: CoordinatorServer) -> str:
    store = coordinator.store
    assert store is not None
    cohort_id = "c_" + secrets.token_urlsafe(12)
    settings = CohortSettings(
        name="ML 101",
        gpu_types=(CPU_OFFER,),
        max_price_lamports_per_hour=10**9,
        term_ends_at=time.time() + 86400,
    )
    await store.create_cohort(instructor=str(Pubkey.new_unique()), settings=settings,
                              cohort_id=cohort_id)  # fmt: skip
    await store.update_cohort(cohort_id, idle_timeout_seconds=IDLE)
    return cohort_id


async def test_an_idle_kernel_stops_on_the_providers_word_a_long_silent_cell_does_not(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    await market_host(direct=True)
    cohort_id = await new_cohort(coordinator)
    assert coordinator.leases is not None and coordinator.registry is not None
    student = make_user()
    grant = await coordinator.leases.request(
        student.keypair.pubkey(), LeaseRequest(gpu=CPU_OFFER), cohort_id=cohort_id
    )
    lease_id = grant.lease.id
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def gone(lease: str, reason: str) -> None:
        if lease == lease_id and not ended.done():
            ended.set_result(reason)

    coordinator.registry.lease_listeners.append(gone)
    client = TunnelClient(grant.tunnel_url, student.keypair, token=grant.token)

    async def claim_busy() -> None:
        """The student's client says 'busy' all along (as a lying client would)."""
        while not ended.done():
            with contextlib.suppress(JupyterIOError):
                await student.acknowledge_usage(UsageAck(lease_id, 0, idle_seconds=0))
            await asyncio.sleep(0.1)

    liar = asyncio.create_task(claim_busy())
    try:
        await client.connect()
        await client.launch()
        # A silent cell longer than the idle timeout, sent at once (it runs once the kernel
        # is up): the provider reports it busy all along.
        started = time.monotonic()
        _, reply = await client.execute(f"import time; time.sleep({CELL})")
        assert reply is not None and reply["content"]["status"] == "ok"
        assert time.monotonic() - started >= CELL
        assert not ended.done(), ended.result()

        async def forge_until_ended() -> None:
            while not ended.done():
                await forge_execute(client)
                await asyncio.wait([ended], timeout=0.2)

        # Left idle, with requests the kernel drops: stopped on the provider's reports.
        await asyncio.wait_for(forge_until_ended(), IDLE + DEFAULT_TIMEOUT)
        assert ended.result() == idle_reason(IDLE)
        await client.wait_closed()  # the coordinator's end reached the host
        lease = await student.get_lease(lease_id)
        assert lease.state == "ended" and lease.end_reason == idle_reason(IDLE)
    finally:
        liar.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await liar
        await client.disconnect()
