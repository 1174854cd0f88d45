"""Settlements and usage: what a funded lease owes when it is over, and the seconds its
provider reported delivering.

Records :class:`SettlementRecord` and :class:`UsageReport`; the queries are
:class:`SettlementQueries`, part of :class:`~jupyter_io.coordinator.store.Store`: the
settlement queue that several coordinators can work on at once (enqueue, claim, retry, finish
or fail) and the usage reports it bills from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa

from ..models import (
    LIVE_LEASE_STATES,
    Lease,
    LeaseState,
    Provider,
    ProviderStatus,
    Replica,
    SettlementKind,
    SettlementRow,
    SettlementState,
    UsageReportRow,
)
from .engine import Aggregate, _aware, _when

__all__ = ["DEAD_REPLICA_S", "SettlementQueries", "SettlementRecord", "UsageReport"]

#: Seconds without a beat after which a replica's settlement claims are free to take: a
#: replica beats every second, and one killed (SIGKILL, a lost machine) never releases them.
DEAD_REPLICA_S = 5.0

_LIVE = tuple(state.value for state in LIVE_LEASE_STATES)

_leases = cast(sa.Table, Lease.__table__)
_usage = cast(sa.Table, UsageReportRow.__table__)
_settlements = cast(sa.Table, SettlementRow.__table__)
_providers = cast(sa.Table, Provider.__table__)
_replicas = cast(sa.Table, Replica.__table__)


@dataclass(frozen=True, slots=True)
class SettlementRecord:
    """A funded lease's settlement as stored (see
    :class:`~jupyter_io.coordinator.models.SettlementRow`)."""

    lease_id: str
    kind: SettlementKind
    state: SettlementState
    amount_lamports: int
    fee_lamports: int
    signature: str | None
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime
    claimed_by: str | None
    claimed_until: datetime | None

    def to_json(self) -> dict[str, Any]:
        """The ``settlement`` block of a lease's billing view (payments contract §3)."""
        return {
            "kind": self.kind.value,
            "state": self.state.value,
            "amount_lamports": self.amount_lamports,
            "fee_lamports": self.fee_lamports,
            # A pending row may hold the signature of a transaction in flight: not a payment.
            "signature": self.signature if self.state is SettlementState.DONE else None,
            "attempts": self.attempts,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A provider's signed report of ``seconds_delivered`` on a lease since report ``seq - 1``.

    ``received_at`` is filled in by :meth:`Store.add_usage_report` when left out.
    """

    lease_id: str
    seq: int
    seconds_delivered: int
    signature: str
    reported_at: datetime
    gpu_utilisation: float | None = None
    received_at: datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.seq < 0 or self.seconds_delivered < 0:
            raise ValueError(
                f"usage report {self.lease_id}#{self.seq}: seq and seconds_delivered "
                f"({self.seconds_delivered}) cannot be negative"
            )
        _aware(self.reported_at)


class SettlementQueries(Aggregate):
    """The settlement queue and the usage reports."""

    async def enqueue_settlements(
        self, *, at: datetime | None = None, first_attempt: datetime | None = None
    ) -> list[str]:
        """Queue a settlement for every funded lease that is over and has none yet: ``settle``
        for an ended lease, ``refund`` for a failed one (one statement; a row per lease at
        most, whoever runs it), due at ``first_attempt`` (default ``at``). Returns the lease
        ids queued now."""
        at = _when(at)
        due = at if first_attempt is None else _aware(first_attempt)
        missing = (
            sa.select(_leases.c.id, _leases.c.state)
            .outerjoin(_settlements, _settlements.c.lease_id == _leases.c.id)
            .where(
                _leases.c.escrow_address.is_not(None),
                _leases.c.state.not_in(_LIVE),
                _settlements.c.lease_id.is_(None),
            )
        )
        async with self._write() as conn:
            rows = (await conn.execute(missing)).all()
            if not rows:
                return []
            values = [
                {
                    "lease_id": row.id,
                    "kind": (
                        SettlementKind.SETTLE
                        if row.state == LeaseState.ENDED.value
                        else SettlementKind.REFUND
                    ).value,
                    "state": SettlementState.PENDING.value,
                    "created_at": at,
                    "updated_at": at,
                    "next_attempt_at": due,
                }
                for row in rows
            ]
            inserted = await conn.execute(
                self._insert(_settlements)
                .values(values)
                .on_conflict_do_nothing(index_elements=[_settlements.c.lease_id])
                .returning(_settlements.c.lease_id)
            )
            return sorted(inserted.scalars().all())

    async def get_settlement(self, lease_id: str) -> SettlementRecord | None:
        """The settlement of ``lease_id``, or None (unfunded, live, or not queued yet)."""
        query = sa.select(_settlements).where(_settlements.c.lease_id == lease_id)
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _settlement_record(row)

    async def settlements_of(self, lease_ids: Iterable[str]) -> dict[str, SettlementRecord]:
        """The settlements of several leases, by lease id (leases without one are left out)."""
        ids = list(lease_ids)
        if not ids:
            return {}
        query = sa.select(_settlements).where(_settlements.c.lease_id.in_(ids))
        async with self._read() as conn:
            return {row.lease_id: _settlement_record(row) for row in await conn.execute(query)}

    async def due_settlements(
        self, owner: str, *, at: datetime | None = None, limit: int = 100
    ) -> list[SettlementRecord]:
        """Pending settlements due for an attempt and not claimed by another coordinator,
        oldest first (claim each with :meth:`claim_settlement` before working on it)."""
        at = _when(at)
        query = (
            sa.select(_settlements)
            .where(
                _settlements.c.next_attempt_at <= at,
                _claimable(owner, at),
            )
            .order_by(_settlements.c.next_attempt_at, _settlements.c.lease_id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [_settlement_record(row) for row in await conn.execute(query)]

    async def due_settlements_with_providers(
        self,
        owner: str,
        *,
        live_since: datetime,
        at: datetime | None = None,
        limit: int = 100,
    ) -> list[tuple[SettlementRecord, str, bool]]:
        """:meth:`due_settlements`, each with its lease's provider and whether the database
        shows that provider linked somewhere: ``online`` with a heartbeat stored since
        ``live_since`` (the replica holding its link settles it; see
        :class:`~jupyter_io.coordinator.settlement.SettlementWorker`)."""
        at = _when(at)
        linked = sa.and_(
            _providers.c.status == ProviderStatus.ONLINE.value,
            _providers.c.last_heartbeat >= _aware(live_since),
        )
        query = (
            sa.select(_settlements, _leases.c.provider_pubkey, linked.label("provider_linked"))
            .join(_leases, _leases.c.id == _settlements.c.lease_id)
            .join(_providers, _providers.c.pubkey == _leases.c.provider_pubkey)
            .where(_settlements.c.next_attempt_at <= at, _claimable(owner, at))
            .order_by(_settlements.c.next_attempt_at, _settlements.c.lease_id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [
                (_settlement_record(row), row.provider_pubkey, bool(row.provider_linked))
                for row in await conn.execute(query)
            ]

    async def pending_settlements(self) -> int:
        """How many settlements are still pending (anyone's)."""
        query = sa.select(sa.func.count()).where(
            _settlements.c.state == SettlementState.PENDING.value
        )
        async with self._read() as conn:
            return int(await conn.scalar(query) or 0)

    async def claim_settlement(
        self, lease_id: str, owner: str, *, until: datetime, at: datetime | None = None
    ) -> SettlementRecord | None:
        """Claim a pending settlement for ``owner`` until ``until``, atomically: of several
        coordinators asking at once exactly one gets the row. Counts an attempt. Returns the
        claimed row, or None (done, or claimed by another coordinator)."""
        at = _when(at)
        async with self._write() as conn:
            row = (
                await conn.execute(
                    sa.update(_settlements)
                    .where(
                        _settlements.c.lease_id == lease_id,
                        _claimable(owner, at),
                    )
                    .values(
                        claimed_by=owner,
                        claimed_until=_aware(until),
                        attempts=_settlements.c.attempts + 1,
                        updated_at=at,
                    )
                    .returning(*_settlements.c)
                )
            ).first()
        return None if row is None else _settlement_record(row)

    async def retry_settlement(
        self,
        lease_id: str,
        owner: str,
        *,
        error: str | None,
        next_attempt_at: datetime,
        amount_lamports: int | None = None,
        kind: SettlementKind | None = None,
        at: datetime | None = None,
    ) -> bool:
        """Release ``owner``'s claim on a pending settlement, noting why this attempt did not
        finish and when to try again (and its new ``kind``: ``refund`` once the provider
        cannot co-sign). Returns whether the row was still pending."""
        at = _when(at)
        values: dict[str, Any] = {
            "claimed_by": None,
            "claimed_until": None,
            "error": error,
            "next_attempt_at": _aware(next_attempt_at),
            "updated_at": at,
        }
        if amount_lamports is not None:
            values["amount_lamports"] = amount_lamports
        if kind is not None:
            values["kind"] = SettlementKind(kind).value
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(
                    _settlements.c.lease_id == lease_id,
                    _settlements.c.state == SettlementState.PENDING.value,
                    sa.or_(_settlements.c.claimed_by == owner, _settlements.c.claimed_by.is_(None)),
                )
                .values(values)
            )
            return bool(result.rowcount)

    async def finish_settlement(
        self,
        lease_id: str,
        *,
        signature: str | None,
        amount_lamports: int,
        fee_lamports: int = 0,
        at: datetime | None = None,
    ) -> bool:
        """Mark a pending settlement done: its closing transaction ``signature`` landed and
        paid the provider ``amount_lamports`` (record nothing before it landed). A ``failed``
        row (closed by a transaction not known then) is done too once its closer reports a
        landed one. Returns whether it changed: a second call (another coordinator, a
        duplicate) changes nothing."""
        return await self._conclude_settlement(
            lease_id,
            (SettlementState.PENDING, SettlementState.FAILED),
            SettlementState.DONE,
            signature=signature,
            amount_lamports=amount_lamports,
            fee_lamports=fee_lamports,
            error=None,
            at=at,
        )

    async def fail_settlement(
        self, lease_id: str, *, error: str, at: datetime | None = None
    ) -> bool:
        """Mark a pending settlement ``failed``: its escrow can no longer be settled (closed
        by a transaction this coordinator did not submit, or no longer movable by arbiter +
        provider). Nothing is recorded as paid (amount and fee 0, no signature); ``error``
        says why. Returns whether it changed."""
        return await self._conclude_settlement(
            lease_id,
            (SettlementState.PENDING,),
            SettlementState.FAILED,
            signature=None,
            amount_lamports=0,
            fee_lamports=0,
            error=error,
            at=at,
        )

    async def _conclude_settlement(
        self,
        lease_id: str,
        from_states: tuple[SettlementState, ...],
        state: SettlementState,
        *,
        signature: str | None,
        amount_lamports: int,
        fee_lamports: int,
        error: str | None,
        at: datetime | None,
    ) -> bool:
        """Move a settlement in one of ``from_states`` to ``state`` with what it paid, and
        release its claim; whether it changed (one writer wins)."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(
                    _settlements.c.lease_id == lease_id,
                    _settlements.c.state.in_([s.value for s in from_states]),
                )
                .values(
                    state=state.value,
                    signature=signature,
                    amount_lamports=amount_lamports,
                    fee_lamports=fee_lamports,
                    error=error,
                    claimed_by=None,
                    claimed_until=None,
                    updated_at=_when(at),
                )
            )
            return bool(result.rowcount)

    async def note_settlement_attempt(self, lease_id: str, owner: str, signature: str) -> bool:
        """Note, before it is sent, the signature of the closing transaction ``owner`` is
        about to submit for a pending settlement it holds (no amount: that is recorded once
        it landed), so that whoever finds the escrow closed later can tell whether that
        transaction closed it. Returns whether the row was still ``owner``'s."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(
                    _settlements.c.lease_id == lease_id,
                    _settlements.c.state == SettlementState.PENDING.value,
                    _settlements.c.claimed_by == owner,
                )
                .values(signature=signature)
            )
            return bool(result.rowcount)

    async def note_settlement_signature(self, lease_id: str, signature: str) -> bool:
        """Record how a settlement that is done without a known signature was done (the
        escrow was seen closed before its closer reported). Returns whether it changed."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(
                    _settlements.c.lease_id == lease_id,
                    _settlements.c.state == SettlementState.DONE.value,
                    _settlements.c.signature.is_(None),
                )
                .values(signature=signature)
            )
            return bool(result.rowcount)

    async def release_settlements(self, owner: str) -> int:
        """Drop every claim ``owner`` holds (a coordinator shutting down), so the next one
        can pick its rows up at once. Returns how many were released."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(_settlements.c.claimed_by == owner)
                .values(claimed_by=None, claimed_until=None)
            )
            return int(result.rowcount or 0)

    # ---- usage reports -----------------------------------------------------------------

    async def add_usage_report(self, report: UsageReport) -> bool:
        """Store a provider's usage report (its signature already checked). A report whose
        ``(lease_id, seq)`` is already stored is ignored: returns ``False``, else ``True``.
        Reports are accepted after the lease ended (the last one often arrives late).
        Raises ``LookupError`` for an unknown lease."""
        received_at = _when(report.received_at)
        insert = (
            self._insert(_usage)
            .values(
                lease_id=report.lease_id,
                seq=report.seq,
                seconds_delivered=report.seconds_delivered,
                gpu_utilisation=report.gpu_utilisation,
                signature=report.signature,
                reported_at=report.reported_at,
                received_at=received_at,
            )
            .on_conflict_do_nothing(index_elements=[_usage.c.lease_id, _usage.c.seq])
            .returning(_usage.c.seq)
        )
        async with self._write() as conn:
            known = await conn.scalar(
                sa.select(_leases.c.id).where(_leases.c.id == report.lease_id)
            )
            if known is None:
                raise LookupError(f"usage report for unknown lease {report.lease_id!r}")
            return (await conn.execute(insert)).first() is not None

    async def usage_for_lease(self, lease_id: str) -> int:
        """Seconds delivered on a lease, summed over its usage reports (0 without any)."""
        query = sa.select(sa.func.coalesce(sa.func.sum(_usage.c.seconds_delivered), 0)).where(
            _usage.c.lease_id == lease_id
        )
        async with self._read() as conn:
            return int(await conn.scalar(query) or 0)

    async def usage_reports(self, lease_id: str) -> list[UsageReport]:
        """A lease's usage reports in ``seq`` order (for audits and disputes)."""
        query = sa.select(_usage).where(_usage.c.lease_id == lease_id).order_by(_usage.c.seq)
        async with self._read() as conn:
            return [
                UsageReport(
                    lease_id=row.lease_id,
                    seq=row.seq,
                    seconds_delivered=row.seconds_delivered,
                    signature=row.signature,
                    reported_at=row.reported_at,
                    gpu_utilisation=row.gpu_utilisation,
                    received_at=row.received_at,
                )
                for row in await conn.execute(query)
            ]


def _claimable(owner: str, at: datetime) -> sa.ColumnElement[bool]:
    """A pending settlement nobody else holds a live claim on (a claim of a replica that
    stopped, or has not beaten for :data:`DEAD_REPLICA_S`, is no longer live)."""
    dead = sa.select(_replicas.c.id).where(
        sa.or_(
            _replicas.c.stopped_at.is_not(None),
            _replicas.c.last_seen < at - timedelta(seconds=DEAD_REPLICA_S),
        )
    )
    return sa.and_(
        _settlements.c.state == SettlementState.PENDING.value,
        sa.or_(
            _settlements.c.claimed_until.is_(None),
            _settlements.c.claimed_until < at,
            _settlements.c.claimed_by == owner,
            _settlements.c.claimed_by.in_(dead),
        ),
    )


def _settlement_record(row: sa.Row[Any]) -> SettlementRecord:
    m = row._mapping
    values = {name: m[name] for name in SettlementRecord.__dataclass_fields__}
    values["kind"] = SettlementKind(values["kind"])
    values["state"] = SettlementState(values["state"])
    return SettlementRecord(**values)
