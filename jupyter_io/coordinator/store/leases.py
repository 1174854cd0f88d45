"""Leases: GPUs claimed for a user, their lifecycle, escrows and acknowledgements.

Record :class:`LeaseRecord`; the queries are :class:`LeaseQueries`, part of
:class:`~jupyter_io.coordinator.store.Store`: claim (:meth:`~LeaseQueries.create_lease`),
activate, end or fail, the escrow verified for a lease, the seconds its user acknowledged,
and :meth:`~LeaseQueries.mark_provider_lost`, which fails a lost provider's leases.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ...errors import LeaseError
from ..models import LIVE_LEASE_STATES, Lease, LeaseState, Offer, Provider, ProviderStatus
from .engine import Aggregate, _aware, _when
from .providers import OfferRecord, _check_pubkey, _close_online_stretch, _offer_record
from .reliability import close_link

__all__ = ["LeaseQueries", "LeaseRecord"]

_LIVE = tuple(state.value for state in LIVE_LEASE_STATES)

_providers = cast(sa.Table, Provider.__table__)
_offers = cast(sa.Table, Offer.__table__)
_leases = cast(sa.Table, Lease.__table__)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A lease as stored. ``end_of_service`` is when billing stops."""

    id: str
    user_pubkey: str
    provider_pubkey: str
    gpu_model: str
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    state: LeaseState
    requested_at: datetime
    active_at: datetime | None
    ended_at: datetime | None
    end_of_service: datetime | None
    failure_reason: str | None
    token_expires_at: datetime | None
    relay: bool
    #: Why an ended lease ended (see :meth:`Store.end_lease`); None before it ends.
    end_reason: str | None = None
    #: The verified escrow (None while unfunded; see :meth:`Store.record_escrow`).
    escrow_address: str | None = None
    deposit_lamports: int | None = None
    escrow_signature: str | None = None
    funded_at: datetime | None = None
    #: Seconds the user acknowledged (see :meth:`Store.record_ack`); None for a lease
    #: recorded before acknowledgements existed.
    acked_seconds: int | None = None
    acked_at: datetime | None = None
    #: The cohort the lease runs for (None: the user's own lease).
    cohort_id: str | None = None

    @property
    def live(self) -> bool:
        """Whether the lease still holds its GPUs (requested or active)."""
        return self.state in LIVE_LEASE_STATES

    @property
    def funded(self) -> bool:
        """Whether an escrow was verified for this lease."""
        return self.escrow_address is not None


class LeaseQueries(Aggregate):
    """Leases from claim to end, with their escrows and acknowledgements."""

    async def create_lease(
        self,
        *,
        user_pubkey: str,
        provider_pubkey: str,
        gpu_model: str,
        gpu_count: int = 1,
        max_price_lamports_per_hour: int | None = None,
        relay: bool = False,
        token_expires_at: datetime | None = None,
        lease_id: str | None = None,
        cohort_id: str | None = None,
        at: datetime | None = None,
    ) -> LeaseRecord:
        """Claim ``gpu_count`` free ``gpu_model`` GPUs of a provider for a user, atomically.

        The provider's row is locked while its free GPUs are counted and the lease is
        written, so two coordinators racing for the last GPU cannot both get it. Picks the
        cheapest group of that model with enough free GPUs (under ``max_price...`` if given)
        and the lowest free indices; the lease's price is the group's price per GPU-hour times
        ``gpu_count`` (what an hour of this lease costs: billing, deposits, the token's claims
        and the provider's own check all read it so). The lease
        starts ``requested``: sign its token, then :meth:`activate_lease` once the kernel
        runs. ``cohort_id``: the cohort it runs for (checked by the caller).

        Raises :class:`~jupyter_io.errors.LeaseError` when the provider is unknown or not
        online, offers no such GPU, has none free, or none under the price cap.
        """
        _check_pubkey(user_pubkey, "user")
        if gpu_count < 1:
            raise ValueError(f"a lease needs at least one GPU, not {gpu_count}")
        at = _when(at)
        if token_expires_at is not None:
            _aware(token_expires_at)
        lease_id = lease_id or secrets.token_hex(16)
        try:
            async with self._write() as conn:
                provider = await self._lock_provider(conn, provider_pubkey)
                offers = (
                    await conn.execute(
                        sa.select(_offers)
                        .where(
                            _offers.c.provider_pubkey == provider_pubkey,
                            _offers.c.gpu_model == gpu_model,
                        )
                        .order_by(_offers.c.price_lamports_per_hour, _offers.c.id)
                    )
                ).all()
                held = (
                    await conn.scalars(
                        sa.select(_leases.c.gpu_indices).where(
                            _leases.c.provider_pubkey == provider_pubkey,
                            _leases.c.state.in_(_LIVE),
                        )
                    )
                ).all()
                offer, indices = _choose_gpus(
                    provider,
                    provider_pubkey,
                    [_offer_record(row) for row in offers],
                    [frozenset(indices) for indices in held],
                    gpu_model=gpu_model,
                    gpu_count=gpu_count,
                    max_price=max_price_lamports_per_hour,
                )
                row = (
                    await conn.execute(
                        sa.insert(_leases)
                        .values(
                            id=lease_id,
                            user_pubkey=user_pubkey,
                            provider_pubkey=provider_pubkey,
                            gpu_model=gpu_model,
                            gpu_indices=list(indices),
                            price_lamports_per_hour=offer.price_lamports_per_hour * len(indices),
                            state=LeaseState.REQUESTED.value,
                            requested_at=at,
                            token_expires_at=token_expires_at,
                            relay=relay,
                            acked_seconds=0,
                            cohort_id=cohort_id,
                        )
                        .returning(*_leases.c)
                    )
                ).one()
        except IntegrityError:
            if await self.get_lease(lease_id) is not None:
                raise LeaseError(f"lease id {lease_id!r} is already taken") from None
            raise
        return _lease_record(row)

    async def activate_lease(self, lease_id: str, *, at: datetime | None = None) -> bool:
        """``requested`` → ``active`` (the kernel is running): billing starts at ``at``.
        Returns whether the lease changed; again, or on an ended or failed lease, ``False``."""
        at = _when(at)
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_leases)
                .where(_leases.c.id == lease_id, _leases.c.state == LeaseState.REQUESTED.value)
                .values(state=LeaseState.ACTIVE.value, active_at=at)
            )
            return bool(result.rowcount)

    async def end_lease(
        self,
        lease_id: str,
        reason: str,
        *,
        at: datetime | None = None,
        only_requested: bool = False,
        only_unfunded: bool = False,
    ) -> bool:
        """``requested``/``active`` → ``ended`` for ``reason`` (the user shut the kernel down,
        the budget was spent, ...): billing stops at ``at``, the GPUs are free again and the
        provider's ``sessions_ok`` grows. Returns whether the lease changed (``False`` when
        it had already ended or failed).

        ``only_requested`` / ``only_unfunded``: end it only while its session has not started
        / no escrow is recorded, checked in the same statement (a lease that started or was
        funded meanwhile, through any coordinator, is left alone and ``False`` returned)."""
        at = _when(at)
        where = []
        if only_requested:
            where.append(_leases.c.state == LeaseState.REQUESTED.value)
        if only_unfunded:
            where.append(_leases.c.escrow_address.is_(None))
        return await self._finish(
            lease_id,
            {
                "state": LeaseState.ENDED.value,
                "ended_at": at,
                "end_of_service": at,
                "end_reason": reason,
            },
            counter="sessions_ok",
            where=where,
        )

    async def fail_lease(
        self,
        lease_id: str,
        reason: str,
        *,
        at: datetime | None = None,
        end_of_service: datetime | None = None,
    ) -> bool:
        """``requested``/``active`` → ``failed`` (the kernel could not start, or died):
        billing stops at ``end_of_service`` (default ``at``), the provider's
        ``sessions_failed`` grows. Returns whether the lease changed."""
        at = _when(at)
        end_of_service = at if end_of_service is None else _aware(end_of_service)
        return await self._finish(
            lease_id,
            {
                "state": LeaseState.FAILED.value,
                "ended_at": at,
                "end_of_service": end_of_service,
                "failure_reason": reason,
            },
            counter="sessions_failed",
        )

    async def _finish(
        self,
        lease_id: str,
        values: dict[str, Any],
        *,
        counter: str,
        where: Sequence[sa.ColumnElement[bool]] = (),
    ) -> bool:
        async with self._write() as conn:
            provider_pubkey = await conn.scalar(
                sa.select(_leases.c.provider_pubkey).where(_leases.c.id == lease_id)
            )
            if provider_pubkey is None:
                return False
            # Provider row before lease row, the order mark_provider_lost takes them in.
            await self._lock_provider(conn, provider_pubkey)
            result = await conn.execute(
                sa.update(_leases)
                .where(_leases.c.id == lease_id, _leases.c.state.in_(_LIVE), *where)
                .values(values)
            )
            if not result.rowcount:
                return False
            await conn.execute(
                sa.update(_providers)
                .where(_providers.c.pubkey == provider_pubkey)
                .values({counter: _providers.c[counter] + 1})
            )
        return True

    async def set_token_expiry(self, lease_id: str, expires_at: datetime) -> bool:
        """Record the expiry of the lease token just (re)issued for a live lease. Returns
        whether the lease is live (no token should be issued otherwise)."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_leases)
                .where(_leases.c.id == lease_id, _leases.c.state.in_(_LIVE))
                .values(token_expires_at=_aware(expires_at))
            )
            return bool(result.rowcount)

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        """The lease ``lease_id``, or ``None``."""
        async with self._read() as conn:
            row = (await conn.execute(sa.select(_leases).where(_leases.c.id == lease_id))).first()
        return None if row is None else _lease_record(row)

    async def leases_for_user(
        self,
        user_pubkey: str,
        *,
        states: Iterable[LeaseState] | None = None,
        limit: int | None = 100,
    ) -> list[LeaseRecord]:
        """A user's leases, newest first (only those in ``states`` if given)."""
        query = (
            sa.select(_leases)
            .where(_leases.c.user_pubkey == user_pubkey)
            .order_by(_leases.c.requested_at.desc(), _leases.c.id)
            .limit(limit)
        )
        if states is not None:
            query = query.where(_leases.c.state.in_([LeaseState(s).value for s in states]))
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

    async def live_leases(self, *, provider_pubkey: str | None = None) -> list[LeaseRecord]:
        """Every requested or active lease (of one provider if given), oldest first: what a
        restarted coordinator reloads to carry on."""
        query = (
            sa.select(_leases)
            .where(_leases.c.state.in_(_LIVE))
            .order_by(_leases.c.requested_at, _leases.c.id)
        )
        if provider_pubkey is not None:
            query = query.where(_leases.c.provider_pubkey == provider_pubkey)
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

    async def funded_active_leases(self) -> list[LeaseRecord]:
        """Active leases with a verified escrow (the budget watch's list at start-up)."""
        query = sa.select(_leases).where(
            _leases.c.state == LeaseState.ACTIVE.value, _leases.c.escrow_address.is_not(None)
        )
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

    # ---- escrows and acknowledgements --------------------------------------------------

    async def record_escrow(
        self,
        lease_id: str,
        *,
        address: str,
        deposit_lamports: int,
        signature: str | None,
        at: datetime | None = None,
        late: bool = False,
    ) -> LeaseRecord | None:
        """Record the escrow verified on-chain for a live lease (again after a top-up: the
        deposit becomes what it holds now; the first ``funded_at`` and a known setup
        signature are kept). Returns the lease, or None when it is not live.

        ``late``: record it on a lease that is over and has no escrow recorded (one opened
        whose verification never reached this coordinator), so that it can be refunded;
        returns None when the lease is live or already has one."""
        if deposit_lamports < 0:
            raise ValueError("a deposit cannot be negative")
        at = _when(at)
        values: dict[str, Any] = {
            "escrow_address": address,
            "deposit_lamports": deposit_lamports,
            "funded_at": sa.func.coalesce(_leases.c.funded_at, at),
        }
        if signature is not None:
            values["escrow_signature"] = signature
        async with self._write() as conn:
            row = (
                await conn.execute(
                    sa.update(_leases)
                    .where(
                        _leases.c.id == lease_id,
                        sa.and_(_leases.c.state.not_in(_LIVE), _leases.c.escrow_address.is_(None))
                        if late
                        else _leases.c.state.in_(_LIVE),
                    )
                    .values(values)
                    .returning(*_leases.c)
                )
            ).first()
        return None if row is None else _lease_record(row)

    async def record_ack(
        self, lease_id: str, seconds: int, *, at: datetime | None = None
    ) -> LeaseRecord | None:
        """Record that the user acknowledged ``seconds`` of service on a live lease (the
        caller checked the acknowledgement: :func:`jupyter_io.usage_acks.check_ack`). Never
        lowers the count, whoever writes concurrently. Returns the lease as recorded, or
        None when it is no longer live or already acknowledged beyond ``seconds``."""
        if seconds < 0:
            raise ValueError("acknowledged seconds cannot be negative")
        at = _when(at)
        async with self._write() as conn:
            row = (
                await conn.execute(
                    sa.update(_leases)
                    .where(
                        _leases.c.id == lease_id,
                        _leases.c.state.in_(_LIVE),
                        sa.or_(
                            _leases.c.acked_seconds.is_(None),
                            _leases.c.acked_seconds <= seconds,
                        ),
                    )
                    .values(acked_seconds=seconds, acked_at=at)
                    .returning(*_leases.c)
                )
            ).first()
        return None if row is None else _lease_record(row)

    # ---- a provider lost ---------------------------------------------------------------

    async def mark_provider_lost(
        self,
        pubkey: str,
        *,
        at: datetime | None = None,
        reason: str | None = None,
        heartbeats_missed: int = 3,
    ) -> list[LeaseRecord]:
        """A provider stopped heartbeating: mark it lost and fail its live leases, in one
        transaction.

        Each failed lease gets ``end_of_service`` = the provider's last heartbeat (billing
        stops there; for a lease activated after that heartbeat it bills nothing),
        ``ended_at`` = ``at`` and ``failure_reason``. The provider's ``sessions_failed`` grows
        by the number of leases failed, and, if it was online, ``heartbeats_missed`` by
        ``heartbeats_missed`` and ``times_lost`` by one, and its online stretch is closed.
        Calling it again (or for an unknown provider) fails nothing and returns ``[]``.
        Returns the leases it failed: refund their escrows and tell their users.
        """
        at = _when(at)
        async with self._write() as conn:
            provider = await self._lock_provider(conn, pubkey)
            if provider is None:
                return []
            return await self._lose(conn, provider, at, reason, heartbeats_missed)

    async def mark_silent_provider_lost(
        self,
        pubkey: str,
        *,
        silent_since: datetime,
        at: datetime | None = None,
        heartbeats_missed: int = 3,
    ) -> list[LeaseRecord] | None:
        """:meth:`mark_provider_lost`, only if the provider is still ``online`` with no
        heartbeat stored since ``silent_since``, checked under its row lock in the same
        transaction: one that heartbeated meanwhile (through any coordinator), said goodbye,
        or was marked lost already is left alone and None returned. Else returns the leases it
        failed (maybe ``[]``). For a sweep that finds silent providers in the database, which
        several coordinators may run at once: only one of them marks each provider lost."""
        at = _when(at)
        async with self._write() as conn:
            provider = await self._lock_provider(conn, pubkey)
            if (
                provider is None
                or provider.status != ProviderStatus.ONLINE.value
                or _aware(provider.last_heartbeat) >= _aware(silent_since)
            ):
                return None
            return await self._lose(conn, provider, at, None, heartbeats_missed)

    async def overdue_requested_leases(
        self,
        *,
        requested_before: datetime,
        funded_before: datetime | None,
        limit: int = 500,
    ) -> list[LeaseRecord]:
        """Leases still ``requested`` that missed their claim window, oldest first: unfunded
        ones requested before ``requested_before``, and (with ``funded_before``: escrow
        payments) funded ones whose escrow was verified before ``funded_before`` and whose
        session never started. With ``funded_before`` None (free payments) every requested
        lease requested before ``requested_before``. End each with :meth:`end_lease`
        (``only_requested``, and ``only_unfunded`` for an unfunded one)."""
        requested = _leases.c.requested_at < _aware(requested_before)
        if funded_before is None:
            late = requested
        else:
            late = sa.or_(
                sa.and_(_leases.c.escrow_address.is_(None), requested),
                sa.and_(
                    _leases.c.escrow_address.is_not(None),
                    _leases.c.funded_at < _aware(funded_before),
                ),
            )
        query = (
            sa.select(_leases)
            .where(_leases.c.state == LeaseState.REQUESTED.value, late)
            .order_by(_leases.c.requested_at, _leases.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

    async def _lose(
        self,
        conn: Any,
        provider: sa.Row[Any],
        at: datetime,
        reason: str | None,
        heartbeats_missed: int,
    ) -> list[LeaseRecord]:
        """The body of :meth:`mark_provider_lost`, its provider row locked in ``conn``."""
        pubkey = provider.pubkey
        last_heartbeat: datetime = provider.last_heartbeat
        why = reason or (
            f"provider {pubkey} was lost: no heartbeat since {last_heartbeat.isoformat()}"
        )
        failed = (
            await conn.execute(
                sa.update(_leases)
                .where(_leases.c.provider_pubkey == pubkey, _leases.c.state.in_(_LIVE))
                .values(
                    state=LeaseState.FAILED.value,
                    ended_at=at,
                    end_of_service=last_heartbeat,
                    failure_reason=why,
                )
                .returning(*_leases.c)
            )
        ).all()
        changes: dict[str, Any] = {}
        if failed:
            changes["sessions_failed"] = _providers.c.sessions_failed + len(failed)
        if provider.status == ProviderStatus.ONLINE.value:
            changes.update(
                status=ProviderStatus.LOST.value,
                replica_id=None,
                heartbeats_missed=_providers.c.heartbeats_missed + heartbeats_missed,
                times_lost=_providers.c.times_lost + 1,
                **_close_online_stretch(provider, last_heartbeat),
            )
            await close_link(conn, pubkey, last_heartbeat, "lost")
        if changes:
            await conn.execute(
                sa.update(_providers).where(_providers.c.pubkey == pubkey).values(changes)
            )
        return sorted((_lease_record(row) for row in failed), key=lambda lease: lease.id)


def _choose_gpus(
    provider: sa.Row[Any] | None,
    provider_pubkey: str,
    offers: list[OfferRecord],
    held: list[frozenset[int]],
    *,
    gpu_model: str,
    gpu_count: int,
    max_price: int | None,
) -> tuple[OfferRecord, tuple[int, ...]]:
    """The offer group and GPU indices for a new lease, or a LeaseError that says why not."""
    if provider is None:
        raise LeaseError(
            f"provider {provider_pubkey} is not registered with this coordinator; "
            "pick another offer"
        )
    if provider.status != ProviderStatus.ONLINE.value:
        raise LeaseError(
            f"provider {provider_pubkey} is {provider.status} (last heartbeat "
            f"{provider.last_heartbeat.isoformat()}); pick another offer"
        )
    if not offers:
        raise LeaseError(f"provider {provider_pubkey} offers no {gpu_model} GPUs")
    in_use = frozenset().union(*held) if held else frozenset[int]()
    available: list[tuple[OfferRecord, tuple[int, ...]]] = []
    for offer in offers:  # cheapest first
        group = frozenset(offer.gpu_indices)
        kernels = sum(1 for indices in held if indices & group)
        free = sorted(group - in_use)
        if kernels < offer.max_kernels and len(free) >= gpu_count:
            available.append((offer, tuple(free[:gpu_count])))
    if not available:
        total = sum(offer.count for offer in offers)
        raise LeaseError(
            f"all {total} {gpu_model} GPUs of provider {provider_pubkey} are leased "
            f"(or fewer than {gpu_count} are free together); pick another offer or retry later"
        )
    for offer, indices in available:
        if max_price is None or offer.price_lamports_per_hour <= max_price:
            return offer, indices
    raise LeaseError(
        f"free {gpu_model} GPUs on provider {provider_pubkey} cost at least "
        f"{available[0][0].price_lamports_per_hour} lamports/hour, above your cap of "
        f"{max_price}; raise max_price_per_hour or pick another offer"
    )


def _lease_record(row: sa.Row[Any]) -> LeaseRecord:
    m = row._mapping
    return LeaseRecord(
        id=m["id"],
        user_pubkey=m["user_pubkey"],
        provider_pubkey=m["provider_pubkey"],
        gpu_model=m["gpu_model"],
        gpu_indices=tuple(m["gpu_indices"]),
        price_lamports_per_hour=m["price_lamports_per_hour"],
        state=LeaseState(m["state"]),
        requested_at=m["requested_at"],
        active_at=m["active_at"],
        ended_at=m["ended_at"],
        end_of_service=m["end_of_service"],
        failure_reason=m["failure_reason"],
        token_expires_at=m["token_expires_at"],
        relay=bool(m["relay"]),
        end_reason=m["end_reason"],
        escrow_address=m["escrow_address"],
        deposit_lamports=m["deposit_lamports"],
        escrow_signature=m["escrow_signature"],
        funded_at=m["funded_at"],
        acked_seconds=m["acked_seconds"],
        acked_at=m["acked_at"],
        cohort_id=m["cohort_id"],
    )
