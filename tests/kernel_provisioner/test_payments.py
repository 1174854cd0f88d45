"""Paid kernels end to end: a coordinator subprocess in escrow mode with its embedded ledger
(LiteSVM behind ``{coordinator}/solana``), provider host subprocesses linked to it, real
ipykernels through the tunnel, and real transactions: the provisioner opens each lease's
escrow with the user's wallet before any kernel starts, the coordinator settles it when the
lease ends, and a lost provider's escrow is refunded (user + arbiter co-sign).

Every scenario checks conservation with balances read on-chain: nothing moves but what the
provider was paid, what came back to the user, what is still in escrow, the multisig's
one-time rent, and the fees the chain charged (read from each transaction).

Neither party meters alone: every kernel here acknowledges its usage every
:data:`ACK_INTERVAL` seconds, as a real user's does, and the coordinator bills at most
:data:`ACK_GRACE` seconds past the last acknowledgement; a provider that goes on billing
after the user has gone is paid no more than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from traitlets.config import Config

from jupyter_io.coordinator_client import CoordinatorClient, CoordinatorPaymentError, LeaseInfo
from jupyter_io.errors import InsufficientFunds, KernelLaunchError, PaymentError
from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, format_sol
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms
from jupyter_io.usage_acks import NOT_ACKNOWLEDGED
from kernel_provisioner.lease import BudgetExhausted, LeaseUnaffordable
from kernel_provisioner.provisioner import RemoteKernelProvisioner

from ..escrow_books import Books

RTX_PRICE = 120_000_000  # the relayed provider's RTX 4090: 0.12 SOL/h
#: The kernels' usage acknowledgements, the coordinator's grace past the last one, and how
#: long a lease may go without one: short, so that a bill that did not follow the
#: acknowledgements would show.
ACK_INTERVAL = 0.5
ACK_GRACE = 2
ACK_TIMEOUT = 4
#: Every coordinator of this module: escrow payments, a provider lost after 1.5 s of
#: silence, settlements retried briskly, and escrows accepted from one second's worth.
ESCROW_ARGS = (
    "--CoordinatorConfig.payments=escrow",
    "--heartbeat-interval",
    "0.5",
    "--CoordinatorConfig.settle_retry_interval=0.2",
    "--CoordinatorConfig.min_deposit_seconds=1",
    f"--CoordinatorConfig.usage_ack_grace={ACK_GRACE}",
    f"--CoordinatorConfig.usage_ack_timeout={ACK_TIMEOUT}",
)
SETTLE_TIMEOUT = 30.0
JUPYTER_IO = str(Path(sys.executable).with_name("jupyter-io"))


# -- the ledger, as the tests read it ------------------------------------------------------


class Ledger(Books):
    """The coordinator's embedded ledger through its JSON-RPC endpoint (as any client): the
    escrow client, and the books of :mod:`escrow_books`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.escrow = EscrowClient.connect(url)
        super().__init__(lambda: self.escrow.client)

    async def close(self) -> None:
        await self.escrow.close()


# -- a paid marketplace ---------------------------------------------------------------------


@dataclass
class PaidMarket:
    """A :class:`Market` whose coordinator runs in escrow mode, its parties funded."""

    market: Any
    arbiter: Pubkey

    @property
    def url(self) -> str:
        return str(self.market.coordinator.url)

    @property
    def solana_url(self) -> str:
        return f"{self.url}/solana"

    def client(self) -> Any:
        return self.market.client()

    def terms(self, user: Pubkey, provider: str, lease: str) -> EscrowTerms:
        return EscrowTerms(user, Pubkey.from_string(provider), self.arbiter, lease)


async def fund_parties(market: Any) -> PaidMarket:
    """Airdrop the market's user 2 SOL and each provider 0.1 SOL (they pay the settlement's
    fees and their wSOL account's rent) on the coordinator's embedded ledger."""
    arbiter = Pubkey.from_string(_get_json(f"{market.coordinator.url}/api/v1/info")["arbiter"])
    async with EscrowClient.connect(f"{market.coordinator.url}/solana") as escrow:
        await escrow.airdrop(market.user.pubkey(), 2 * LAMPORTS_PER_SOL)
        for host in (market.relayed, market.direct):
            await escrow.airdrop(Pubkey.from_string(host.pubkey), LAMPORTS_PER_SOL // 10)
    return PaidMarket(market, arbiter)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class AckingSpecs:
    """The ``kernelspecs`` fixture, its leased kernels acknowledging every ACK_INTERVAL."""

    def __init__(self, specs: Any) -> None:
        self.specs = specs

    def install_lease(self, *args: Any, **config: Any) -> str:
        config.setdefault("usage_ack_interval", ACK_INTERVAL)
        return str(self.specs.install_lease(*args, **config))


@pytest.fixture
def kernelspecs(kernelspecs: Any) -> AckingSpecs:
    return AckingSpecs(kernelspecs)


@pytest.fixture(scope="module")
def paid(start_module_market: Any) -> PaidMarket:
    """One escrow marketplace for the module (its relay without a proxy)."""
    return asyncio.run(fund_parties(start_module_market(*ESCROW_ARGS)))


@pytest.fixture
async def ledger(paid: PaidMarket) -> AsyncIterator[Ledger]:
    chain = Ledger(paid.solana_url)
    try:
        yield chain
    finally:
        await chain.close()


@dataclass
class OwnMarket:
    """An escrow marketplace of one test's own (its providers may be killed), its ledger."""

    paid: PaidMarket
    chain: Ledger

    async def kernel(self, kernelspecs: Any, start_kernel: Any, name: str, **config: Any) -> Any:
        """A started kernel leasing the relayed provider's RTX 4090 (``config``: more of the
        provisioner's traits)."""
        market = self.paid.market
        spec = kernelspecs.install_lease(
            name, self.paid.url, market.user_keypair_path, gpu="RTX 4090", **config
        )
        return await start_kernel(spec)


@pytest.fixture
async def own_market(start_market: Any) -> AsyncIterator[OwnMarket]:
    paid = await fund_parties(start_market(*ESCROW_ARGS))
    chain = Ledger(paid.solana_url)
    try:
        yield OwnMarket(paid, chain)
    finally:
        await chain.close()


async def settled(paid: PaidMarket, lease_id: str, timeout: float = SETTLE_TIMEOUT) -> LeaseInfo:
    """The lease once the coordinator's settlement of it is done (the worker retries on a
    timer and publishes no event a test could await: poll its record)."""
    client = paid.client()
    try:
        deadline = time.monotonic() + timeout
        while True:
            info = await client.get_lease(lease_id)
            billing = info.billing
            settlement = billing.settlement if billing is not None else None
            if settlement is not None and settlement.state == "done":
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"lease {lease_id} not settled in {timeout} s: {billing}")
            await asyncio.sleep(0.1)
    finally:
        client.close()


async def lease_info(paid: PaidMarket, lease_id: str, user: Keypair | None = None) -> LeaseInfo:
    """The lease's record, read as its user (the market's unless ``user``)."""
    client = paid.client() if user is None else CoordinatorClient(paid.url, user, timeout=15)
    try:
        return await client.get_lease(lease_id)
    finally:
        client.close()


async def until(predicate: Any, timeout: float, what: str) -> None:
    """Wait for ``predicate()`` (state that changes on a timer elsewhere), at most
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} in {timeout} s")
        await asyncio.sleep(0.05)


def _steps(prov: RemoteKernelProvisioner) -> list[str]:
    return [event.step.value for event in prov.progress]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        JUPYTER_IO, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- a session, from escrow to settlement ----------------------------------------------------


async def test_a_paid_session_escrows_before_the_kernel_and_settles_exactly(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    market = paid.market
    user = market.user.pubkey()
    terms_of = paid.terms  # the escrow's parties, once the lease is known
    name = kernelspecs.install_lease("paid-rtx", paid.url, market.user_keypair_path, gpu="RTX 4090")
    # Every account the session can touch is known before the lease but the escrow's, which
    # does not exist yet: a probe lease's terms snapshot the same balances.
    before = await ledger.snapshot(terms_of(user, market.relayed.pubkey, "probe"))
    assert before.escrow == 0

    km = await start_kernel(name)
    prov: Any = km.provisioner
    grant = prov.lease.grant
    assert grant.provider == market.relayed.pubkey and grant.price_lamports_per_hour == RTX_PRICE
    # Paid before the kernel started: the escrow step comes between lease and launch.
    assert _steps(prov) == ["queued", "leased", "escrowed", "launching", "ready"]
    escrowed = next(e for e in prov.progress if e.step.value == "escrowed")
    terms = terms_of(user, grant.provider, grant.lease)
    assert escrowed.details["escrow"] == str(terms.escrow)
    assert escrowed.details["deposit_lamports"] == RTX_PRICE  # 1 h, the default budget
    state = await ledger.escrow.verify_escrow(terms, RTX_PRICE)
    assert state.amount == RTX_PRICE
    setup = escrowed.details["escrow_signature"]
    assert setup is not None
    # The setup is the only transaction so far, the user's.
    during = await ledger.snapshot(terms)
    fees = await ledger.assert_conserved(
        terms, before, during, paid_to_provider=0, signatures=[setup]
    )
    assert fees == {user: 5_000}, "one signature, the user's"

    # The escrow travels with the provisioner's saved state (no key in it).
    saved = json.loads(json.dumps(await prov.get_provisioner_info()))
    assert saved["lease"]["escrow_account"]["address"] == str(terms.escrow)
    assert saved["lease"]["escrow_account"]["signature"] == setup
    assert "secret" not in json.dumps(saved).lower()

    kc = await cells.connect(km)
    try:
        ex = await cells.run(kc, "import time; time.sleep(2.5); print(6 * 7)")
        assert ex.stream() == "42\n"
    finally:
        kc.stop_channels()
    billing_live = (await lease_info(paid, grant.lease)).billing
    assert billing_live is not None and billing_live.escrow == str(terms.escrow)
    assert billing_live.escrow_signature == setup and billing_live.deposit_lamports == RTX_PRICE

    provider = Pubkey.from_string(grant.provider)
    wsol_before = await ledger.escrow.wsol_balance(provider)
    await asyncio.wait_for(km.shutdown_kernel(), 30)
    info = await settled(paid, grant.lease)
    assert info.state == "ended"
    billing = info.billing
    assert billing is not None and billing.settlement is not None
    settlement = billing.settlement
    assert settlement.kind == "settle"
    # Billed: at least the seconds the cell slept, and exactly price * seconds // 3600.
    assert billing.billed_seconds >= 2
    # The provider's own figure: the user's acknowledgements kept up with it to the end.
    assert billing.billed_seconds == billing.reported_seconds
    assert billing.acknowledged_seconds is not None and billing.acknowledged_seconds >= 2
    assert billing.acknowledged_seconds + ACK_GRACE >= billing.reported_seconds
    assert settlement.amount_lamports == billing.spent_lamports
    assert billing.spent_lamports == RTX_PRICE * billing.billed_seconds // 3600
    after = await ledger.snapshot(terms)
    assert after.escrow == 0, "the escrow is closed"
    assert await ledger.escrow.wsol_balance(provider) - wsol_before == (
        settlement.amount_lamports
    ), "the provider's wSOL gained exactly the billed amount"
    fees = await ledger.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=settlement.amount_lamports,
        signatures=[setup, settlement.signature],
    )
    assert fees[user] == 5_000, "the user signs nothing at settlement, only the setup"
    # The user got back the deposit less the bill, and the escrow's rent.
    assert after.user - during.user == RTX_PRICE - settlement.amount_lamports + (
        state.lamports - state.amount
    )

    # The wallet's history shows the session, exact in lamports with --json.
    code, out, err = await run_cli(
        "wallet", "history", "--json", "--coordinator", paid.url,
        "--keypair", str(market.user_keypair_path),
    )  # fmt: skip
    assert code == 0, err
    (row,) = [r for r in json.loads(out) if r["lease"] == grant.lease]
    assert row["escrow"] == str(terms.escrow) and row["escrow_signature"] == setup
    assert row["billed_seconds"] == billing.billed_seconds
    assert row["settlement"]["signature"] == settlement.signature
    assert row["refunded_lamports"] == RTX_PRICE - settlement.amount_lamports
    code, out, err = await run_cli(
        "wallet", "history", "--coordinator", paid.url, "--keypair", str(market.user_keypair_path)
    )
    assert code == 0, err
    assert f"lease {grant.lease} · RTX 4090 · ended · 0.12 SOL/h" in out
    assert f"settled   done · paid {format_sol(settlement.amount_lamports)}" in out


async def test_a_restart_keeps_the_lease_and_its_escrow(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    market = paid.market
    name = kernelspecs.install_lease(
        "paid-restart", paid.url, market.user_keypair_path, gpu="RTX 4090"
    )
    km = await start_kernel(name)
    prov: Any = km.provisioner
    grant = prov.lease.grant
    escrow = prov.lease.escrow
    terms = paid.terms(market.user.pubkey(), grant.provider, grant.lease)
    during = await ledger.snapshot(terms)
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "x = 'before'")).status == "ok"
        await asyncio.wait_for(km.restart_kernel(), 60)
        assert prov.lease.grant.lease == grant.lease
        assert prov.lease.escrow.address == escrow.address == terms.escrow
        assert _steps(prov).count("escrowed") == 1, "a restart pays nothing more"
        assert await ledger.snapshot(terms) == during, "not a lamport moved for the restart"
        await kc.wait_for_ready(timeout=30)
        assert (await cells.run(kc, "x")).status == "error"  # a fresh kernel
        assert (await cells.run(kc, "print('after restart')")).stream() == "after restart\n"
    finally:
        kc.stop_channels()

    await asyncio.wait_for(km.shutdown_kernel(), 30)
    info = await settled(paid, grant.lease)
    assert info.billing is not None and info.billing.settlement is not None
    settlement = info.billing.settlement
    after = await ledger.snapshot(terms)
    assert after.escrow == 0
    await ledger.assert_conserved(
        terms, during, after, paid_to_provider=settlement.amount_lamports,
        signatures=[settlement.signature],
    )  # fmt: skip


async def test_a_top_up_raises_the_deposit_the_coordinator_counts(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, start_kernel: Any
) -> None:
    market = paid.market
    name = kernelspecs.install_lease(
        "paid-top-up", paid.url, market.user_keypair_path, gpu="RTX 4090", max_session_hours=0.5
    )
    km = await start_kernel(name)
    grant = km.provisioner.lease.grant
    terms = paid.terms(market.user.pubkey(), grant.provider, grant.lease)
    during = await ledger.snapshot(terms)
    assert (await ledger.escrow.verify_escrow(terms, 0)).amount == RTX_PRICE // 2

    code, out, err = await run_cli(
        "wallet", "topup", grant.lease, "0.01", "--coordinator", paid.url,
        "--keypair", str(market.user_keypair_path),
    )  # fmt: skip
    assert code == 0, err
    assert f"Topped up lease {grant.lease} by 0.01 SOL" in out
    total = RTX_PRICE // 2 + LAMPORTS_PER_SOL // 100
    assert (await ledger.escrow.verify_escrow(terms, total)).amount == total
    billing = (await lease_info(paid, grant.lease)).billing
    assert billing is not None and billing.deposit_lamports == total
    top_up_signature = out.split("(signature ")[1].split(")")[0]
    topped = await ledger.snapshot(terms)
    await ledger.assert_conserved(
        terms, during, topped, paid_to_provider=0, signatures=[top_up_signature]
    )

    await asyncio.wait_for(km.shutdown_kernel(), 30)
    info = await settled(paid, grant.lease)
    assert info.billing is not None and info.billing.settlement is not None
    settlement = info.billing.settlement
    after = await ledger.snapshot(terms)
    assert after.escrow == 0
    await ledger.assert_conserved(
        terms, during, after, paid_to_provider=settlement.amount_lamports,
        signatures=[top_up_signature, settlement.signature],
    )  # fmt: skip


async def test_another_process_takes_over_the_lease_and_its_escrow(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    market = paid.market
    name = kernelspecs.install_lease(
        "paid-reattach", paid.url, market.user_keypair_path, gpu="RTX 4090"
    )
    km = await start_kernel(name)
    prov: Any = km.provisioner
    grant, escrow = prov.lease.grant, prov.lease.escrow
    terms = paid.terms(market.user.pubkey(), grant.provider, grant.lease)
    during = await ledger.snapshot(terms)
    info = json.loads(json.dumps(await prov.get_provisioner_info()))
    await prov.detach()
    km.provisioner = None  # the fixture has nothing left to shut down

    km2 = AsyncKernelManager(kernel_name=name)
    prov2 = RemoteKernelProvisioner(
        kernel_id=info["kernel_id"], kernel_spec=km2.kernel_spec,
        keypair_path=str(market.user_keypair_path),
    )  # fmt: skip
    await prov2.load_provisioner_info(info)
    try:
        assert prov2.lease is not None and prov2.lease.escrow == escrow
        # The new process acts on the escrow the first one opened: a top-up.
        funded = await prov2.top_up(LAMPORTS_PER_SOL // 100)
        assert funded.billing is not None
        assert funded.billing.deposit_lamports == RTX_PRICE + LAMPORTS_PER_SOL // 100
        km2.provisioner = prov2
        km2.load_connection_info(prov2.connection_info)
        kc = await cells.connect(km2)
        try:
            assert (await cells.run(kc, "print('reattached')")).stream() == "reattached\n"
        finally:
            kc.stop_channels()
    finally:
        await prov2.cleanup(restart=False)
    settled_info = await settled(paid, grant.lease)
    assert settled_info.billing is not None and settled_info.billing.settlement is not None
    settlement = settled_info.billing.settlement
    after = await ledger.snapshot(terms)
    assert after.escrow == 0
    top_up = [e for e in prov2.progress if e.step.value == "escrowed"]
    assert top_up == [], "the new process opened no escrow of its own"
    await ledger.assert_conserved(
        terms, during, after, paid_to_provider=settlement.amount_lamports,
        signatures=[settlement.signature], other_fees={terms.user: 5_000},  # the top-up's
    )  # fmt: skip


# -- neither party meters alone --------------------------------------------------------------


async def test_a_provider_billing_on_after_the_user_vanished_is_paid_to_the_last_ack_and_grace(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, start_kernel: Any
) -> None:
    """The user's side goes away without a word (its process is gone: no END, no DELETE, no
    more acknowledgements); the provider host keeps the kernel for a resume and meters it.
    The coordinator ends the lease once the acknowledgements are overdue, long before the
    deposit runs out, and the provider is paid for the user's last acknowledgement plus the
    grace, not for its own figure; the user gets the rest back."""
    market = paid.market
    budget = 60 / 3600  # a minute of the RTX's price
    name = kernelspecs.install_lease(
        "paid-vanish", paid.url, market.user_keypair_path, gpu="RTX 4090",
        max_session_hours=budget,
    )  # fmt: skip
    km = await start_kernel(name)
    prov: Any = km.provisioner
    lease = prov.lease
    grant = lease.grant
    terms = paid.terms(market.user.pubkey(), grant.provider, grant.lease)
    during = await ledger.snapshot(terms)
    wsol_before = await ledger.escrow.wsol_balance(terms.provider)
    deposit = lease.escrow.deposit
    await until(lambda: lease.acked_seconds >= 1, 15, "acknowledged")
    await prov.detach()  # what is left of the user's side when its process is killed
    km.provisioner = None  # nothing for the fixture to shut down
    gone = time.monotonic()

    info = await settled(paid, grant.lease)
    assert info.end_reason == NOT_ACKNOWLEDGED, info  # nobody came back to end it
    assert info.ended_at is not None and info.active_at is not None
    assert info.ended_at - info.active_at < 30, "ended long before the budget's minute"
    assert time.monotonic() - gone < 30
    billing = info.billing
    assert billing is not None and billing.settlement is not None
    acked = billing.acknowledged_seconds
    assert acked is not None and acked >= 1
    # The provider's figure: the kernel it kept until the deposit was spent.
    assert billing.reported_seconds > acked + ACK_GRACE, billing
    assert billing.billed_seconds == acked + ACK_GRACE
    paid_out = billing.settlement.amount_lamports
    assert paid_out == billing.spent_lamports == RTX_PRICE * (acked + ACK_GRACE) // 3600
    assert paid_out < deposit
    after = await ledger.snapshot(terms)
    assert after.escrow == 0
    assert await ledger.escrow.wsol_balance(terms.provider) - wsol_before == paid_out
    await ledger.assert_conserved(
        terms, during, after, paid_to_provider=paid_out,
        signatures=[billing.settlement.signature],
    )  # fmt: skip


# -- no kernel without funds -----------------------------------------------------------------


async def test_a_wallet_too_poor_starts_no_kernel_and_says_what_it_needs(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, tmp_path: Path
) -> None:
    market = paid.market
    poor = Keypair()
    held = LAMPORTS_PER_SOL // 100  # 0.01 SOL, the escrow needs 0.12 and rent
    await ledger.escrow.airdrop(poor.pubkey(), held)
    path = write_keypair(poor, tmp_path / "poor.json")
    name = kernelspecs.install_lease("paid-poor", paid.url, path, gpu="RTX 4090")
    kernels_before = len(market.relayed.descendants())

    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(KernelLaunchError) as caught:
        await asyncio.wait_for(km.start_kernel(), 60)
    exc = caught.value
    assert isinstance(exc, LeaseUnaffordable) and isinstance(exc, InsufficientFunds)
    message = str(exc)
    assert "escrow needs 0.12" in message, message
    assert f"wallet {poor.pubkey()} holds 0.01 SOL" in message, message
    assert "airdrop" in message
    prov: Any = km.provisioner
    # The progress board's error says the same.
    assert prov.progress[-1].step.value == "failed" and prov.progress[-1].message == message
    assert "escrowed" not in _steps(prov) and "launching" not in _steps(prov)
    # No kernel, no session, no lease left; not a lamport moved (no transaction was sent).
    assert prov.tunnel is None and prov.lease is None
    assert len(market.relayed.descendants()) == kernels_before
    lease_id = next(e for e in prov.progress if e.step.value == "leased").details["lease"]
    info = await lease_info(paid, lease_id, poor)
    assert info.state == "ended" and not info.live
    assert (await ledger.escrow.balance(poor.pubkey())) == held


async def test_an_unreachable_ledger_is_a_clear_error_and_leaves_no_lease(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any
) -> None:
    market = paid.market
    url = f"http://127.0.0.1:{_closed_port()}/solana"
    name = kernelspecs.install_lease(
        "paid-no-rpc", paid.url, market.user_keypair_path, gpu="RTX 4090"
    )
    user = market.user.pubkey()
    held = await ledger.escrow.balance(user)
    km = AsyncKernelManager(
        kernel_name=name, config=Config({"SolanaEscrowHook": {"solana_url": url}})
    )
    with pytest.raises(KernelLaunchError) as caught:
        await asyncio.wait_for(km.start_kernel(), 60)
    assert isinstance(caught.value, PaymentError)
    message = str(caught.value)
    assert f"cannot reach the Solana RPC at {url}" in message, message
    assert "Solana URL" in message
    prov: Any = km.provisioner
    assert prov.progress[-1].step.value == "failed"
    lease_id = next(e for e in prov.progress if e.step.value == "leased").details["lease"]
    assert (await lease_info(paid, lease_id)).state == "ended"
    assert prov.lease is None and prov.tunnel is None
    assert await ledger.escrow.balance(user) == held


async def test_a_free_hook_refuses_a_paid_lease(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any
) -> None:
    """FreeHook is never a way around paying: configured against an escrow coordinator, the
    start fails and the lease ends."""
    market = paid.market
    name = kernelspecs.install_lease(
        "paid-free-hook", paid.url, market.user_keypair_path, gpu="RTX 4090",
        payment_hook_class="jupyter_io.payments.hooks.FreeHook",
    )  # fmt: skip
    km = AsyncKernelManager(kernel_name=name, config=Config({"FreeHook": {"allow_free": True}}))
    with pytest.raises(Exception, match="FreeHook serves only free pools"):
        await asyncio.wait_for(km.start_kernel(), 60)
    prov: Any = km.provisioner
    lease_id = next(e for e in prov.progress if e.step.value == "leased").details["lease"]
    assert (await lease_info(paid, lease_id)).state == "ended"


async def test_a_budget_below_the_coordinators_minimum_is_refused_before_any_transaction(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any
) -> None:
    market = paid.market
    # 0.0001 h = 0.36 s of the price, below the coordinator's minimum of one second's.
    name = kernelspecs.install_lease(
        "paid-tiny", paid.url, market.user_keypair_path, gpu="RTX 4090",
        max_session_hours=0.0001,
    )  # fmt: skip
    user = market.user.pubkey()
    held = await ledger.escrow.balance(user)
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(LeaseUnaffordable) as caught:
        await asyncio.wait_for(km.start_kernel(), 60)
    message = str(caught.value)
    minimum = -(-RTX_PRICE // 3600)  # one second's price, rounded up
    assert f"below the coordinator's minimum deposit of {format_sol(minimum)}" in message
    assert "max_session_hours" in message
    prov: Any = km.provisioner
    lease_id = next(e for e in prov.progress if e.step.value == "leased").details["lease"]
    assert (await lease_info(paid, lease_id)).state == "ended"
    assert await ledger.escrow.balance(user) == held, "no transaction was sent"


async def test_the_coordinator_issues_no_token_before_it_verified_enough_escrow(
    paid: PaidMarket, ledger: Ledger
) -> None:
    """The escrow endpoint through CoordinatorClient: refusals carry the coordinator's
    message and map to payment errors; a top-up re-verified raises the recorded deposit."""
    market = paid.market
    user = market.user
    client = paid.client()
    try:
        grant = await client.request_lease("RTX 4090")
        assert grant.token is None and grant.needs_escrow and grant.state == "requested"
        assert grant.escrow is not None and grant.escrow.arbiter == str(paid.arbiter)
        assert grant.escrow.solana_url == paid.solana_url
        minimum = grant.escrow.min_deposit_lamports
        assert minimum == -(-grant.price_lamports_per_hour // 3600)
        terms = paid.terms(user.pubkey(), grant.provider, grant.lease)
        before = await ledger.snapshot(terms)

        with pytest.raises(CoordinatorPaymentError) as missing:
            await client.fund_lease(grant.lease, None)
        assert (missing.value.status, missing.value.code) == (402, "escrow_missing")
        with pytest.raises(PaymentError):
            await client.renew_token(grant.lease)

        opened = await ledger.escrow.open_escrow(
            user, terms.provider, terms.arbiter, grant.lease, minimum - 1
        )
        with pytest.raises(InsufficientFunds) as small:
            await client.fund_lease(grant.lease, str(opened.signature))
        assert format_sol(minimum - 1) in str(small.value), str(small.value)

        topped = await ledger.escrow.top_up(terms, 1, user)
        funded = await client.fund_lease(grant.lease, str(topped.signature))
        assert funded.token is not None and funded.billing is not None
        assert funded.billing.deposit_lamports == minimum
        assert funded.billing.escrow == str(terms.escrow)

        ended = await client.end_lease(grant.lease)
        assert ended.state == "ended"
    finally:
        client.close()
    # No kernel ever ran: the provider co-signs no settlement of it; the user refunds it.
    code, out, err = await run_cli(
        "wallet", "refund", grant.lease, "--coordinator", paid.url,
        "--keypair", str(market.user_keypair_path),
    )  # fmt: skip
    assert code == 0, err
    assert f"Refunded lease {grant.lease}" in out and "the provider got 0 SOL" in out
    refund = out.split("(signature ")[1].split(")")[0]
    info = await settled(paid, grant.lease, timeout=5)
    assert info.billing is not None and info.billing.settlement is not None
    assert info.billing.settlement.amount_lamports == 0
    after = await ledger.snapshot(terms)
    assert after.escrow == 0
    fees = await ledger.assert_conserved(
        terms, before, after, paid_to_provider=0,
        signatures=[str(opened.signature), str(topped.signature), refund],
    )  # fmt: skip
    assert fees == {user.pubkey(): 20_000}, "setup, top-up, and the refund's two signatures"


# -- the provider fails --------------------------------------------------------------------


async def test_a_lost_provider_is_paid_only_what_it_delivered_and_the_user_refunded(
    own_market: OwnMarket, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    own, chain = own_market.paid, own_market.chain
    market = own.market
    # Failover off: the market's other RTX 4090 would take the kernel over, and this tests
    # the path where a lost provider ends the kernel and the user is refunded.
    km = await own_market.kernel(kernelspecs, start_kernel, "paid-lost", failover=False)
    prov: Any = km.provisioner
    grant = prov.lease.grant
    assert grant.provider == market.relayed.pubkey
    terms = own.terms(market.user.pubkey(), grant.provider, grant.lease)
    during = await chain.snapshot(terms)
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "import time; time.sleep(1.5)")).status == "ok"
    finally:
        kc.stop_channels()

    market.relayed.proc.kill()
    assert await prov.tunnel.wait_exited(timeout=20) is not None
    assert not await km.is_alive()
    await asyncio.wait_for(km.shutdown_kernel(now=True), 60)

    # The provisioner's cleanup refunded: the escrow is closed by a transaction the user
    # and the arbiter signed, and the coordinator knows.
    info = await settled(own, grant.lease, timeout=5)
    assert info.state == "failed"
    assert info.billing is not None and info.billing.settlement is not None
    settlement = info.billing.settlement
    assert settlement.kind == "refund" and settlement.signature is not None
    after = await chain.snapshot(terms)
    assert after.escrow == 0
    fees = await chain.assert_conserved(
        terms, during, after, paid_to_provider=settlement.amount_lamports,
        signatures=[settlement.signature],
    )  # fmt: skip
    assert fees == {terms.user: 10_000}, "the user pays the refund's two signatures"
    # The provider's share covers at most the time it ran (here, about the cell's).
    assert settlement.amount_lamports <= RTX_PRICE * 30 // 3600


async def test_a_restart_after_a_lost_provider_pays_a_new_escrow_and_refunds_the_old(
    own_market: OwnMarket, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    own, chain = own_market.paid, own_market.chain
    market = own.market
    # Failover off: the kernel is to die with its provider, and the restart pays anew.
    km = await own_market.kernel(kernelspecs, start_kernel, "paid-relost", failover=False)
    prov: Any = km.provisioner
    first = prov.lease.grant
    first_terms = own.terms(market.user.pubkey(), first.provider, first.lease)
    first_during = await chain.snapshot(first_terms)

    market.relayed.proc.kill()
    assert await prov.tunnel.wait_exited(timeout=20) is not None
    await asyncio.wait_for(km.restart_kernel(now=True), 60)
    second = prov.lease.grant
    assert second.lease != first.lease and second.provider == market.direct.pubkey
    second_terms = own.terms(market.user.pubkey(), second.provider, second.lease)
    assert prov.lease.escrow.address == second_terms.escrow != first_terms.escrow
    assert _steps(prov).count("escrowed") == 2
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "print('elsewhere')")).stream() == "elsewhere\n"
    finally:
        kc.stop_channels()

    # The old escrow is refunded in the background, without holding up the new kernel.
    first_info = await settled(own, first.lease)
    first_settlement = first_info.billing.settlement  # type: ignore[union-attr]
    assert first_settlement is not None and first_settlement.kind == "refund"
    first_after = await chain.snapshot(first_terms)
    assert first_after.escrow == 0

    second_during = await chain.snapshot(second_terms)
    await asyncio.wait_for(km.shutdown_kernel(), 30)
    second_info = await settled(own, second.lease)
    second_settlement = second_info.billing.settlement  # type: ignore[union-attr]
    assert second_settlement is not None and second_settlement.kind == "settle"
    second_after = await chain.snapshot(second_terms)
    assert second_after.escrow == 0
    await chain.assert_conserved(
        second_terms, second_during, second_after,
        paid_to_provider=second_settlement.amount_lamports,
        signatures=[second_settlement.signature],
    )  # fmt: skip
    # The first escrow's accounts, which the second session did not touch but for the
    # user's wallet: checked over the refund alone.
    assert (
        first_after.provider
        + first_after.provider_wsol
        - (first_during.provider + first_during.provider_wsol)
        == first_settlement.amount_lamports
    )


# -- the budget ------------------------------------------------------------------------------


async def test_a_spent_budget_ends_the_kernel_and_no_restart_leases_again(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any
) -> None:
    market = paid.market
    # 0.001 h = 3.6 s of the RTX's price: the coordinator ends the lease after that.
    name = kernelspecs.install_lease(
        "paid-budget", paid.url, market.user_keypair_path, gpu="RTX 4090",
        max_session_hours=0.001,
    )  # fmt: skip
    km = AsyncKernelManager(kernel_name=name)
    await asyncio.wait_for(km.start_kernel(), 60)
    prov: Any = km.provisioner
    try:
        grant = prov.lease.grant
        deposit = RTX_PRICE // 1000
        assert prov.lease.escrow.deposit == deposit
        # The coordinator ends the lease when the deposit is spent; the kernel goes with it.
        assert await prov.tunnel.wait_exited(timeout=30) is not None
        info = await lease_info(paid, grant.lease)
        assert info.state == "ended" and info.end_reason == "budget exhausted", info
        assert info.budget_exhausted

        # What the auto-restarter would do: it must not lease and pay again.
        with pytest.raises(BudgetExhausted) as caught:
            await asyncio.wait_for(km.restart_kernel(now=True), 60)
        message = str(caught.value)
        assert f"the budget of lease {grant.lease} ran out" in message, message
        assert "max_session_hours" in message and "topup" in message
        assert prov.progress[-1].step.value == "failed" and prov.progress[-1].message == message
        assert _steps(prov).count("leased") == 1 and _steps(prov).count("escrowed") == 1
        assert market.status()["live_leases"] == 0
        # Over for good: the facade is released now (Jupyter Server drops such a kernel
        # without cleanup(); a facade left to the garbage collector blocks in term()).
        assert prov._facade is None and prov.tunnel is None
        # The auto-restarter tries again (up to its restart_limit): every try is refused
        # the same way, at once, and none leases or pays.
        with pytest.raises(BudgetExhausted) as again:
            await asyncio.wait_for(km.restart_kernel(now=True), 5)
        assert str(again.value) == message
        assert _steps(prov).count("leased") == 1 and _steps(prov).count("escrowed") == 1
        assert market.status()["live_leases"] == 0

        # The spent deposit went to the provider, exactly what was billed.
        info = await settled(paid, grant.lease)
        assert info.billing is not None and info.billing.settlement is not None
        assert info.billing.settlement.amount_lamports == info.billing.spent_lamports <= deposit
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(km.shutdown_kernel(now=True), 30)
        if km.provisioner is not None:
            await km.provisioner.cleanup(restart=False)
