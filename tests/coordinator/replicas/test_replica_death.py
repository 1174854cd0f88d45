"""A replica dies (issue 17's "Done when"): three coordinators on one PostgreSQL and one
shared ledger, real provider hosts and real kernels; one replica is killed with SIGKILL

* mid-session: the provider linked to it re-links to another replica within 10 s, the user's
  lease stays the same live lease and its kernel keeps its state, and the lease is settled
  once at the end with every lamport accounted for on-chain;
* mid-settlement: it dies holding the claim on a lease's settlement, waiting for the
  provider's co-signature, or after sending the settlement, whose transaction reaches the
  ledger only after its death; another replica settles that lease, or records the payment
  that landed, exactly once;
* mid-relay: a relayed tunnel through its relay resumes through another replica's relay and a
  cell printing a counter across the kill loses no line and repeats none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.coordinator_client import CoordinatorClient, LeaseInfo
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowTerms

from ...kernel_provisioner.conftest import Cells, KernelSpecs, ProviderHost
from ...kernel_provisioner.test_payments import Ledger
from ...provider_host.conftest import TunnelClient
from .conftest import Cluster, Replica

pytestmark = pytest.mark.timeout(120)

log = logging.getLogger(__name__)

#: The contract: a dead replica's providers are linked elsewhere within this.
RELINK_WITHIN = 10.0
#: Bound on a lease's settlement once its provider can co-sign.
SETTLE_WITHIN = 20.0
ACK_INTERVAL = 0.5
GPU = ("--simulate-gpu", "RTX 4090:24", "--price", "0.12")


async def _fund(cluster: Cluster, tmp: Path, *hosts: ProviderHost) -> tuple[Keypair, Path]:
    """A user with 2 SOL, and 0.1 SOL for each provider (it pays its settlements' fees)."""
    user, path = cluster.user(tmp)
    await cluster.ledger.airdrop(user.pubkey(), lamports=2 * LAMPORTS_PER_SOL)
    await cluster.ledger.airdrop(*(h.pubkey for h in hosts), lamports=LAMPORTS_PER_SOL // 10)
    return user, path


def _spec(kernelspecs: KernelSpecs, name: str, cluster: Cluster, user_path: Path) -> str:
    return kernelspecs.install_lease(
        name, cluster.coordinator_url, user_path, gpu="RTX 4090", probe_candidates=0,
        usage_ack_interval=ACK_INTERVAL,
    )  # fmt: skip


async def _lease(cluster: Cluster, user: Keypair, lease_id: str) -> LeaseInfo:
    """The lease's record, read as its user from any live replica."""
    client = CoordinatorClient(cluster.coordinator_url, user, timeout=15)
    try:
        return await client.get_lease(lease_id)
    finally:
        client.close()


async def _settled(cluster: Cluster, user: Keypair, lease_id: str, timeout: float) -> LeaseInfo:
    """Poll (settlement runs on a timer in another process) until the lease is settled."""
    deadline = time.monotonic() + timeout
    while True:
        info = await _lease(cluster, user, lease_id)
        billing = info.billing
        if billing is not None and billing.settlement is not None:
            if billing.settlement.state == "done":
                return info
        if time.monotonic() > deadline:
            raise AssertionError(f"lease {lease_id} not settled in {timeout} s: {billing}")
        await asyncio.sleep(0.1)


async def _billed(cluster: Cluster, user: Keypair, lease_id: str, seconds: int) -> None:
    """Poll until the replica the provider moved to has metered ``seconds`` of service (both
    the provider's reports and the user's acknowledgements): a session of under a second
    bills nothing, and the test is about what is paid after the move."""
    deadline = time.monotonic() + 30
    while True:
        billing = (await _lease(cluster, user, lease_id)).billing
        if (
            billing is not None
            and min(billing.reported_seconds, billing.acknowledged_seconds) >= seconds
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"lease {lease_id} not billed {seconds} s in 30 s: {billing}")
        await asyncio.sleep(0.2)


async def _books_balance(
    chain: Ledger, terms: EscrowTerms, during: Any, info: LeaseInfo, *signatures: str
) -> int:
    """The escrow is closed, the provider was paid exactly the settled amount, and nothing
    else moved but fees (``during``: the books after the escrow was opened)."""
    settlement = info.billing.settlement if info.billing is not None else None
    assert settlement is not None and settlement.kind == "settle", info.billing
    after = await chain.snapshot(terms)
    assert after.escrow == 0, "the escrow is closed"
    await chain.assert_conserved(
        terms, during, after, paid_to_provider=settlement.amount_lamports,
        signatures=[*signatures, settlement.signature],
    )  # fmt: skip
    return settlement.amount_lamports


async def _start(km: AsyncKernelManager) -> Any:
    await asyncio.wait_for(km.start_kernel(), 60)
    return km.provisioner


# -- mid-session ------------------------------------------------------------------------------


async def test_killed_mid_session_the_provider_relinks_and_the_lease_lives_on(
    cluster: Cluster,
    kernelspecs: KernelSpecs,
    kernels: Callable[[str], AsyncKernelManager],
    tmp_path: Path,
) -> None:
    host = cluster.start_provider(tmp_path / "host", *GPU, public=True)
    user, user_path = await _fund(cluster, tmp_path, host)
    chain = Ledger(cluster.ledger.url)
    km = kernels(_spec(kernelspecs, "mid-session", cluster, user_path))
    try:
        prov = await _start(km)
        grant = prov.lease.grant
        assert grant.provider == host.pubkey
        terms = EscrowTerms(user.pubkey(), Pubkey.from_string(host.pubkey), cluster.arbiter(),
                            grant.lease)  # fmt: skip
        during = await chain.snapshot(terms)
        kc = await Cells.connect(km)
        try:
            assert (await Cells.run(kc, "n = 41")).status == "ok"
            holder = await cluster.wait_link_holder(host.pubkey, 10)

            holder.kill()
            moved = await cluster.wait_link_holder(host.pubkey, RELINK_WITHIN, other_than=holder)
            took = time.monotonic() - (holder.killed_at or 0.0)
            log.warning("replica %s killed: provider re-linked at %s in %.2f s",
                        holder.name, moved.name, took)  # fmt: skip
            assert took < RELINK_WITHIN

            # The same lease, live, its kernel with its state; no failover to elsewhere.
            assert (await _lease(cluster, user, grant.lease)).state == "active"
            assert (await Cells.run(kc, "print(n + 1)", timeout=30)).stream() == "42\n"
            assert await km.is_alive()
            assert prov.lease.grant.lease == grant.lease
            assert not prov._failover.done, "a replica's death is no provider's loss"
            await _billed(cluster, user, grant.lease, seconds=2)
        finally:
            kc.stop_channels()
        await asyncio.wait_for(km.shutdown_kernel(), 30)
        info = await _settled(cluster, user, grant.lease, SETTLE_WITHIN)
        assert info.state == "ended"
        paid = await _books_balance(chain, terms, during, info)
        assert paid > 0 and await chain.escrow.wsol_balance(terms.provider) == paid
    finally:
        await chain.close()


# -- mid-settlement ---------------------------------------------------------------------------


@dataclass
class Session:
    """A funded lease on a direct provider whose kernel ran a second of work, ended by its
    user at a replica that does not hold the provider's link."""

    host: ProviderHost
    user: Keypair
    chain: Ledger
    lease: str
    terms: EscrowTerms
    #: The books before the escrow was opened, and the escrow's setup transaction.
    before: Any
    setup: str
    #: The replica holding the provider's link when the lease ended.
    holder: Replica
    client: TunnelClient


@contextlib.asynccontextmanager
async def _session(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Session]:
    host = cluster.start_provider(tmp_path / "host", *GPU, public=True)
    user, _ = await _fund(cluster, tmp_path, host)
    chain = Ledger(cluster.ledger.url)
    api = CoordinatorClient(cluster.coordinator_url, user, timeout=15)
    client: TunnelClient | None = None
    try:
        grant = await api.request_lease(gpu="RTX 4090")
        assert grant.provider == host.pubkey and grant.escrow is not None
        terms = EscrowTerms(user.pubkey(), Pubkey.from_string(host.pubkey), cluster.arbiter(),
                            grant.lease)  # fmt: skip
        before = await chain.snapshot(terms)
        deposit = 60 * grant.price_lamports_per_hour // 3600
        receipt = await chain.escrow.open_escrow(
            user, terms.provider, terms.arbiter, terms.session_id, deposit
        )
        funded = await api.fund_lease(grant.lease, str(receipt.signature))
        assert funded.token is not None
        client = TunnelClient(funded.tunnel_url, user, token=funded.token)
        try:
            await client.connect()
            await client.launch()
            await client.wait_ready()
        except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
            raise AssertionError(f"no kernel on the provider: {exc!r}\n{host.stderr()}") from exc
        _, reply = await client.execute("import time; time.sleep(1.0)")
        assert reply is not None and reply["content"]["status"] == "ok"
        holder = await cluster.wait_link_holder(host.pubkey, 10)
        yield Session(host, user, chain, grant.lease, terms, before, str(receipt.signature),
                      holder, client)  # fmt: skip
    finally:
        if client is not None:
            await client.disconnect()
        api.close()
        await chain.close()


async def _end_elsewhere(cluster: Cluster, session: Session) -> None:
    """End the lease at a replica other than the one holding the provider's link."""
    other = next(r for r in cluster.alive if r is not session.holder)
    ender = CoordinatorClient(other.url, session.user, timeout=15)
    try:
        assert (await ender.end_lease(session.lease)).state == "ended"
    finally:
        ender.close()


async def _claim(cluster: Cluster, lease_id: str, timeout: float) -> tuple[Replica, str | None]:
    """Poll the settlements table until one replica holds the lease's claim over two reads
    0.2 s apart; that replica, and the settlement signature the row notes (if any)."""
    deadline = time.monotonic() + timeout
    last: str | None = None
    while True:
        rows = await cluster.query(
            "SELECT claimed_by, signature FROM settlements WHERE lease_id = $1", lease_id
        )
        owner = rows[0]["claimed_by"] if rows else None
        if owner is not None and owner == last:
            return await cluster.replica_named(owner), rows[0]["signature"]
        last = owner
        assert time.monotonic() < deadline, f"no claim held on {lease_id}'s settlement: {rows}"
        await asyncio.sleep(0.2)


async def _settled_once(cluster: Cluster, session: Session, killed: Replica) -> LeaseInfo:
    """Another replica finishes the settlement; one transaction closed the escrow, the
    provider holds exactly what the row says it was paid, the books balance."""
    await cluster.wait_link_holder(session.host.pubkey, RELINK_WITHIN, other_than=killed)
    info = await _settled(cluster, session.user, session.lease, SETTLE_WITHIN)
    took = time.monotonic() - (killed.killed_at or 0.0)
    log.warning("settled by another replica %.2f s after the kill", took)
    rows = await cluster.query(
        "SELECT state, signature, claimed_by FROM settlements WHERE lease_id = $1",
        session.lease,
    )
    assert len(rows) == 1 and rows[0]["state"] == "done" and rows[0]["claimed_by"] is None
    assert info.billing is not None and info.billing.settlement is not None
    assert rows[0]["signature"] == info.billing.settlement.signature
    chain = session.chain
    paid = await _books_balance(chain, session.terms, session.before, info, session.setup)
    assert await chain.escrow.wsol_balance(session.terms.provider) == paid
    assert info.billing.billed_seconds >= 1 and paid == info.billing.spent_lamports
    return info


async def test_killed_holding_a_settlement_claim_another_replica_settles_it_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with _session(cluster, tmp_path) as session:
        host = session.host
        # Frozen, the provider cannot co-sign: the replica settling its lease holds the
        # claim while it waits for the signature.
        host.proc.send_signal(signal.SIGSTOP)
        try:
            await _end_elsewhere(cluster, session)
            claimant, noted = await _claim(cluster, session.lease, 10)
            assert claimant is session.holder and noted is None
            claimant.kill()
        finally:
            host.proc.send_signal(signal.SIGCONT)
        log.warning("replica %s killed holding the claim of %s", claimant.name, session.lease)
        await _settled_once(cluster, session, claimant)


async def test_killed_after_sending_its_settlement_another_replica_records_it_paid_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The replica co-signed and sent the settlement; the transaction reaches the ledger only
    # after the replica died. The replica that takes the claim over must find the escrow
    # closed by the transaction the row noted, and record that payment: not pay again, not
    # call the escrow lost.
    async with _session(cluster, tmp_path) as session:
        gate = cluster.gate
        gate.hold()
        try:
            await _end_elsewhere(cluster, session)
            assert await asyncio.to_thread(gate.held.wait, 20), "no settlement was sent"
            claimant, noted = await _claim(cluster, session.lease, 10)
            assert claimant is session.holder and noted is not None
            claimant.kill()
            gate.release(forward=True)
            assert await asyncio.to_thread(gate.forwarded.wait, 20)
        finally:
            gate.release(forward=False)
        log.warning("replica %s killed, its settlement %s landed after", claimant.name, noted)
        info = await _settled_once(cluster, session, claimant)
        assert info.billing is not None and info.billing.settlement is not None
        assert info.billing.settlement.signature == noted, "the transaction that landed"


# -- mid-relay --------------------------------------------------------------------------------

COUNT = 40
COUNTER = f"import time\nfor i in range({COUNT}):\n    print(i, flush=True)\n    time.sleep(0.1)"


async def test_killed_mid_relay_the_tunnel_resumes_through_another_relay_losing_nothing(
    cluster: Cluster,
    kernelspecs: KernelSpecs,
    kernels: Callable[[str], AsyncKernelManager],
    tmp_path: Path,
) -> None:
    host = cluster.start_provider(tmp_path / "host", *GPU)  # no public URL: relayed
    _, user_path = await _fund(cluster, tmp_path, host)
    km = kernels(_spec(kernelspecs, "mid-relay", cluster, user_path))
    prov = await _start(km)
    grant = prov.lease.grant
    assert grant.provider == host.pubkey and grant.relay
    relay: Replica = cluster.replica_at(grant.tunnel_url)
    kc = await Cells.connect(km)
    try:
        assert (await Cells.run(kc, "n = 41")).status == "ok"
        msg_id = kc.execute(COUNTER)
        ex = Cells.execution(msg_id)
        done = asyncio.ensure_future(Cells.collect(kc, msg_id, timeout=60, into=ex))
        await ex.wait_until(lambda: "5\n" in ex.stream(), 30)

        relay.kill()
        await ex.wait_until(lambda: f"{COUNT - 1}\n" in ex.stream(), 60)
        took = time.monotonic() - (relay.killed_at or 0.0)
        await done
        log.warning("relay %s killed mid-cell: the cell ended %.2f s later", relay.name, took)
        assert ex.status == "ok"
        assert ex.stream() == "".join(f"{i}\n" for i in range(COUNT)), "lost or repeated"
        # It resumed through another replica's relay: the same path on a live replica.
        assert prov.tunnel is not None
        moved_to = cluster.replica_at(prov.tunnel.url)
        assert moved_to is not relay and moved_to.alive
        assert urlsplit(prov.tunnel.url).path == urlsplit(grant.tunnel_url).path
        assert (await Cells.run(kc, "print(n + 1)", timeout=30)).stream() == "42\n"
        assert prov.lease.grant.lease == grant.lease
        assert not prov._failover.done, "a relay's death is no provider's loss"
    finally:
        kc.stop_channels()
    stopping = time.monotonic()
    await asyncio.wait_for(km.shutdown_kernel(), 30)
    log.warning("shutdown after the relay moved: %.2f s", time.monotonic() - stopping)
