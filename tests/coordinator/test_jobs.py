"""Work done once across coordinator replicas (issue 17.2, ``jupyter_io/coordinator/jobs.py``).

Two coordinators in this process on one real PostgreSQL database, with short intervals:

* one of them leads (a session advisory lock on a connection of its own); when the leader's
  connection dies (terminated by the server, as a dead replica's goes) the other leads
  within a few seconds, and the old one notices and says so;
* a settlement is worked on only by the replica holding its provider's link (one
  ``sign_settlement``, one transaction, one attempt), and a claim left by a replica that
  crashed mid-job is taken over once it expires;
* a lease left unfunded by a replica that was shut down is ended by the leader when its
  claim window is over (the provider, linked to the leader now, is told to end it);
* a provider whose heartbeats stopped in the database while its replica is gone is marked
  lost once, its live lease failed at its last heartbeat;
* a paid lease's acknowledgement watch moves with its provider's link: the replica the
  provider links to next ends the lease its user stopped acknowledging.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey

from jupyter_io.coordinator.models import LeaseState, ProviderStatus, SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import ProviderProfile
from jupyter_io.coordinator_client import NOT_FUNDED_IN_TIME, CoordinatorClient
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms
from jupyter_io.usage_acks import NOT_ACKNOWLEDGED

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.parametrize("store_url", ["postgresql"], indirect=True),
]

PRICE = 3_600_000  # lamports per hour
#: Seconds between leadership tries and leader passes in these tests.
JOBS = 0.2


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _parts(server: CoordinatorServer) -> tuple:  # type: ignore[type-arg]
    assert server.store is not None and server.registry is not None
    assert server.leadership is not None and server.jobs is not None
    return server.store, server.registry, server.leadership, server.jobs


async def test_one_replica_leads_and_another_takes_over_when_its_connection_dies(
    store_url: str, start_coordinator: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    first = await start_coordinator(db=store_url, jobs_interval=JOBS)
    second = await start_coordinator(db=store_url, jobs_interval=JOBS)
    store, _, leader, _ = _parts(first)
    _, _, other, _ = _parts(second)
    assert leader.is_leader() and not other.is_leader()
    assert leader.to_json()["leader"] is True and other.to_json()["leader"] is False

    # The server ends the leader's session, as it does for a replica that died.
    pid = leader.connection.get_server_pid()
    async with store.engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="jupyter_io.coordinator"):
        await other.wait(True, 5.0)
        await leader.wait(False, 5.0)
    assert time.monotonic() - started < 5.0
    assert "lost the leadership" in caplog.text
    await asyncio.sleep(3 * JOBS)  # a few of its retries: the lock is taken
    assert not leader.is_leader() and other.is_leader()

    # A shutdown releases it: the first replica leads again.
    await second.shutdown()
    await leader.wait(True, 5.0)


class Escrows:
    """A user who leases and funds escrows on the leader's embedded ledger."""

    def __init__(self, server: CoordinatorServer, ledger_url: str) -> None:
        self.user = Keypair()
        self.api = CoordinatorClient(server.url, self.user, timeout=WAIT)
        self.escrow = EscrowClient.connect(ledger_url)

    async def lease(self, provider: FakeProvider, *, fund: bool = True) -> str:
        grant = await self.api._call("POST", "/api/v1/leases", {"gpu": "RTX 4090"}, sign=True)
        lease = str(grant["lease"])
        if fund:
            await self.escrow.open_escrow(
                self.user,
                Pubkey.from_string(provider.pubkey),
                Pubkey.from_string(grant["escrow"]["arbiter"]),
                lease,
                PRICE // 60,
            )
            await self.api._call("POST", f"/api/v1/leases/{lease}/escrow", {}, sign=True)
        return lease

    async def close(self) -> None:
        self.api.close()
        await self.escrow.close()


async def test_a_settlement_is_worked_on_once_by_the_replica_holding_its_provider(
    store_url: str, start_coordinator: Starter
) -> None:
    leader = await start_coordinator(db=store_url, payments="escrow", jobs_interval=JOBS)
    linked = await start_coordinator(
        db=store_url, payments="escrow", jobs_interval=JOBS, solana_url=leader.solana_url
    )
    workers = [leader.settlements, linked.settlements]
    assert workers[0] is not None and workers[1] is not None
    for worker in workers:  # this test runs the passes itself, in the order it wants
        await worker.stop()
    store = linked.store
    assert store is not None and leader.leadership is not None
    assert leader.leadership.is_leader()
    provider = FakeProvider(linked.url, [gpu_offer(count=2, price=PRICE)])
    await provider.connect()
    user = Escrows(linked, leader.solana_url)
    requests: list[str] = []

    async def cosign() -> None:
        while True:
            request = await provider.next_message("sign_settlement", timeout=60)
            requests.append(request["lease"])
            message = MessageV0.from_bytes(base64.b64decode(request["message"]))
            signature = provider.keypair.sign_message(to_bytes_versioned(message))
            await provider.send(
                {"type": "settlement_signature", "lease": request["lease"],
                 "signature": str(signature)}
            )  # fmt: skip

    signer = asyncio.create_task(cosign())
    try:
        await user.escrow.airdrop(user.user.pubkey(), LAMPORTS_PER_SOL)
        await user.escrow.airdrop(provider.keypair.pubkey(), LAMPORTS_PER_SOL // 10)
        first, second = await user.lease(provider), await user.lease(provider)
        for lease in (first, second):
            await user.api._call("DELETE", f"/api/v1/leases/{lease}", sign=True)
        now = time.time()
        assert sorted(await store.enqueue_settlements(at=_utc(now))) == sorted([first, second])

        # A crashed replica's claim on the second: nobody touches it until it expires.
        assert await store.claim_settlement(
            second, "coordinator-crashed", until=_utc(now + 1.0), at=_utc(now)
        )
        # The leader's pass comes first: the provider is linked at the other replica, which
        # alone can have it co-sign, so the leader leaves the row alone.
        await workers[0].run_once()
        row = await store.get_settlement(first)
        assert row is not None and row.attempts == 0 and row.claimed_by is None, row
        await asyncio.gather(workers[0].run_once(), workers[1].run_once())
        row = await store.get_settlement(first)
        assert row is not None and row.state is SettlementState.DONE and row.attempts == 1, row
        assert requests == [first]
        assert workers[0].stats.attempts == 0 and workers[1].stats.settled == 1
        pending = await store.get_settlement(second)
        assert pending is not None and pending.claimed_by == "coordinator-crashed"

        # The crashed replica's claim expires: the replica holding the link takes it, once.
        await asyncio.sleep(max(0.0, now + 1.05 - time.time()))  # the claim's time to live
        await asyncio.gather(workers[0].run_once(), workers[1].run_once())
        await asyncio.gather(workers[0].run_once(), workers[1].run_once())
        done = await store.get_settlement(second)
        assert done is not None and done.state is SettlementState.DONE, done
        assert done.attempts == 2  # the crashed replica's and this one
        assert requests == [first, second]
        assert workers[0].stats.attempts == 0 and workers[1].stats.settled == 2
        assert linked.keypair is not None
        for lease in (first, second):
            terms = EscrowTerms(
                user.user.pubkey(), provider.keypair.pubkey(), linked.keypair.pubkey(), lease
            )
            assert await user.escrow.escrow_state(terms) is None
    finally:
        signer.cancel()
        await user.close()
        await provider.close()


async def test_a_lease_its_replica_left_unfunded_is_ended_by_the_leader(
    store_url: str, start_coordinator: Starter
) -> None:
    leader = await start_coordinator(
        db=store_url, payments="escrow", jobs_interval=JOBS, claim_window=1.0
    )
    maker = await start_coordinator(
        db=store_url,
        payments="escrow",
        jobs_interval=JOBS,
        claim_window=1.0,
        solana_url=leader.solana_url,
    )
    store, _, _, jobs = _parts(leader)
    provider = FakeProvider(maker.url, [gpu_offer(price=PRICE)])
    await provider.connect()
    user = Escrows(maker, leader.solana_url)
    try:
        lease = await user.lease(provider, fund=False)
        await maker.shutdown()  # its claim-window watch goes with it
        # The provider links again, to the surviving replica.
        moved = FakeProvider(leader.url, [gpu_offer(price=PRICE)], keypair=provider.keypair)
        await moved.connect()
        end = await moved.next_message("end")
        assert end["lease"] == lease and end["reason"] == NOT_FUNDED_IN_TIME
        record = await store.get_lease(lease)
        assert record is not None and record.state is LeaseState.ENDED
        assert record.end_reason == NOT_FUNDED_IN_TIME
        assert jobs.stats.leases_expired == 1
        await jobs.run_once()  # again: nothing left to end
        assert jobs.stats.leases_expired == 1
        await moved.close()
    finally:
        await user.close()
        await provider.close()


async def test_a_provider_silent_in_the_database_with_its_replica_gone_is_lost_once(
    store_url: str, start_coordinator: Starter
) -> None:
    leader = await start_coordinator(db=store_url, jobs_interval=JOBS)
    replica = await start_coordinator(db=store_url, jobs_interval=JOBS)
    store, registry, _, jobs = _parts(leader)
    provider = FakeProvider(replica.url)
    await provider.connect()
    api = CoordinatorClient(replica.url, Keypair(), timeout=WAIT)
    try:
        grant = await api.request_lease("RTX 4090")
        await provider.session(grant.lease, "active")
        await replica.registry.wait_for(  # type: ignore[union-attr]
            lambda: replica.registry.provider(provider.pubkey).leases[grant.lease].state  # type: ignore[union-attr]
            is LeaseState.ACTIVE,
            WAIT,
        )
        await replica.shutdown()  # the replica is gone; the provider does not link again
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        registry.lease_listeners.append(
            lambda lease, why: gone.done() or lease != grant.lease or gone.set_result(why)
        )
        assert "lost" in await asyncio.wait_for(gone, WAIT)
        record = await store.get_provider(provider.pubkey)
        assert record is not None and record.status == ProviderStatus.LOST.value
        assert record.times_lost == 1 and jobs.stats.providers_lost == 1
        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.FAILED
        assert lease.end_of_service == record.last_heartbeat  # billing stops at its last beat
        await jobs.run_once()  # again: changes nothing
        again = await store.get_provider(provider.pubkey)
        assert again is not None and again.times_lost == 1 and jobs.stats.providers_lost == 1
        # The check is conditional: a provider whose heartbeat is newer is left alone.
        fresh = str(Keypair().pubkey())
        await store.upsert_provider(ProviderProfile(fresh, "rig", "eu-west", None))
        long_ago = _utc(time.time() - 60)
        assert await store.mark_silent_provider_lost(fresh, silent_since=long_ago) is None
        record = await store.get_provider(fresh)
        assert record is not None and record.status == ProviderStatus.ONLINE.value
    finally:
        api.close()
        await provider.close()


async def test_the_replica_a_provider_links_to_next_watches_its_paid_leases(
    store_url: str, start_coordinator: Starter
) -> None:
    leader = await start_coordinator(
        db=store_url, payments="escrow", jobs_interval=JOBS, usage_ack_timeout=4.0
    )
    first = await start_coordinator(
        db=store_url,
        payments="escrow",
        jobs_interval=JOBS,
        usage_ack_timeout=4.0,
        solana_url=leader.solana_url,
    )
    provider = FakeProvider(first.url, [gpu_offer(price=PRICE)])
    await provider.connect()
    user = Escrows(first, leader.solana_url)
    try:
        await user.escrow.airdrop(user.user.pubkey(), LAMPORTS_PER_SOL)
        lease = await user.lease(provider)
        await provider.session(lease, "active")
        registry = first.registry
        assert registry is not None
        await registry.wait_for(
            lambda: registry.provider(provider.pubkey).leases[lease].state  # type: ignore[union-attr]
            is LeaseState.ACTIVE,
            WAIT,
        )
        await first.shutdown()  # its watch goes with it; the user never acknowledges
        moved = FakeProvider(leader.url, [gpu_offer(price=PRICE)], keypair=provider.keypair)
        await moved.connect(sessions=[lease])
        end = await moved.next_message("end")
        assert end["lease"] == lease and end["reason"] == NOT_ACKNOWLEDGED
        assert leader.store is not None and leader.ack_watch is not None
        record = await leader.store.get_lease(lease)
        assert record is not None and record.end_reason == NOT_ACKNOWLEDGED
        assert leader.ack_watch.ended == 1
        await moved.close()
    finally:
        await user.close()
        await provider.close()
