"""Leases for users: schedule, claim atomically, sign; look up, end, renew; relay admission.

:class:`LeaseService` is what the REST handlers and the relay call. A lease request runs::

    offer = schedule(index, request)            # pure, over the live offers
    index.reserve(offer.provider, offer.gpu, n) # no await in between: no double booking here
    lease = await store.create_lease(...)       # atomic capacity, across coordinators too
    token = issue_token(keypair, claims)        # lease id, user, provider, GPUs, price, expiry

and answers with a :class:`LeaseGrant` (the 201 of ``POST /api/v1/leases``). When the store
refuses (another coordinator took the GPUs meanwhile) the provider's capacity is reloaded and
the request scheduled again, up to :data:`ATTEMPTS` times. Only the user who requested a lease
may read, end or renew it (:class:`NotLeaseOwner`, a 403).

Holding GPUs is not free: a lease must be funded (escrow payments), then started, within the
claim window, and a key may hold only a few unfunded leases at once
(:mod:`~jupyter_io.coordinator.pending`). :meth:`LeaseService.start` begins the watch (the
leases still waiting after a restart get a full window) and :meth:`LeaseService.stop` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from ..coordinator_client import NOT_FUNDED_IN_TIME, NOT_STARTED_IN_TIME
from ..errors import AuthError, LeaseError
from ..leases import LeaseClaims, issue_token, verify_token
from ..provider_link import End
from .billing import Billing, NotFunded, free_escrow_block
from .models import LeaseState
from .pending import (
    DEFAULT_MAX_UNFUNDED,
    DEFAULT_MAX_UNFUNDED_PER_KEY,
    DEFAULT_WINDOW,
    PendingLeases,
    TooManyUnfunded,
    Waiting,
)
from .registry import Registry
from .relay import Relay
from .scheduler import LeaseRequest, OfferIndex, schedule
from .store import LeaseRecord, Store

__all__ = [
    "ATTEMPTS",
    "ENDED_BY_USER",
    "LeaseGone",
    "LeaseGrant",
    "LeaseNotFound",
    "LeaseNotLive",
    "LeaseService",
    "NotLeaseOwner",
    "TooManyUnfunded",
    "lease_json",
]

#: How many times a request is scheduled again after the store refused the chosen offer.
ATTEMPTS = 3
#: The end reason of a lease its user ended.
ENDED_BY_USER = "ended by the user"


class LeaseNotFound(LeaseError):
    """No lease has that id (404)."""


class LeaseGone(LeaseError):
    """The lease has ended or failed (410 where a live lease is needed)."""


class LeaseNotLive(LeaseError):
    """The lease is over, so its escrow can no longer be funded (409 ``not_live``)."""


class NotLeaseOwner(AuthError):
    """The signed-in key is not the lease's user (403)."""


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease: its record, the signed token (None until its escrow is verified,
    with ``payments = "escrow"``), and where the client connects."""

    lease: LeaseRecord
    token: str | None
    tunnel_url: str
    expires_at: float
    #: The ``escrow`` block (``docs/payments-contract.md`` section 1).
    escrow: dict[str, Any] = field(default_factory=dict)
    #: The ``billing`` block once funded (section 3), else None.
    billing: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The body of ``201 Created`` (``docs/coordinator-contract.md`` section 2)."""
        lease = self.lease
        body = {
            "lease": lease.id,
            "token": self.token,
            "state": lease.state.value,
            "provider": lease.provider_pubkey,
            "tunnel_url": self.tunnel_url,
            "relay": lease.relay,
            "gpu": lease.gpu_model,
            "gpu_indices": list(lease.gpu_indices),
            "price_lamports_per_hour": lease.price_lamports_per_hour,
            "expires_at": self.expires_at,
            "escrow": self.escrow,
            "cohort": lease.cohort_id,
        }
        if self.billing is not None:
            body["billing"] = self.billing
        return body


def _seconds(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def lease_json(lease: LeaseRecord, tunnel_url: str | None = None) -> dict[str, Any]:
    """A lease record as the API shows it (times as Unix seconds)."""
    return {
        "lease": lease.id,
        "user": lease.user_pubkey,
        "provider": lease.provider_pubkey,
        "gpu": lease.gpu_model,
        "gpu_indices": list(lease.gpu_indices),
        "price_lamports_per_hour": lease.price_lamports_per_hour,
        "state": lease.state.value,
        "relay": lease.relay,
        "tunnel_url": tunnel_url,
        "requested_at": _seconds(lease.requested_at),
        "active_at": _seconds(lease.active_at),
        "ended_at": _seconds(lease.ended_at),
        "end_of_service": _seconds(lease.end_of_service),
        "failure_reason": lease.failure_reason,
        "end_reason": lease.end_reason,
        "expires_at": _seconds(lease.token_expires_at),
        "cohort": lease.cohort_id,
    }


class LeaseService:
    """Lease operations for users and the relay (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        index: OfferIndex,
        relay: Relay,
        keypair: Keypair,
        *,
        token_ttl: float = 3600.0,
        billing: Billing | None = None,
        claim_window: float = DEFAULT_WINDOW,
        max_unfunded_per_key: int = DEFAULT_MAX_UNFUNDED_PER_KEY,
        max_unfunded: int = DEFAULT_MAX_UNFUNDED,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        if token_ttl <= 0:
            raise ValueError("token_ttl must be positive")
        self.store = store
        self.registry = registry
        self.index = index
        self.relay = relay
        self.keypair = keypair
        self.coordinator = keypair.pubkey()
        self.token_ttl = token_ttl
        #: Escrow payments (None: ``payments = "free"``, tokens at once).
        self.billing = billing
        self.clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        #: Leases waiting for their escrow or their session (the claim window, the caps).
        self.pending = PendingLeases(
            window=claim_window,
            per_key=max_unfunded_per_key,
            total=max_unfunded,
            caps=billing is not None,
        )
        #: Extra fields of the lease JSON (:meth:`describe`): each gives ``{"warnings":
        #: [...], "ends_at": unix | None}`` for a lease (a cohort's time rules, its quota);
        #: the warnings add up, the earliest ``ends_at`` wins.
        self.notices: list[Callable[[LeaseRecord], dict[str, Any]]] = []
        self._wake = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    # -- the claim window --------------------------------------------------------------------

    async def start(self) -> None:
        """Watch the claim window: every lease still waiting for its escrow or its session
        (after a restart too: each gets a full window from now) ends when its window is
        over. Call after the registry started."""
        now = self.clock()
        for lease in await self.store.live_leases():
            if lease.state is LeaseState.REQUESTED:
                self.pending.add(
                    lease.id,
                    user=lease.user_pubkey,
                    provider=lease.provider_pubkey,
                    deadline=now + self.pending.window,
                    funded=self.billing is None or lease.funded,
                )
        self.registry.lease_listeners.append(self._lease_gone)
        self.registry.activation_listeners.append(self._lease_started)
        self._watch = asyncio.create_task(self._watch_window(), name="claim window")

    async def stop(self) -> None:
        """Stop the watch (the leases are left as they are)."""
        with contextlib.suppress(ValueError):
            self.registry.lease_listeners.remove(self._lease_gone)
        with contextlib.suppress(ValueError):
            self.registry.activation_listeners.remove(self._lease_started)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def _lease_gone(self, lease_id: str, reason: str) -> None:
        self.pending.discard(lease_id)

    def _lease_started(self, lease: LeaseRecord) -> None:
        self.pending.discard(lease.id)

    async def _watch_window(self) -> None:
        pending = self.pending
        while True:
            self._wake.clear()
            for waiting in pending.due(self.clock()):
                try:
                    await self._expire(waiting)
                except Exception:  # the store hiccuped: try again a little later
                    self.log.exception("could not end lease %s; retrying", waiting.lease_id)
                    waiting.deadline = self.clock() + 1.0
            deadline = pending.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _expire(self, waiting: Waiting) -> None:
        """End a lease whose window is over, unless it was funded or started meanwhile."""
        unfunded = not waiting.funded
        reason = NOT_FUNDED_IN_TIME if unfunded else NOT_STARTED_IN_TIME
        ended = await self.store.end_lease(
            waiting.lease_id,
            reason,
            at=_utc(self.clock()),
            only_requested=True,
            only_unfunded=unfunded,
        )
        self.pending.discard(waiting.lease_id)
        if ended:
            self.log.info("lease %s of %s ended: %s", waiting.lease_id, waiting.user, reason)
            self.registry.deliver(waiting.provider, End(waiting.lease_id, reason), ttl=0)
            self.registry.lease_over(waiting.provider, waiting.lease_id, ok=True, reason=reason)
            return
        lease = await self.store.get_lease(waiting.lease_id)
        if lease is not None and lease.state is LeaseState.REQUESTED and lease.funded:
            # Funded through another coordinator sharing the database: its session may
            # start within a window from its funding.
            funded_at = lease.funded_at.timestamp() if lease.funded_at else self.clock()
            self.pending.add(
                lease.id,
                user=lease.user_pubkey,
                provider=lease.provider_pubkey,
                deadline=max(funded_at, self.clock()) + self.pending.window,
                funded=True,
            )

    # -- users -----------------------------------------------------------------------------

    async def request(
        self,
        user: Pubkey,
        request: LeaseRequest,
        *,
        cohort_id: str | None = None,
        latencies: Mapping[str, float] | None = None,
    ) -> LeaseGrant:
        """Lease GPUs for ``user``; :class:`LeaseError` (the scheduler's message: GPU types
        on offer, the cheapest price against the cap, capacity) when none can be had.

        With escrow payments the ledger is checked first (an unreachable one raises
        :class:`~jupyter_io.coordinator.billing.LedgerUnreachable` before anything is stored)
        and the grant carries no token: fund the escrow, then :meth:`fund`.

        ``cohort_id``: the lease runs for that cohort (recorded on the lease); the caller,
        :meth:`~jupyter_io.coordinator.cohorts.CohortService.request_lease`, checked the
        student's right to it and restricted ``request`` to what the cohort pays for.

        ``latencies``: round trips the user measured to providers, ms (the scheduler's
        ``latencies``: they count in the score and against ``max_latency_ms``)."""
        if self.billing is not None:
            await self.billing.check_ledger()
        self.pending.admit(str(user), now=self.clock())  # TooManyUnfunded: a 429
        try:
            return await self._request(user, request, cohort_id, latencies)
        finally:
            self.pending.unreserve(str(user))  # the lease, if stored, is tracked now

    async def _request(
        self,
        user: Pubkey,
        request: LeaseRequest,
        cohort_id: str | None = None,
        latencies: Mapping[str, float] | None = None,
    ) -> LeaseGrant:
        error: LeaseError | None = None
        for _ in range(ATTEMPTS):
            offer = schedule(self.index, request, latencies=latencies, cohort=cohort_id)
            self.index.reserve(offer.provider, offer.gpu, request.gpus)
            now = self.clock()
            expires = now + self.token_ttl
            try:
                lease = await self.store.create_lease(
                    user_pubkey=str(user),
                    provider_pubkey=offer.provider,
                    gpu_model=offer.gpu,
                    gpu_count=request.gpus,
                    max_price_lamports_per_hour=request.max_price_lamports_per_hour,
                    relay=offer.reachable_url is None,
                    token_expires_at=_utc(expires),
                    cohort_id=cohort_id,
                    at=_utc(now),
                )
            except LeaseError as exc:
                error = exc
                await self.registry.resync(offer.provider)
                continue
            self.registry.lease_created(lease)
            self.pending.add(
                lease.id,
                user=lease.user_pubkey,
                provider=lease.provider_pubkey,
                deadline=now + self.pending.window,
                funded=self.billing is None,
            )
            self._wake.set()
            if self.billing is not None:
                url = self._tunnel_url(lease, offer.reachable_url)
                return LeaseGrant(lease, None, url, expires, self.billing.escrow_block(lease))
            env = await self._environment_of(lease)
            return self._grant(lease, now, expires, offer.reachable_url, env=env)
        assert error is not None
        raise error

    async def get(self, user: Pubkey, lease_id: str) -> LeaseRecord:
        """The lease, if ``user`` owns it."""
        lease = await self.store.get_lease(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r}; check the id the lease request returned")
        if lease.user_pubkey != str(user):
            raise NotLeaseOwner(f"lease {lease_id} belongs to another user")
        return lease

    async def end(self, user: Pubkey, lease_id: str) -> LeaseRecord:
        """End ``user``'s lease (idempotent: an ended or failed lease is returned as is). The
        provider is told to stop the session; relayed connections are closed."""
        lease = await self.get(user, lease_id)
        reason = ENDED_BY_USER
        if lease.live and await self.store.end_lease(lease_id, reason, at=_utc(self.clock())):
            provider = lease.provider_pubkey
            self.registry.deliver(provider, End(lease_id, reason), ttl=0)
            self.registry.lease_over(provider, lease_id, ok=True, reason=reason)
            ended = await self.store.get_lease(lease_id)
            assert ended is not None
            return ended
        return await self.get(user, lease_id)

    async def fund(
        self, user: Pubkey, lease_id: str, signature: str | None, *, cohort: bool = False
    ) -> LeaseGrant:
        """``user`` says the lease's escrow is open: verify it on-chain, record it and grant
        the token (again after a top-up: the deposit is raised, the token renewed).

        Raises :class:`LeaseNotLive` for a lease that is over, and the billing errors
        (:class:`~jupyter_io.coordinator.billing.EscrowMissing`, ``DepositTooSmall``,
        ``LedgerUnreachable``). Without escrow payments the token is simply renewed.
        ``cohort``: called by the cohort funding once its transaction landed (a cohort lease
        is funded no other way)."""
        lease = await self.get(user, lease_id)
        if self.billing is None:
            return await self.renew(user, lease_id)
        if not lease.live:
            raise LeaseNotLive(
                f"lease {lease_id} is {lease.state.value}: its escrow is settled or refunded "
                f"now; request a new lease"
            )
        try:
            with self.pending.holding(lease_id):  # not expired while its escrow is read
                await self.billing.fund(lease, signature, cohort=cohort)
        except LookupError:
            raise LeaseNotLive(f"lease {lease_id} ended meanwhile; request a new lease") from None
        finally:
            self._wake.set()
        self.pending.funded(lease_id, now=self.clock())
        return await self.renew(user, lease_id)

    async def renew(self, user: Pubkey, lease_id: str) -> LeaseGrant:
        """A fresh token for ``user``'s live lease, valid ``token_ttl`` from now (a session
        that outlives its token resumes with the new one). With escrow payments an unfunded
        lease gets none (:class:`~jupyter_io.coordinator.billing.NotFunded`, a 402)."""
        lease = await self.get(user, lease_id)
        if self.billing is not None and lease.live and not lease.funded:
            raise NotFunded(
                f"lease {lease_id} has no verified escrow: open it and POST "
                f"/api/v1/leases/{lease_id}/escrow first"
            )
        now = self.clock()
        expires = now + self.token_ttl
        if not lease.live or not await self.store.set_token_expiry(lease_id, _utc(expires)):
            raise LeaseGone(f"lease {lease_id} is {lease.state.value}; request a new lease")
        renewed = await self.get(user, lease_id)
        self.registry.lease_token_renewed(renewed)
        grant = self._grant(
            renewed,
            now,
            expires,
            await self.reachable_url(renewed),
            env=await self._environment_of(renewed),
            cohort_instructor=await self._cohort_instructor(renewed),
        )
        if self.billing is None:
            return grant
        return LeaseGrant(
            grant.lease,
            grant.token,
            grant.tunnel_url,
            grant.expires_at,
            self.billing.escrow_block(renewed),
            await self.billing.view(renewed),
        )

    async def of_user(self, user: Pubkey, limit: int = 100) -> list[LeaseRecord]:
        """``user``'s leases, newest first (at most ``limit``, 1..100)."""
        return await self.store.leases_for_user(str(user), limit=max(1, min(limit, 100)))

    def escrow_block(self, lease: LeaseRecord) -> dict[str, Any]:
        """The lease's ``escrow`` block (``{"required": false}`` on a free coordinator)."""
        if self.billing is None:
            return free_escrow_block()
        return self.billing.escrow_block(lease)

    async def describe(self, leases: list[LeaseRecord]) -> list[dict[str, Any]]:
        """Lease records as the API shows them, with their ``escrow`` and ``billing`` blocks
        (``billing`` only with escrow payments)."""
        billing = self.billing
        settlements = (
            await self.store.settlements_of(lease.id for lease in leases) if billing else {}
        )
        bodies = []
        for lease in leases:
            body = lease_json(lease, await self.tunnel_url(lease))
            body["escrow"] = self.escrow_block(lease)
            if billing is not None:
                body["billing"] = await billing.view(lease, settlements.get(lease.id))
            if self.notices:
                body.update(_notices(lease, self.notices))
            bodies.append(body)
        return bodies

    async def reachable_url(self, lease: LeaseRecord) -> str | None:
        """The provider's direct tunnel URL for a direct lease (None for a relayed one)."""
        if lease.relay:
            return None
        state = self.registry.provider(lease.provider_pubkey)
        if state is not None:
            return state.reachable_url
        record = await self.store.get_provider(lease.provider_pubkey)
        return record.reachable_url if record is not None else None

    async def tunnel_url(self, lease: LeaseRecord) -> str | None:
        """Where the lease's client connects: the relay or the provider's URL."""
        if lease.relay:
            return self.relay.client_url(lease.id)
        return await self.reachable_url(lease)

    # -- the relay -------------------------------------------------------------------------

    async def admit_relay_client(self, lease_id: str, token: str) -> LeaseRecord:
        """Check the token a relay client presents for ``lease_id``: signed by this
        coordinator, for this lease, its user and provider, unexpired, lease live."""
        lease = await self.store.get_lease(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r}")
        claims = verify_token(
            token,
            coordinator=self.coordinator,
            user=Pubkey.from_string(lease.user_pubkey),
            provider=Pubkey.from_string(lease.provider_pubkey),
            now=self.clock(),
        )
        if claims.lease_id != lease_id:
            raise AuthError(f"this token is for lease {claims.lease_id}, not {lease_id}")
        if not lease.live:
            raise LeaseGone(f"lease {lease_id} is {lease.state.value}; request a new lease")
        return lease

    async def admit_relay_provider(self, lease_id: str, provider: Pubkey) -> LeaseRecord:
        """Check that ``provider`` (whose signature the handler verified) hosts the lease."""
        lease = await self.store.get_lease(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r}")
        if lease.provider_pubkey != str(provider):
            raise NotLeaseOwner(f"lease {lease_id} is not hosted by {provider}")
        if not lease.live:
            raise LeaseGone(f"lease {lease_id} is {lease.state.value}")
        return lease

    # -- internals -------------------------------------------------------------------------

    async def _cohort_instructor(self, lease: LeaseRecord) -> str | None:
        """The instructor who owns a cohort lease's allowance (the token's cohort claims, by
        which the provider checks its settlement), None for other leases and without escrow
        payments (nothing is settled)."""
        if lease.cohort_id is None or self.billing is None:
            return None
        cohort = await self.store.get_cohort(lease.cohort_id)
        return None if cohort is None else cohort.instructor

    async def _environment_of(self, lease: LeaseRecord) -> str | None:
        """The course environment a cohort lease's kernels run in: the sha256 of its
        cohort's requirements (the token's ``env``), None for other leases."""
        if lease.cohort_id is None:
            return None
        cohort = await self.store.get_cohort(lease.cohort_id)
        return None if cohort is None else cohort.environment_sha256

    def _grant(
        self,
        lease: LeaseRecord,
        now: float,
        expires: float,
        reachable_url: str | None,
        *,
        env: str | None = None,
        cohort_instructor: str | None = None,
    ) -> LeaseGrant:
        claims = LeaseClaims(
            lease_id=lease.id,
            user=Pubkey.from_string(lease.user_pubkey),
            provider=Pubkey.from_string(lease.provider_pubkey),
            gpu=lease.gpu_model,
            gpu_indices=tuple(lease.gpu_indices),
            price_lamports_per_hour=lease.price_lamports_per_hour,
            issued_at=now,
            expires_at=expires,
            coordinator=self.coordinator,
            relay=lease.relay,
            cohort=lease.cohort_id if cohort_instructor is not None else None,
            cohort_instructor=None
            if cohort_instructor is None
            else Pubkey.from_string(cohort_instructor),
            env=env,
        )
        token = issue_token(self.keypair, claims)
        escrow = self.escrow_block(lease)
        return LeaseGrant(lease, token, self._tunnel_url(lease, reachable_url), expires, escrow)

    def _tunnel_url(self, lease: LeaseRecord, reachable_url: str | None) -> str:
        if lease.relay or not reachable_url:
            return self.relay.client_url(lease.id)
        return reachable_url


def _notices(
    lease: LeaseRecord, notices: list[Callable[[LeaseRecord], dict[str, Any]]]
) -> dict[str, Any]:
    warnings: list[dict[str, Any]] = []
    ends: list[float] = []
    for notice in notices:
        found = notice(lease)
        warnings += found.get("warnings") or []
        if found.get("ends_at") is not None:
            ends.append(found["ends_at"])
    return {"warnings": warnings, "ends_at": min(ends, default=None)}


def _utc(seconds: float) -> datetime:
    if not math.isfinite(seconds):
        raise ValueError("time must be finite")
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
