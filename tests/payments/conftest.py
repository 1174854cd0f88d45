"""Fixtures for the payment tests: a real embedded ledger behind its JSON-RPC endpoint.

Nothing is mocked: :class:`Chain` runs :class:`EmbeddedLedger` (LiteSVM with the real SPL
Token programs) over HTTP, and every test talks to it through solana-py's ``AsyncClient``
exactly as it would talk to a cluster. The ``books`` fixture (:class:`escrow_books.Books`)
snapshots every balance an escrow can touch and checks the conservation invariant between
two snapshots.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.coordinator.embedded_ledger import EmbeddedLedger
from jupyter_io.coordinator.ledger_rpc import LedgerServer, serve_ledger
from jupyter_io.coordinator.store import SqlLedgerStore
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms

from ..escrow_books import Books


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
    return Books(lambda: chain.client)


@pytest.fixture
async def parties(chain: Chain) -> Parties:
    """A user with 2 SOL, a provider with 0.1 SOL (for fees), an arbiter with 0.01 SOL."""
    parties = Parties(Keypair(), Keypair(), Keypair())
    await chain.escrow.airdrop(parties.user.pubkey(), 2 * LAMPORTS_PER_SOL)
    await chain.escrow.airdrop(parties.provider.pubkey(), LAMPORTS_PER_SOL // 10)
    await chain.escrow.airdrop(parties.arbiter.pubkey(), LAMPORTS_PER_SOL // 100)
    return parties
