"""The books of an escrow: the balance of every account it can touch, and the conservation
check the payments contract promises (docs/payments-contract.md, section 5).

Every lamport escrowed ends with the provider, back with the user, or still in escrow;
nothing else moves but the fees the chain charged and the multisig's one-time rent. The
payment, provider host and provisioner tests all end their scenarios with this check:
import it relatively (``from ..escrow_books import Books, Snapshot``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from solana.rpc.async_api import AsyncClient
from solders.pubkey import Pubkey
from solders.signature import Signature

from jupyter_io.payments.escrow import EscrowTerms


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
    """Snapshots and the conservation check, through a ledger's JSON-RPC.

    ``client`` returns the RPC client to ask: a callable, so that a test which restarts its
    ledger (and so replaces its client) keeps one ``Books``.
    """

    def __init__(self, client: Callable[[], AsyncClient]) -> None:
        self._client = client

    async def snapshot(self, terms: EscrowTerms) -> Snapshot:
        keys = [
            terms.user,
            terms.provider,
            terms.provider_wsol,
            terms.arbiter,
            terms.multisig,
            terms.escrow,
        ]
        accounts = (await self._client().get_multiple_accounts(keys)).value
        return Snapshot(*[a.lamports if a is not None else 0 for a in accounts])

    async def fees(self, signatures: Iterable[Signature | str | None]) -> dict[Pubkey, int]:
        """What the chain charged for each transaction, by fee payer (a transaction that
        failed is charged too)."""
        charged: dict[Pubkey, int] = {}
        for signature in signatures:
            if signature is None:
                continue
            if isinstance(signature, str):
                signature = Signature.from_string(signature)
            resp = await self._client().get_transaction(
                signature, encoding="base64", max_supported_transaction_version=0
            )
            assert resp.value is not None, f"{signature} is unknown to the ledger"
            tx = resp.value.transaction
            assert tx.meta is not None
            payer = tx.transaction.message.account_keys[0]  # type: ignore[union-attr]
            charged[payer] = charged.get(payer, 0) + tx.meta.fee
        return charged

    async def assert_conserved(
        self,
        terms: EscrowTerms,
        before: Snapshot,
        after: Snapshot,
        *,
        paid_to_provider: int,
        signatures: Iterable[Signature | str | None],
        reported_fees: int | None = None,
        other_fees: dict[Pubkey, int] | None = None,
    ) -> dict[Pubkey, int]:
        """Check the invariant between ``before`` and ``after``; return the fees by payer.

        ``signatures``: every transaction between the two snapshots (their fees are read
        from the ledger); ``reported_fees``: what our code said those transactions cost, to
        compare; ``other_fees``: fees of transactions the ledger no longer lists (its history
        does not survive a restart; its accounts do) or whose signature the test never saw.
        """
        fees = await self.fees(signatures)
        if reported_fees is not None:
            charged = sum(fees.values())
            assert reported_fees == charged, "the fees reported differ from those charged"
        for payer, fee in (other_fees or {}).items():
            fees[payer] = fees.get(payer, 0) + fee
        assert set(fees) <= {terms.user, terms.provider, terms.arbiter}, fees
        # Nothing is created or destroyed except the fees the chain burnt.
        assert after.total == before.total - sum(fees.values())
        # The provider gains exactly what it was paid, less the fees it paid (the rent of its
        # wSOL account moves from its wallet into that account: still the provider's).
        provider_gain = (after.provider + after.provider_wsol) - (
            before.provider + before.provider_wsol
        )
        assert provider_gain == paid_to_provider - fees.get(terms.provider, 0)
        # The arbiter never gains anything.
        assert after.arbiter - before.arbiter == -fees.get(terms.arbiter, 0)
        # What left the user went to the provider, into escrow, into the multisig's rent (the
        # first session of a user/provider/arbiter triple), or to fees; the rest came back.
        assert before.user - after.user == (
            paid_to_provider
            + (after.escrow - before.escrow)
            + (after.multisig - before.multisig)
            + fees.get(terms.user, 0)
        )
        return fees
