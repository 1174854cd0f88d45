"""The books of a cohort pool: every account an allowance and its sessions can touch, and the
conservation check of docs/payments-contract.md section 6 (the counterpart of
``escrow_books.py`` for cohort sessions).

Every lamport the instructor put in an allowance ends with a provider (for service), back
with the instructor (reclaimed, or a remainder after its allowance was closed), in the
allowance, in an open escrow, or in the one-time rents of the delegate and escrow multisigs;
the arbiter fronts rents and fees and gets them all back; the student's wallet never moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from solana.rpc.async_api import AsyncClient
from solders.pubkey import Pubkey
from solders.signature import Signature

from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortSession

from .escrow_books import Books


@dataclass(frozen=True)
class CohortSnapshot:
    """Lamports of every account of one allowance and its sessions' escrows."""

    instructor: int
    student: int
    provider: int
    provider_wsol: int
    arbiter: int
    arbiter_wsol: int
    allowance: int
    delegate: int
    multisig: int
    escrows: int

    @property
    def total(self) -> int:
        return (
            self.instructor + self.student + self.provider + self.provider_wsol + self.arbiter
            + self.arbiter_wsol + self.allowance + self.delegate + self.multisig + self.escrows
        )  # fmt: skip


class CohortBooks:
    """Snapshots and the conservation check for the sessions of one allowance (all with one
    provider), read through a ledger's JSON-RPC."""

    def __init__(self, client: Callable[[], AsyncClient]) -> None:
        self._client = client
        self._fees = Books(client)

    async def snapshot(
        self, sessions: Sequence[CohortSession], others: Sequence[AllowanceTerms] = ()
    ) -> CohortSnapshot:
        """Balances now; ``others``: more allowances of the instructor, counted with the
        first session's allowance and delegate."""
        first = sessions[0]
        a, e = first.allowance, first.escrow
        keys = [
            a.instructor,
            a.student,
            e.provider,
            e.provider_wsol,
            a.arbiter,
            first.arbiter_wsol,
            a.allowance,
            a.delegate,
            e.multisig,
            *(s.escrow.escrow for s in sessions),
        ]
        for other in others:
            keys += [other.allowance, other.delegate]
        accounts = (await self._client().get_multiple_accounts(keys)).value
        values = [x.lamports if x is not None else 0 for x in accounts]
        n = 9 + len(sessions)
        extra = values[n:]
        values[6] += sum(extra[0::2])
        values[7] += sum(extra[1::2])
        (ins, stu, prov, prov_wsol, arb, arb_wsol, allowance, delegate, multisig) = values[:9]
        return CohortSnapshot(
            ins,
            stu,
            prov,
            prov_wsol,
            arb,
            arb_wsol,
            allowance,
            delegate,
            multisig,
            sum(values[9:n]),
        )

    async def assert_conserved(
        self,
        sessions: Sequence[CohortSession],
        before: CohortSnapshot,
        after: CohortSnapshot,
        *,
        paid_to_provider: int,
        signatures: Iterable[Signature | str | None],
        rent_in_open_escrows: int = 0,
    ) -> dict[Pubkey, int]:
        """Check the invariant; return the fees by payer. ``rent_in_open_escrows``: the
        change, between the snapshots, of the escrow rent the arbiter has out in escrows
        still open (its only lamports not yet back)."""
        a, e = sessions[0].allowance, sessions[0].escrow
        fees = await self._fees.fees(signatures)
        assert set(fees) <= {a.instructor, e.provider, a.arbiter}, fees
        assert after.total == before.total - sum(fees.values())
        # The student needs no SOL and spends none.
        assert after.student == before.student
        provider_gain = (after.provider + after.provider_wsol) - (
            before.provider + before.provider_wsol
        )
        assert provider_gain == paid_to_provider - fees.get(e.provider, 0)
        # The arbiter fronts rents and fees and is paid back all of it (the escrow rent when
        # the escrow closes): it never gains, and loses only the rent still out.
        arbiter_gain = (after.arbiter + after.arbiter_wsol) - (before.arbiter + before.arbiter_wsol)
        assert arbiter_gain == -rent_in_open_escrows
        # What left the pool (instructor + allowance) went to the provider, into open escrows,
        # into the one-time multisig rents, or to fees (the arbiter's, reimbursed, included).
        pool_loss = (before.instructor + before.allowance) - (after.instructor + after.allowance)
        assert pool_loss == (
            paid_to_provider
            + (after.escrows - before.escrows)
            - rent_in_open_escrows
            + (after.multisig - before.multisig)
            + (after.delegate - before.delegate)
            + fees.get(a.instructor, 0)
            + fees.get(a.arbiter, 0)
        )
        return fees
