"""Settlement end to end: a real escrow coordinator (embedded ledger, real transactions), a
real provider host that meters a real kernel and co-signs, and a user who opens the escrow
with :class:`~jupyter_io.payments.escrow.EscrowClient` (``docs/payments-contract.md``).

After every scenario the books must balance, read on-chain: nothing is created or destroyed
but the fees the chain charged; the provider gains exactly what it was paid (less the fees
it paid); the arbiter gains nothing; what left the user went to the provider, stayed in the
escrow, paid the multisig's rent, or paid its fees.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import stat
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from solana.rpc.async_api import AsyncClient
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature

from jupyter_io.coordinator.models import LeaseState, SettlementRow, SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import write_keypair
from jupyter_io.leases import LeaseClaims
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms, settlement_message
from jupyter_io.provider_link import (
    SettlementRefused,
    SettlementSignature,
    SignSettlement,
)
from provider_host.server import ProviderServer
from provider_host.settlement import SettlementBook
from provider_host.usage import UsageMeter

from ..escrow_books import Books, Snapshot
from .conftest import (
    DEFAULT_TIMEOUT,
    CoordinatorStarter,
    HostFactory,
    TunnelClient,
    free_port,
    market_host_of,
)
from .test_coordinator_failures import start_provider_process

pytestmark = pytest.mark.timeout(120)

#: 3.6 SOL per GPU-hour: 1,000,000 lamports a second.
PRICE_SOL = "3.6"
PER_SECOND = 1_000_000


@pytest.fixture
async def coordinator(start_coordinator: CoordinatorStarter) -> CoordinatorServer:
    """An escrow coordinator serving its embedded ledger; retries every 0.2 s."""
    return await start_coordinator(
        payments="escrow", settle_retry_interval=0.2, min_deposit_seconds=1
    )


# ---- the books ------------------------------------------------------------------------------


class SessionBooks(Books):
    """The books of one funded session (see :mod:`escrow_books`), on a client of its own."""

    def __init__(self, url: str, terms: EscrowTerms) -> None:
        self.client = AsyncClient(url)
        self.terms = terms
        super().__init__(lambda: self.client)

    async def assert_session_conserved(
        self,
        before: Snapshot,
        *,
        paid: int,
        signatures: Iterable[str | None],
        user_fees_before_restart: int = 0,
    ) -> None:
        """``user_fees_before_restart``: fees of transactions the ledger no longer lists."""
        after = await self.snapshot(self.terms)
        other = {self.terms.user: user_fees_before_restart} if user_fees_before_restart else None
        fees = await self.assert_conserved(
            self.terms,
            before,
            after,
            paid_to_provider=paid,
            signatures=signatures,
            other_fees=other,
        )
        assert self.terms.arbiter not in fees, "the arbiter pays for nothing here"

    async def close(self) -> None:
        await self.client.close()


# ---- a user's funded session ----------------------------------------------------------------


@dataclass
class Funded:
    """A funded lease and the user's side of it."""

    lease: str
    user: Keypair
    api: CoordinatorClient
    escrow: EscrowClient
    terms: EscrowTerms
    setup_signature: str
    token: str
    tunnel_url: str
    books: SessionBooks
    before: Snapshot
    client: TunnelClient | None = None


class Users:
    def __init__(self, coordinator: CoordinatorServer) -> None:
        self.coordinator = coordinator
        self.made: list[Funded] = []

    async def fund(
        self, deposit_seconds: int, *, coordinator: CoordinatorServer | None = None
    ) -> Funded:
        """Lease the GPU, open its escrow with ``deposit_seconds`` of its price, fund the lease."""
        server = coordinator or self.coordinator
        user = Keypair()
        api = CoordinatorClient(server.url, user, timeout=DEFAULT_TIMEOUT)
        escrow = EscrowClient.connect(server.solana_url)
        await escrow.airdrop(user.pubkey(), 10 * LAMPORTS_PER_SOL)
        grant = await api._call("POST", "/api/v1/leases", {}, sign=True)
        assert grant["token"] is None and grant["escrow"]["required"]
        terms = EscrowTerms(
            user.pubkey(),
            Pubkey.from_string(grant["provider"]),
            Pubkey.from_string(grant["escrow"]["arbiter"]),
            grant["lease"],
        )
        books = SessionBooks(server.solana_url, terms)
        before = await books.snapshot(terms)
        receipt = await escrow.open_escrow(
            user, terms.provider, terms.arbiter, terms.session_id, deposit_seconds * PER_SECOND
        )
        funded = await api._call(
            "POST",
            f"/api/v1/leases/{grant['lease']}/escrow",
            {"signature": str(receipt.signature)},
            sign=True,
        )
        session = Funded(
            grant["lease"], user, api, escrow, terms, str(receipt.signature), funded["token"],
            funded["tunnel_url"], books, before,
        )  # fmt: skip
        self.made.append(session)
        return session

    async def run_kernel(
        self, session: Funded, *, busy: float = 0.0, coordinator: CoordinatorServer | None = None
    ) -> TunnelClient:
        """Connect with the token, start the kernel, wait until the coordinator sees the
        lease active, then keep the kernel busy ``busy`` seconds (service delivered)."""
        client = TunnelClient(session.tunnel_url, session.user, token=session.token)
        session.client = client
        await client.connect()
        await client.launch()
        await client.wait_ready()
        await wait_active(coordinator or self.coordinator, session.lease)
        if busy:
            _, reply = await client.execute(f"import time; time.sleep({busy})")
            assert reply is not None and reply["content"]["status"] == "ok"
        return client

    async def close(self) -> None:
        for session in self.made:
            if session.client is not None:
                await session.client.disconnect()
            session.api.close()
            await session.escrow.close()
            await session.books.close()


@pytest.fixture
async def users(coordinator: CoordinatorServer) -> AsyncIterator[Users]:
    made = Users(coordinator)
    try:
        yield made
    finally:
        await made.close()


async def provider_host(
    market_host: HostFactory, coordinator: CoordinatorServer, **traits: Any
) -> ProviderServer:
    """A linked host selling one simulated GPU at :data:`PRICE_SOL`, with 0.1 SOL for fees."""
    host = await market_host(simulate_gpu=["RTX 4090:24"], price=PRICE_SOL, direct=True, **traits)
    assert host.host_keypair is not None
    async with EscrowClient.connect(coordinator.solana_url) as escrow:
        await escrow.airdrop(host.host_keypair.pubkey(), LAMPORTS_PER_SOL // 10)
    return host


async def wait_active(coordinator: CoordinatorServer, lease: str) -> None:
    registry = coordinator.registry
    assert registry is not None

    def active() -> bool:
        return any(
            (tracked := state.leases.get(lease)) is not None and tracked.state is LeaseState.ACTIVE
            for state in registry.providers()
        )

    await registry.wait_for(active, DEFAULT_TIMEOUT)


async def settled(coordinator: CoordinatorServer, lease: str) -> Any:
    """Wait until the settlement worker has nothing pending; the lease's settlement row."""
    worker, store = coordinator.settlements, coordinator.store
    assert worker is not None and store is not None
    try:
        await asyncio.wait_for(worker.wait_idle(), 30)
    except asyncio.TimeoutError:
        row = await store.get_settlement(lease)
        raise AssertionError(f"not settled in 30 s: {row}") from None
    row = await store.get_settlement(lease)
    assert row is not None and row.state is SettlementState.DONE, row
    return row


async def paid_through_the_escrow(session: Funded, row: Any) -> None:
    """The escrow is closed, the provider holds exactly the settled amount in wSOL, and the
    books balance (setup and settlement transactions)."""
    assert await session.escrow.escrow_state(session.terms) is None  # closed
    assert await session.escrow.wsol_balance(session.terms.provider) == row.amount_lamports
    await session.books.assert_session_conserved(
        session.before,
        paid=row.amount_lamports,
        signatures=[session.setup_signature, row.signature],
    )


# ---- scenarios ------------------------------------------------------------------------------


async def test_a_lease_ended_by_its_user_pays_the_provider_exactly_the_billed_seconds(
    coordinator: CoordinatorServer, market_host: HostFactory, users: Users
) -> None:
    host = await provider_host(market_host, coordinator)
    session = await users.fund(60)
    await users.run_kernel(session, busy=1.5)
    ended = await session.api._call("DELETE", f"/api/v1/leases/{session.lease}", sign=True)
    assert ended["state"] == "ended"

    row = await settled(coordinator, session.lease)
    record = await session.api._call("GET", f"/api/v1/leases/{session.lease}", sign=True)
    billing = record["billing"]
    assert billing["settlement"]["state"] == "done" and billing["settlement"]["signature"]
    assert billing["billed_seconds"] >= 1
    assert (
        row.amount_lamports == billing["spent_lamports"] == billing["billed_seconds"] * PER_SECOND
    )
    assert row.fee_lamports == 10_000
    await paid_through_the_escrow(session, row)
    assert host.settlements is not None and session.lease in host.settlements


async def test_an_exhausted_budget_ends_the_lease_and_settles_the_deposit(
    coordinator: CoordinatorServer, market_host: HostFactory, users: Users
) -> None:
    host = await provider_host(market_host, coordinator)
    session = await users.fund(2)  # two seconds of GPU
    started = time.monotonic()
    client = await users.run_kernel(session)
    registry = coordinator.registry
    assert registry is not None and client.session_id is not None
    kernel_session = host.sessions[client.session_id]

    def over() -> bool:
        return all(session.lease not in state.leases for state in registry.providers())

    await registry.wait_for(over, DEFAULT_TIMEOUT)
    assert time.monotonic() - started < 10  # ended by the coordinator, not by a timeout
    # The provider was told to end it and stopped the kernel.
    await asyncio.wait_for(kernel_session.ended.wait(), DEFAULT_TIMEOUT)
    row = await settled(coordinator, session.lease)
    assert row.amount_lamports == 2 * PER_SECOND  # the whole deposit, no more
    record = await session.api._call("GET", f"/api/v1/leases/{session.lease}", sign=True)
    assert record["state"] == "ended" and record["billing"]["warning"] == 100
    assert record["billing"]["left_lamports"] == 0
    await session.books.assert_session_conserved(
        session.before,
        paid=row.amount_lamports,
        signatures=[session.setup_signature, row.signature],
    )
    assert client.session_id not in host.sessions


async def test_a_lost_provider_is_refunded_by_user_and_arbiter_with_its_share_paid(
    coordinator: CoordinatorServer, market_host: HostFactory, users: Users
) -> None:
    host = await provider_host(market_host, coordinator)
    session = await users.fund(60)
    await users.run_kernel(session, busy=1.2)
    registry = coordinator.registry
    assert registry is not None and host.coordinator_link is not None
    await host.coordinator_link.stop()  # the provider vanishes from the coordinator's view
    await registry.wait_for(lambda: registry.stats.providers_lost == 1, DEFAULT_TIMEOUT)

    offer = await session.api._call("POST", f"/api/v1/leases/{session.lease}/refund", {}, sign=True)
    message = MessageV0.from_bytes(base64.b64decode(offer["message"]))
    share = offer["provider_share"]
    assert share > 0 and share % PER_SECOND == 0
    assert message.account_keys[0] == session.user.pubkey()  # the user pays the fee
    arbiter = Presigner(session.terms.arbiter, Signature.from_string(offer["arbiter_signature"]))
    signature = await session.escrow.submit(message, [session.user, arbiter], what="refund")
    answer = await session.api._call(
        "POST", f"/api/v1/leases/{session.lease}/refund", {"signature": str(signature)}, sign=True
    )
    settlement = answer["billing"]["settlement"]
    assert settlement["state"] == "done" and settlement["kind"] == "refund"
    assert settlement["signature"] == str(signature) and settlement["amount_lamports"] == share
    await session.books.assert_session_conserved(
        session.before, paid=share, signatures=[session.setup_signature, str(signature)]
    )
    # The worker agrees (escrow closed) and never pays again.
    await settled(coordinator, session.lease)


async def test_a_coordinator_restart_between_setup_and_settlement_settles_once_after_it(
    start_coordinator: CoordinatorStarter, make_host: HostFactory, tmp_path: Any
) -> None:
    port = free_port()
    traits = {"payments": "escrow", "settle_retry_interval": 0.2, "min_deposit_seconds": 1,
              "listen": f"127.0.0.1:{port}"}  # fmt: skip
    first = await start_coordinator(**traits)
    made = Users(first)
    try:
        host = await provider_host(
            market_host_of(make_host, first, tmp_path), first, link_backoff_max=0.3
        )
        session = await made.fund(60)
        await made.run_kernel(session, busy=1.2)
        await first.shutdown()  # escrow open, nothing settled

        second = await start_coordinator(**traits)
        assert host.coordinator_link is not None
        await asyncio.wait_for(host.coordinator_link.wait_linked(2), DEFAULT_TIMEOUT)
        api = CoordinatorClient(second.url, session.user, timeout=DEFAULT_TIMEOUT)
        try:
            await api._call("DELETE", f"/api/v1/leases/{session.lease}", sign=True)
        finally:
            api.close()
        row = await settled(second, session.lease)
        assert row.attempts == 1 and row.amount_lamports > 0, row
        wsol = await session.escrow.wsol_balance(session.terms.provider)
        assert wsol == row.amount_lamports
        # Again, as a duplicated queue entry would: the escrow is closed, nothing moves.
        store, worker = second.store, second.settlements
        assert store is not None and worker is not None
        table = cast(sa.Table, SettlementRow.__table__)
        async with store.engine.begin() as conn:
            await conn.execute(
                sa.update(table).where(table.c.lease_id == session.lease).values(state="pending")
            )
        closed_before = worker.stats.found_closed
        await settled(second, session.lease)
        assert worker.stats.found_closed == closed_before + 1
        assert await session.escrow.wsol_balance(session.terms.provider) == wsol
        await session.books.assert_session_conserved(
            session.before,
            paid=wsol,
            signatures=[row.signature],
            user_fees_before_restart=5_000,  # the setup: one signature
        )
    finally:
        await made.close()


async def test_the_provider_refuses_a_settlement_that_underpays_it(
    coordinator: CoordinatorServer, market_host: HostFactory, users: Users
) -> None:
    host = await provider_host(market_host, coordinator, settle_tolerance_seconds=0)
    session = await users.fund(60)
    await users.run_kernel(session, busy=1.2)
    worker, billing = coordinator.settlements, coordinator.billing
    assert worker is not None and billing is not None
    blockhash = await billing.latest_blockhash()
    provider = str(session.terms.provider)

    def ask(amount: int, terms: EscrowTerms = session.terms) -> Any:
        message = settlement_message(terms, amount, blockhash=blockhash, fee_payer=terms.provider)
        return worker.ask(provider, SignSettlement(session.lease, amount, bytes(message)))

    refused = await ask(0)
    assert isinstance(refused, SettlementRefused) and "delivered" in refused.reason
    other = EscrowTerms(
        Keypair().pubkey(), session.terms.provider, session.terms.arbiter, session.lease
    )
    refused = await ask(60 * PER_SECOND, other)  # another user's escrow
    assert isinstance(refused, SettlementRefused) and "not the settlement" in refused.reason
    signed = await ask(60 * PER_SECOND)  # all of it: plenty
    assert isinstance(signed, SettlementSignature)
    assert host.host_keypair is not None
    # Nothing moved: only the coordinator can add the second signature, and it did not.
    assert await session.escrow.escrow_state(session.terms) is not None


# ---- the provider's book, without a network ------------------------------------------------


def test_the_book_signs_exactly_the_settlement_it_is_owed() -> None:
    host, user, arbiter = Keypair(), Keypair(), Keypair()
    now = [100.0]
    meter = UsageMeter("lease-1", clock=lambda: now[0])
    meter.start()
    now[0] += 100.0  # 100 s delivered
    claims = LeaseClaims(
        lease_id="lease-1", user=user.pubkey(), provider=host.pubkey(), gpu="x", gpu_indices=(0,),
        price_lamports_per_hour=3_600_000, issued_at=0.0, expires_at=1e12,
        coordinator=arbiter.pubkey(), relay=False,
    )  # fmt: skip
    book = SettlementBook(host, tolerance_seconds=10)
    terms = EscrowTerms(user.pubkey(), host.pubkey(), arbiter.pubkey(), "lease-1")
    blockhash = Hash.new_unique()

    def request(amount: int, **kw: Any) -> SignSettlement:
        kw.setdefault("fee_payer", host.pubkey())
        message = settlement_message(terms, amount, blockhash=blockhash, **kw)
        return SignSettlement("lease-1", amount, bytes(message))

    unknown = book.answer(request(90_000), arbiter.pubkey())
    assert isinstance(unknown, SettlementRefused) and unknown.code == "unknown_lease"
    book.admit(claims, meter)
    assert book.owed("lease-1") == 90_000  # (100 - 10) s at 1,000 lamports a second
    short = book.answer(request(89_999), arbiter.pubkey())
    assert isinstance(short, SettlementRefused) and "at least" in short.reason
    assert short.code == "refused"
    wrong_payer = book.answer(request(90_000, fee_payer=arbiter.pubkey()), arbiter.pubkey())
    assert isinstance(wrong_payer, SettlementRefused)
    impostor = book.answer(request(90_000), Keypair().pubkey())
    assert isinstance(impostor, SettlementRefused) and "issued by" in impostor.reason
    tampered = request(90_000)
    tampered = SignSettlement("lease-1", 100_000, tampered.message)  # says more than it pays
    assert isinstance(book.answer(tampered, arbiter.pubkey()), SettlementRefused)
    ok = book.answer(request(90_000), arbiter.pubkey())
    assert isinstance(ok, SettlementSignature)
    signed = MessageV0.from_bytes(request(90_000).message)
    assert Signature.from_string(ok.signature).verify(host.pubkey(), to_bytes_versioned(signed))
    meter.stop()  # the session ended: the lease is still known until settled
    now[0] += 1000.0
    assert book.owed("lease-1") == 90_000 and "lease-1" in book


def test_the_book_keeps_its_records_across_a_restart_privately_and_bounded(tmp_path: Path) -> None:
    host, user, arbiter = Keypair(), Keypair(), Keypair()
    path = tmp_path / "state" / f"settlements-{host.pubkey()}.json"
    path.parent.mkdir(mode=0o700)
    now = [1_000.0]
    terms = EscrowTerms(user.pubkey(), host.pubkey(), arbiter.pubkey(), "lease-1")
    message = settlement_message(
        terms, 90_000, blockhash=Hash.new_unique(), fee_payer=host.pubkey()
    )
    request = SignSettlement("lease-1", 90_000, bytes(message))

    def claims(lease: str) -> LeaseClaims:
        return LeaseClaims(
            lease_id=lease, user=user.pubkey(), provider=host.pubkey(), gpu="x",
            gpu_indices=(0,), price_lamports_per_hour=3_600_000, issued_at=0.0,
            expires_at=1e12, coordinator=arbiter.pubkey(), relay=True,
        )  # fmt: skip

    def book(**kw: Any) -> SettlementBook:
        return SettlementBook(host, path=path, tolerance_seconds=10, clock=lambda: now[0], **kw)

    first = book()
    assert first.load() == 0  # no file yet
    meter = UsageMeter("lease-1")
    first.admit(claims("lease-1"), meter)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    meter.start()
    meter._started = cast(float, meter._started) - 100.0  # 100 s delivered
    meter.report(host)  # seq 1
    meter.stop()
    first.checkpoint()
    saved = json.loads(path.read_text())
    assert saved["provider"] == str(host.pubkey())
    assert [(r["lease"], r["seconds"], r["seq"]) for r in saved["leases"]] == [("lease-1", 100, 1)]
    text = path.read_text()
    assert str(host) not in text and "token" not in text  # no secret key, no token
    assert not [f for f in path.parent.iterdir() if f != path]  # no temporary left behind

    # A new process: the record is back, the same rule signs the same settlement.
    second = book()
    assert second.load() == 1 and "lease-1" in second
    assert second.owed("lease-1") == 90_000
    restored = second.meter("lease-1")
    assert restored is not None and restored.stopped and restored.seconds() == 100
    assert restored.report(host)["seq"] == 2  # seq goes on: the coordinator keeps the report
    short = SignSettlement("lease-1", 89_999, bytes(settlement_message(
        terms, 89_999, blockhash=message.recent_blockhash, fee_payer=host.pubkey())))  # fmt: skip
    assert isinstance(second.answer(short, arbiter.pubkey()), SettlementRefused)
    signed = second.answer(request, arbiter.pubkey())
    assert isinstance(signed, SettlementSignature)
    assert Signature.from_string(signed.signature).verify(
        host.pubkey(), to_bytes_versioned(message)
    )
    assert json.loads(path.read_text())["leases"][0]["signed_at"] == now[0]  # saved at once

    # Signed records go once keep_seconds passed (a signed one, back after a restart, too).
    now[0] += 3_601.0
    third = book()
    assert third.load() == 1 and "lease-1" not in third
    third.checkpoint()
    assert json.loads(path.read_text())["leases"] == []

    # Bounded: the oldest go beyond max_entries, on disk as in memory.
    small = book(max_entries=2)
    for lease in ("a", "b", "c"):
        small.admit(claims(lease), UsageMeter(lease))
    assert [r["lease"] for r in json.loads(path.read_text())["leases"]] == ["b", "c"]

    # Another host's file is not read; a file that does not parse is moved aside.
    assert SettlementBook(Keypair(), path=path).load() == 0
    path.write_text("{not json")
    assert book().load() == 0
    assert path.with_name(path.name + ".corrupt").exists() and not path.exists()


# ---- a real provider host process, restarted between session end and settlement ------------


def _records(path: Path) -> dict[str, Any]:
    """The leases of a settlement records file, by lease id."""
    return {r["lease"]: r for r in json.loads(path.read_text())["leases"]}


async def _stop_host_process(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        return await proc.wait()


async def test_a_restarted_provider_process_still_co_signs_the_settlement_of_its_lease(
    coordinator: CoordinatorServer, users: Users, tmp_path: Path, jupyter_env: Path
) -> None:
    registry, store = coordinator.registry, coordinator.store
    assert registry is not None and store is not None
    keypair = Keypair()
    pubkey = str(keypair.pubkey())
    port = free_port()
    state = tmp_path / "provider-state"
    args = [
        "--coordinator", coordinator.url,
        "--keypair", str(write_keypair(keypair, tmp_path / "host.json")),
        "--workspace", str(tmp_path / "ws"), f"--ProviderConfig.data_dir={state}",
        "--simulate-gpu", "RTX 4090:24", "--price", PRICE_SOL, "--no-benchmark",
        "--listen", f"127.0.0.1:{port}", "--public-url", f"ws://127.0.0.1:{port}/tunnel",
        "--usage-interval", "0.2", "--ProviderConfig.link_backoff_max=0.3",
    ]  # fmt: skip

    def linked() -> bool:
        return (p := registry.provider(pubkey)) is not None and p.linked

    proc, _ = await start_provider_process(*args)
    try:
        await registry.wait_for(linked, DEFAULT_TIMEOUT)
        async with EscrowClient.connect(coordinator.solana_url) as escrow:
            await escrow.airdrop(keypair.pubkey(), LAMPORTS_PER_SOL // 10)  # for its fees
        session = await users.fund(60)
        await users.run_kernel(session, busy=1.5)

        # SIGTERM ends the session (its last usage report and the session's end go out, then
        # the link closes) and the host exits before anyone asked it to co-sign.
        assert await _stop_host_process(proc) == 0
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        # The worker tried, provider away (``attempts`` counts from the claim; ``error`` is
        # written when the attempt is over).
        while (row := await store.get_settlement(session.lease)) is None or row.error is None:
            assert time.monotonic() < deadline, row
            await asyncio.sleep(0.05)
        assert row.state is SettlementState.PENDING and "not linked" in (row.error or ""), row
        ended = await store.get_lease(session.lease)
        assert ended is not None and ended.state is LeaseState.ENDED, ended  # not "lost"
        record = state / f"settlements-{pubkey}.json"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        saved = _records(record)
        assert saved[session.lease]["seconds"] >= 1 and saved[session.lease]["signed_at"] is None

        proc, _ = await start_provider_process(*args)  # a fresh process: nothing in memory
        row = await settled(coordinator, session.lease)
        assert row.signature is not None and row.error is None, row
        assert row.fee_lamports == 10_000  # two signatures: the provider's and the arbiter's
        fees = await session.books.fees([row.signature])
        assert set(fees) == {session.terms.provider}  # it paid the fee: its co-signature
        lease = await session.api._call("GET", f"/api/v1/leases/{session.lease}", sign=True)
        billed = lease["billing"]["billed_seconds"]
        assert billed >= 1 and row.amount_lamports == billed * PER_SECOND
        await paid_through_the_escrow(session, row)
        signed = _records(record)
        assert signed[session.lease]["signed_at"] is not None  # saved at once
    finally:
        assert await _stop_host_process(proc) == 0
