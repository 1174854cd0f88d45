"""Providers' records for their measured reliability: their links, and their sessions.

:func:`outages_before_link`, :func:`open_links` and :func:`close_link` run inside the
provider writes that change a link (:meth:`Store.upsert_provider`,
:meth:`Store.mark_provider_offline`, :meth:`Store.mark_provider_lost`), in the same
transaction; :class:`ReliabilityQueries`
(part of :class:`~jupyter_io.coordinator.store.Store`) reads a window of records back for
:mod:`jupyter_io.coordinator.reliability`, which owns the formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..models import Lease, LeaseState, Provider, ProviderLink, ProviderStatus
from .engine import Aggregate, _aware

__all__ = [
    "REJOIN_SECONDS",
    "LinkSpan",
    "ReliabilityInputs",
    "ReliabilityQueries",
    "SessionCounts",
    "close_link",
    "open_links",
    "outages_before_link",
]

_links = cast(sa.Table, ProviderLink.__table__)
_leases = cast(sa.Table, Lease.__table__)
_providers = cast(sa.Table, Provider.__table__)

#: Pubkeys per ``IN (...)`` list (SQLite's parameter limit is 32,766 on current builds).
_CHUNK = 500
#: A provider linking again this soon after a goodbye continues its last link (a restart).
REJOIN_SECONDS = 60


@dataclass(frozen=True, slots=True)
class SessionCounts:
    """One user's sessions on one provider in the window."""

    completed: int
    lost: int


@dataclass(frozen=True, slots=True)
class LinkSpan:
    """One link in (or overlapping) the window: ``closed_at`` None while it is open;
    ``down_since`` the start of the outage before it (a loss), else None."""

    linked_at: datetime
    closed_at: datetime | None
    down_since: datetime | None


async def outages_before_link(conn: AsyncConnection, pubkeys: Sequence[str]) -> dict[str, datetime]:
    """Of ``pubkeys``, those lost now, with their last heartbeat (the start of the outage a
    new link ends). Read it before the link's upsert, in the same transaction."""
    found: dict[str, datetime] = {}
    for start in range(0, len(pubkeys), _CHUNK):
        query = sa.select(_providers.c.pubkey, _providers.c.last_heartbeat).where(
            _providers.c.pubkey.in_(list(pubkeys[start : start + _CHUNK])),
            _providers.c.status == ProviderStatus.LOST.value,
        )
        found.update((pubkey, beat) for pubkey, beat in await conn.execute(query))
    return found


async def open_links(
    conn: AsyncConnection, pubkeys: Sequence[str], at: datetime, outages: dict[str, datetime]
) -> None:
    """``pubkeys`` linked at ``at`` (their providers rows upserted): each gets an open link,
    carrying the outage it ends from ``outages`` (:func:`outages_before_link`).

    A provider whose link is still open (it linked again while online: a new connection, a
    coordinator's restart) keeps that row, and one that said goodbye at most
    :data:`REJOIN_SECONDS` ago reopens its last row: rows grow with outages and real
    absences, not with reconnects, so a provider cannot fill the table by relinking."""
    rejoin = at - timedelta(seconds=REJOIN_SECONDS)
    reopen: list[int] = []
    rows: list[dict[str, Any]] = []
    for start in range(0, len(pubkeys), _CHUNK):
        chunk = list(pubkeys[start : start + _CHUNK])
        newest = (
            sa.select(sa.func.max(_links.c.id))
            .where(_links.c.provider_pubkey.in_(chunk))
            .group_by(_links.c.provider_pubkey)
        )
        query = sa.select(
            _links.c.provider_pubkey, _links.c.id, _links.c.closed_at, _links.c.closed_how
        ).where(_links.c.id.in_(newest))
        latest = {row.provider_pubkey: row for row in await conn.execute(query)}
        for pubkey in chunk:
            row = latest.get(pubkey)
            if row is not None and row.closed_at is None:
                continue  # still open: this link continues it
            if (
                row is not None
                and pubkey not in outages
                and row.closed_how == "offline"
                and row.closed_at >= rejoin
            ):
                reopen.append(row.id)
                continue
            rows.append(
                {
                    "provider_pubkey": pubkey,
                    "linked_at": at,
                    "closed_at": None,
                    "closed_how": None,
                    "down_since": outages.get(pubkey),
                }
            )
    for start in range(0, len(reopen), _CHUNK):
        await conn.execute(
            sa.update(_links)
            .where(_links.c.id.in_(reopen[start : start + _CHUNK]))
            .values(closed_at=None, closed_how=None)
        )
    if rows:
        await conn.execute(sa.insert(_links), rows)


async def close_link(conn: AsyncConnection, pubkey: str, at: datetime, how: str) -> None:
    """Close the provider's open link at ``at`` (``offline`` or ``lost``)."""
    await conn.execute(
        sa.update(_links)
        .where(_links.c.provider_pubkey == pubkey, _links.c.closed_at.is_(None))
        .values(closed_at=at, closed_how=how)
    )


@dataclass(slots=True)
class ReliabilityInputs:
    """One provider's record in a window, as :func:`~jupyter_io.coordinator.reliability.
    measure` takes it."""

    sessions: dict[str, SessionCounts] = field(default_factory=dict)
    links: list[LinkSpan] = field(default_factory=list)
    #: Its last heartbeat while it is lost now, else None.
    lost_since: datetime | None = None


class ReliabilityQueries(Aggregate):
    """Reading providers' records back (see the module docstring)."""

    async def reliability_inputs(
        self, pubkeys: Sequence[str], *, since: datetime
    ) -> dict[str, ReliabilityInputs]:
        """The records of ``pubkeys`` since ``since``: sessions per user (leases that ended
        after their kernel ran, and failed ones, that ended at or after ``since``; a
        provider's leases on itself left out), links open at or after ``since``, and whether
        it is lost now. Providers with nothing in the window are absent."""
        since = _aware(since)
        found: dict[str, ReliabilityInputs] = {}
        ended, failed = LeaseState.ENDED.value, LeaseState.FAILED.value
        async with self._read() as conn, conn.begin():
            for start in range(0, len(pubkeys), _CHUNK):
                chunk = list(pubkeys[start : start + _CHUNK])
                lost_count = sa.func.sum(sa.case((_leases.c.state == failed, 1), else_=0))
                done_count = sa.func.sum(
                    sa.case(
                        (sa.and_(_leases.c.state == ended, _leases.c.active_at.is_not(None)), 1),
                        else_=0,
                    )
                )
                sessions = (
                    sa.select(
                        _leases.c.provider_pubkey, _leases.c.user_pubkey, done_count, lost_count
                    )
                    .where(
                        _leases.c.ended_at >= since,
                        _leases.c.provider_pubkey.in_(chunk),
                        _leases.c.user_pubkey != _leases.c.provider_pubkey,
                    )
                    .group_by(_leases.c.provider_pubkey, _leases.c.user_pubkey)
                )
                for provider, user, done, lost in await conn.execute(sessions):
                    if done or lost:
                        counts = SessionCounts(int(done or 0), int(lost or 0))
                        found.setdefault(provider, ReliabilityInputs()).sessions[user] = counts
                links = (
                    sa.select(
                        _links.c.provider_pubkey,
                        _links.c.linked_at,
                        _links.c.closed_at,
                        _links.c.down_since,
                    )
                    .where(
                        _links.c.provider_pubkey.in_(chunk),
                        sa.or_(_links.c.closed_at.is_(None), _links.c.closed_at >= since),
                    )
                    .order_by(_links.c.provider_pubkey, _links.c.linked_at)
                )
                for provider, linked_at, closed_at, down_since in await conn.execute(links):
                    found.setdefault(provider, ReliabilityInputs()).links.append(
                        LinkSpan(linked_at, closed_at, down_since)
                    )
                lost = sa.select(_providers.c.pubkey, _providers.c.last_heartbeat).where(
                    _providers.c.pubkey.in_(chunk),
                    _providers.c.status == ProviderStatus.LOST.value,
                )
                for provider, beat in await conn.execute(lost):
                    found.setdefault(provider, ReliabilityInputs()).lost_since = beat
        return found

    async def prune_provider_links(self, before: datetime) -> int:
        """Delete links closed before ``before`` (out of every window); returns how many."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.delete(_links).where(_links.c.closed_at < _aware(before))
            )
            return int(result.rowcount)
