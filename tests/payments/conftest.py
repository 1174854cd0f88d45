"""Fixtures for the payment tests: a real embedded ledger behind its JSON-RPC endpoint.

Nothing is mocked: :class:`Chain` runs :class:`EmbeddedLedger` (LiteSVM with the real SPL
Token programs) over HTTP, and every test talks to it through solana-py's ``AsyncClient``
exactly as it would talk to a cluster. :class:`Books` snapshots every balance an escrow can
touch and checks the conservation invariant between two snapshots.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms
from jupyter_io.payments.ledger import EmbeddedLedger, SqlLedgerStore
from jupyter_io.payments.rpc import LedgerServer, serve_ledger


class Chain:
    """An embedded ledger stored in ``path``, served on 127.0.0.1, with clients attached."""

    def __init__(self, path: Path, clock: Callable[[], float] | None = None) -> None:
        self.path = path
        self.clock = clock
        self.store: SqlLedgerStore
        self.ledger: EmbeddedLedger
        self.server: LedgerServer
        self.client: AsyncClient
        self.escrow: EscrowClient

    async def start(self) -> Chain:
        self.store = SqlLedgerStore.sqlite(self.path)
        options = {"clock": self.clock} if self.clock is not None else {}
        self.ledger = await EmbeddedLedger.open(self.store, **options)
        self.server = await serve_ledger(self.ledger)
        self.client = AsyncClient(self.server.url)
        self.escrow = EscrowClient(self.client)
        return self

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        await self.client.close()
        await self.server.stop()

    async def restart(self) -> None:
        """Stop everything (ledger included) and start again from the stored accounts only."""
        await self.stop()
        await self.start()

    async def balance(self, pubkey: Pubkey) -> int:
        return (await self.client.get_balance(pubkey)).value

    async def fees(self, signatures: Iterable[Signature | None]) -> dict[Pubkey, int]:
        """Fees the chain charged for ``signatures``, by fee payer (from getTransaction)."""
        charged: dict[Pubkey, int] = {}
        for signature in signatures:
            if signature is None:
                continue
            resp = await self.client.get_transaction(
                signature, encoding="base64", max_supported_transaction_version=0
            )
            assert resp.value is not None, f"{signature} is unknown to the ledger"
            tx = resp.value.transaction
            assert tx.meta is not None
            payer = tx.transaction.message.account_keys[0]
            charged[payer] = charged.get(payer, 0) + tx.meta.fee
        return charged


@dataclass(frozen=True)
class Snapshot:
    """Lamports of every account an escrow can touch."""

    user: int
    provider: int
    provider_wsol: int
    arbiter: int
    multisig: int
    escrow: int

    @property
    def total(self) -> int:
        return (
            self.user + self.provider + self.provider_wsol + self.arbiter + self.multisig
            + self.escrow
        )  # fmt: skip


class Books:
    """Conservation checks: every escrowed lamport is with the provider, back with the user,
    or still in escrow; nothing else moves but fees (exactly what the chain charged) and the
    multisig's one-time rent."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    async def snapshot(self, terms: EscrowTerms) -> Snapshot:
        keys = [
            terms.user,
            terms.provider,
            terms.provider_wsol,
            terms.arbiter,
            terms.multisig,
            terms.escrow,
        ]
        accounts = (await self.chain.client.get_multiple_accounts(keys)).value
        lamports = [a.lamports if a is not None else 0 for a in accounts]
        return Snapshot(*lamports)

    async def assert_conserved(
        self,
        terms: EscrowTerms,
        before: Snapshot,
        after: Snapshot,
        *,
        paid_to_provider: int,
        signatures: Iterable[Signature | None],
        reported_fees: int | None = None,
    ) -> None:
        fees = await self.chain.fees(signatures)
        total_fees = sum(fees.values())
        if reported_fees is not None:
            assert reported_fees == total_fees, "the fees reported differ from those charged"
        user_fees = fees.get(terms.user, 0)
        provider_fees = fees.get(terms.provider, 0)
        arbiter_fees = fees.get(terms.arbiter, 0)
        assert set(fees) <= {terms.user, terms.provider, terms.arbiter}
        # Nothing is created or destroyed except the fees the chain burnt.
        assert after.total == before.total - total_fees
        # The provider gains exactly what it was paid, less the fees it paid (the rent of its
        # wSOL account moves from its wallet into that account: still the provider's).
        provider_before = before.provider + before.provider_wsol
        provider_after = after.provider + after.provider_wsol
        assert provider_after - provider_before == paid_to_provider - provider_fees
        # The arbiter never gains anything.
        assert after.arbiter - before.arbiter == -arbiter_fees
        # What left the user went to the provider, into escrow, into the multisig's rent, or
        # to fees; the rest came back.
        into_escrow = after.escrow - before.escrow
        into_multisig = after.multisig - before.multisig
        assert before.user - after.user == (
            paid_to_provider + into_escrow + into_multisig + user_fees
        )


@dataclass(frozen=True)
class Parties:
    user: Keypair
    provider: Keypair
    arbiter: Keypair

    def terms(self, session_id: str) -> EscrowTerms:
        return EscrowTerms(
            self.user.pubkey(), self.provider.pubkey(), self.arbiter.pubkey(), session_id
        )


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await Chain(tmp_path / "ledger.sqlite").start()
    try:
        yield chain
    finally:
        await chain.stop()


@pytest.fixture
def books(chain: Chain) -> Books:
    return Books(chain)


@pytest.fixture
async def parties(chain: Chain) -> Parties:
    """A user with 2 SOL, a provider with 0.1 SOL (for fees), an arbiter with 0.01 SOL."""
    parties = Parties(Keypair(), Keypair(), Keypair())
    await chain.escrow.airdrop(parties.user.pubkey(), 2 * LAMPORTS_PER_SOL)
    await chain.escrow.airdrop(parties.provider.pubkey(), LAMPORTS_PER_SOL // 10)
    await chain.escrow.airdrop(parties.arbiter.pubkey(), LAMPORTS_PER_SOL // 100)
    return parties
