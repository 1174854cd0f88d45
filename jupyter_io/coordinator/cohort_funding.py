"""Funding a cohort lease from the student's allowance (docs/payments-contract.md section 6).

``POST /api/v1/leases/{id}/cohort-funding`` (signed once, the lease's student):

* ``{}`` → ``200 {"message": "<base64 MessageV0>", "deposit_lamports": N, "escrow",
  "allowance", "fee_payer"}``: the arbiter checks that the lease is a live, unfunded cohort
  lease of the caller, who is still a student of that cohort, and that the allowance is
  exactly as agreed on-chain; the deposit is min(the cohort's session length, what the
  student's week quota has left, what the allowance can spend after the arbiter's
  reimbursement) at the lease's price, and at least the usual minimum deposit. It builds the
  funding message (:func:`~jupyter_io.payments.cohort_pool.funding_message`, fee payer the
  arbiter) and keeps it for the lease.
* ``{"signature": "<base58>"}`` (optionally with ``"message"``, which must be byte for byte
  the one handed out) → the student's signature over that exact message is checked, the
  arbiter co-signs and submits it; once it landed, the usual verify / record / grant path of
  ``POST /leases/{id}/escrow`` runs and the answer is that grant (token included).

The arbiter signs nothing but a message it built itself for that lease: a message changed by
the student, or a signature over anything else, is refused (400) and nothing is signed.
Errors: 400 ``bad_request`` / ``tampered``, 402 ``deposit_too_small`` (allowance or quota
spent), 402 ``escrow_missing`` (no allowance), 403 ``forbidden`` (not the student, or no
longer in the cohort), 409 ``not_cohort`` (a plain lease: use ``/escrow``), 409 ``not_live``,
409 ``conflict`` (already funded, or no message handed out / it expired: ask again), 503
``ledger_unreachable``.
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature

from ..cohorts import week_start
from ..errors import JupyterIOError, PaymentError
from ..payments.amounts import format_sol, min_deposit
from ..payments.cohort_pool import CohortPoolClient, CohortPoolError, CohortSession
from ..payments.escrow import EscrowError, TransactionFailed
from .billing import Billing, DepositTooSmall, EscrowMissing, LedgerUnreachable
from .handlers import API_PREFIX, _ApiHandler, _json_body
from .leasing import LeaseService
from .store import LeaseRecord, Store

__all__ = [
    "CohortFunding",
    "CohortFundingRefused",
    "LeaseCohortFundingHandler",
    "cohort_funding_routes",
]

#: How long a handed-out funding message is kept for its signature (its blockhash expires
#: after about 60-90 s anyway).
MESSAGE_TTL_S = 120.0
#: Most funding messages kept at once (one per live cohort lease; the oldest go first).
MAX_PENDING = 10_000


class CohortFundingRefused(PaymentError):
    """The funding cannot proceed; ``status`` and ``code`` are the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class CohortFunding:
    """The arbiter's half of a cohort lease's funding (see the module docstring)."""

    def __init__(
        self,
        leases: LeaseService,
        billing: Billing,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leases = leases
        self.billing = billing
        self.store: Store = billing.store
        self.arbiter: Keypair = billing.arbiter
        self.pool: CohortPoolClient = billing.pool
        self.clock = clock
        self.monotonic = monotonic
        #: lease id → (the message handed out, its deposit, when it expires).
        self._pending: OrderedDict[str, tuple[bytes, int, float]] = OrderedDict()

    async def _lease(self, user: Pubkey, lease_id: str) -> tuple[LeaseRecord, CohortSession]:
        lease = await self.leases.get(user, lease_id)  # 404 / 403 for another's
        if lease.cohort_id is None:
            raise CohortFundingRefused(
                409,
                "not_cohort",
                f"lease {lease_id} is not a cohort lease: fund it with your own escrow "
                f"(POST /api/v1/leases/{lease_id}/escrow)",
            )
        if not lease.live:
            raise CohortFundingRefused(
                409, "not_live", f"lease {lease_id} is {lease.state.value}; request a new lease"
            )
        if lease.funded:
            raise CohortFundingRefused(409, "conflict", f"lease {lease_id} is funded already")
        if not await self.store.is_member(lease.cohort_id, str(user)):
            raise CohortFundingRefused(
                403,
                "forbidden",
                f"you are no longer a student of cohort {lease.cohort_id}: its pool does not "
                f"pay for this lease",
            )
        session = await self.billing.cohort_session(lease)
        assert session is not None
        return lease, session

    async def _wanted(self, lease: LeaseRecord) -> int:
        """The largest deposit the cohort allows for ``lease`` (before the allowance)."""
        assert lease.cohort_id is not None
        cohort = await self.store.get_cohort(lease.cohort_id)
        assert cohort is not None
        price = lease.price_lamports_per_hour
        gpus = max(1, len(lease.gpu_indices))
        now = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
        used = await self.store.cohort_usage(
            cohort.id, week_start(now), now=now, student=lease.user_pubkey
        )
        left = max(0, cohort.quota_gpu_seconds_per_week - used.get(lease.user_pubkey, 0))
        seconds = min(cohort.max_session_seconds, left // gpus)
        wanted = min_deposit(price, seconds)
        needed = self.billing.min_deposit(lease)
        if wanted < needed:
            raise DepositTooSmall(
                f"the week quota of cohort {cohort.id} leaves {left} GPU-seconds, "
                f"{format_sol(wanted)} at this lease's price; a session needs at least "
                f"{format_sol(needed)}. The quota resets on Monday 00:00 UTC"
            )
        return wanted

    async def offer(self, user: Pubkey, lease_id: str) -> dict[str, Any]:
        """Build and keep the funding message of ``user``'s cohort lease (see the module
        docstring)."""
        lease, session = await self._lease(user, lease_id)
        wanted = await self._wanted(lease)
        try:
            plan = await self.billing._ledger(
                "reading the allowance", self.pool.funding_plan(session, wanted)
            )
        except CohortPoolError as exc:
            raise EscrowMissing(str(exc)) from None
        except PaymentError as exc:
            if isinstance(exc, (LedgerUnreachable, EscrowError)):
                raise
            raise DepositTooSmall(str(exc)) from None  # InsufficientFunds: allowance spent
        needed = self.billing.min_deposit(lease)
        if plan.deposit < needed:
            raise DepositTooSmall(
                f"the allowance of student {user} in cohort {lease.cohort_id} can fund "
                f"{format_sol(plan.deposit)}, less than the {format_sol(needed)} a session "
                f"needs; ask the instructor to top it up (`jupyter io cohort fund`)"
            )
        fronted = plan.escrow_rent + (plan.multisig_rent or 0) + plan.reimbursement
        if plan.create_arbiter_wsol:
            fronted += plan.escrow_rent  # its wSOL account: a token account's rent
        held = await self.billing._ledger(
            "reading the arbiter's balance", self.pool.balance(self.arbiter.pubkey())
        )
        if held < fronted:
            raise CohortFundingRefused(
                503,
                "arbiter_unfunded",
                f"the coordinator's arbiter key {self.arbiter.pubkey()} holds "
                f"{format_sol(held)}; fronting this session's rents and fee takes "
                f"{format_sol(fronted)} (all of it comes back). Its operator must fund it",
            )
        message = plan.message(await self.billing.latest_blockhash())
        raw = bytes(message)
        self._pending[lease.id] = (raw, plan.deposit, self.monotonic() + MESSAGE_TTL_S)
        self._pending.move_to_end(lease.id)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        return {
            "message": base64.b64encode(raw).decode(),
            "deposit_lamports": plan.deposit,
            "escrow": str(session.escrow.escrow),
            "allowance": str(session.allowance.allowance),
            "fee_payer": str(self.arbiter.pubkey()),
        }

    async def submit(
        self, user: Pubkey, lease_id: str, signature: str, message: str | None
    ) -> dict[str, Any]:
        """Check the student's ``signature`` over the message handed out, co-sign, submit,
        then verify and record the escrow and answer the grant."""
        lease, _ = await self._lease(user, lease_id)
        kept = self._pending.get(lease.id)
        if kept is None or kept[2] < self.monotonic():
            self._pending.pop(lease.id, None)
            raise CohortFundingRefused(
                409,
                "conflict",
                f"no funding message is waiting for lease {lease_id} (never asked, or it "
                f"expired): POST {{}} to this endpoint for a fresh one",
            )
        raw = kept[0]
        if message is not None:
            try:
                sent = base64.b64decode(message, validate=True)
            except ValueError:
                sent = b""
            if sent != raw:
                raise CohortFundingRefused(
                    400,
                    "tampered",
                    "that is not the funding message the arbiter built for this lease; the "
                    "arbiter co-signs nothing else",
                )
        parsed = MessageV0.from_bytes(raw)
        try:
            student_signature = Signature.from_string(signature)
        except ValueError:
            raise CohortFundingRefused(
                400, "bad_request", f"{signature!r} is not a base58 signature"
            ) from None
        if not student_signature.verify(user, to_bytes_versioned(parsed)):
            raise CohortFundingRefused(
                400,
                "tampered",
                "the signature is not yours over the funding message the arbiter built for "
                "this lease (sign solders.message.to_bytes_versioned of exactly that message)",
            )
        del self._pending[lease.id]  # used once, landed or not
        try:
            landed = await self.billing._ledger(
                "submitting the funding",
                self.pool.submit(
                    parsed,
                    [self.arbiter, Presigner(user, student_signature)],
                    what=f"funding cohort lease {lease.id}",
                ),
            )
        except TransactionFailed as exc:
            raise CohortFundingRefused(
                409,
                "conflict",
                f"the funding did not land ({exc}); POST {{}} to this endpoint for a fresh one",
            ) from None
        grant = await self.leases.fund(user, lease.id, str(landed), cohort=True)
        return grant.to_json()


class LeaseCohortFundingHandler(_ApiHandler):
    """``POST /api/v1/leases/{id}/cohort-funding`` (see the module docstring)."""

    funding: CohortFunding | None

    def initialize(self, services: Any, funding: CohortFunding | None = None) -> None:
        super().initialize(services)
        self.funding = funding

    async def post(self, lease_id: str) -> None:
        user = self.signed(once=True)
        if user is None:
            return
        if self.funding is None:
            self.fail(409, "not_cohort", "this coordinator runs free leases: nothing to fund")
            return
        try:
            body = _json_body(self.request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict) or set(body) - {"signature", "message"}:
            self.fail(
                400, "bad_request", 'the body must be {} or {"signature": <base58>, "message"?}'
            )
            return
        signature, message = body.get("signature"), body.get("message")
        if not isinstance(signature, (str, type(None))) or not isinstance(
            message, (str, type(None))
        ):
            self.fail(400, "bad_request", "signature and message must be strings")
            return
        try:
            if signature is None:
                answer = await self.funding.offer(user, lease_id)
            else:
                answer = await self.funding.submit(user, lease_id, signature, message)
        except CohortFundingRefused as exc:
            self.fail(exc.status, exc.code, str(exc))
            return
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        self.set_status(200)
        self.finish(json.dumps(answer, separators=(",", ":")))


def cohort_funding_routes(
    init: dict[str, Any],
) -> list[tuple[str, type[_ApiHandler], dict[str, Any]]]:
    """The route of this module, for :func:`~jupyter_io.coordinator.handlers.make_app`; one
    :class:`CohortFunding` per application (None on a free coordinator)."""
    services = init["services"]
    billing = services.leases.billing
    funding = None if billing is None else CohortFunding(services.leases, billing)
    return [
        (
            rf"{API_PREFIX}/leases/([A-Za-z0-9_-]{{1,64}})/cohort-funding",
            LeaseCohortFundingHandler,
            {**init, "funding": funding},
        )
    ]
