"""Replicas: coordinator processes sharing one database, the change feed, and the outbox.

:class:`ReplicaQueries` is :attr:`Store.replicas <jupyter_io.coordinator.store.Store.replicas>`.
A replica :meth:`~ReplicaQueries.register`\\ s itself, :meth:`~ReplicaQueries.beat`\\ s every
second and :meth:`~ReplicaQueries.stop`\\ s when it shuts down; :meth:`~ReplicaQueries.live`
lists the others. The change feed (``provider_changes``, written by database triggers,
migration 0009) is read with :meth:`~ReplicaQueries.changes_since`; the outbox
(``link_messages``) with :meth:`~ReplicaQueries.post_message`,
:meth:`~ReplicaQueries.message_targets` and :meth:`~ReplicaQueries.take_messages`.
:mod:`jupyter_io.coordinator.replicas` drives all of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..models import (
    LIVE_LEASE_STATES,
    Lease,
    Offer,
    OutboxMessage,
    Provider,
    ProviderChange,
    Replica,
)
from .engine import Aggregate, _when
from .leases import LeaseRecord, _lease_record
from .providers import OfferRecord, ProviderRecord, _offer_record, _provider_record
from .reliability import ReliabilityQueries

__all__ = ["Change", "OutboxRow", "ProviderView", "ReplicaQueries", "ReplicaRecord"]

_replicas = cast(sa.Table, Replica.__table__)
_changes = cast(sa.Table, ProviderChange.__table__)
_outbox = cast(sa.Table, OutboxMessage.__table__)
_providers = cast(sa.Table, Provider.__table__)
_offers = cast(sa.Table, Offer.__table__)
_leases = cast(sa.Table, Lease.__table__)
_LIVE = tuple(state.value for state in LIVE_LEASE_STATES)

#: Rows of replicas not seen for this long are deleted by :meth:`ReplicaQueries.prune`.
_FORGET_REPLICA = timedelta(days=1)


class Change(NamedTuple):
    """One row of the change feed: provider ``pubkey``'s view changed (at ``at``)."""

    seq: int
    pubkey: str
    at: datetime


class OutboxRow(NamedTuple):
    """A message taken from the outbox: its ``body`` is the link message's JSON text."""

    id: int
    pubkey: str
    body: str


@dataclass(frozen=True, slots=True)
class ProviderView:
    """What a replica's index needs of one provider: its row, its offers (in the order
    published) and its live leases."""

    provider: ProviderRecord
    offers: list[OfferRecord]
    leases: list[LeaseRecord]


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """A replica as stored."""

    id: str
    url: str
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None


class ReplicaQueries(Aggregate):
    """The replicas table, the change feed and the outbox (see the module docstring).

    With ``feed_engine`` (PostgreSQL: :attr:`Store.replicas
    <jupyter_io.coordinator.store.Store.replicas>` gives it a small pool of its own), what
    the feed pass and the beat do (register, beat, live, the feed, the views, the outbox's
    take, the prune, :meth:`lease`) goes through it, so it never waits for a connection of
    the main pool; none of it waits on a provider row lock either (:attr:`reliability`: the
    same for the reliability records of providers the feed brings in). Posting to the outbox and
    :meth:`stop` stay on the main engine.
    """

    def __init__(self, engine: AsyncEngine, *, feed_engine: AsyncEngine | None = None) -> None:
        super().__init__(engine)
        self._feed_engine = feed_engine or engine
        self._feed_writer = self._writer if feed_engine is None else feed_engine
        #: Reliability records read through the feed's engine (for providers the feed
        #: brings into a replica's view).
        self.reliability = ReliabilityQueries(self._feed_engine)

    def _feed_read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        return self._feed_engine.connect()

    def _feed_write(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        return self._feed_writer.begin()

    # -- replicas ---------------------------------------------------------------------------

    async def register(self, replica_id: str, url: str, *, at: datetime | None = None) -> None:
        """Record this process as a live replica reachable at ``url`` (a second call updates
        it)."""
        at = _when(at)
        insert = self._insert(_replicas)
        statement = insert.on_conflict_do_update(
            index_elements=[_replicas.c.id],
            set_={"url": url, "last_seen": at, "stopped_at": None},
        )
        values = {"id": replica_id, "url": url, "started_at": at, "last_seen": at}
        async with self._feed_write() as conn:
            await conn.execute(statement.values(values))

    async def beat(self, replica_id: str, *, at: datetime | None = None) -> bool:
        """This replica is alive at ``at``. Returns False if its row is gone (pruned after a
        long stall): register again."""
        statement = (
            sa.update(_replicas).where(_replicas.c.id == replica_id).values(last_seen=_when(at))
        )
        async with self._feed_write() as conn:
            return bool((await conn.execute(statement)).rowcount)

    async def stop(self, replica_id: str, *, at: datetime | None = None) -> None:
        """This replica stopped cleanly: mark it stopped and clear it from the providers it
        held (their links closed; they link again elsewhere)."""
        at = _when(at)
        async with self._write() as conn:
            await conn.execute(
                sa.update(_replicas)
                .where(_replicas.c.id == replica_id)
                .values(stopped_at=at, last_seen=at)
            )
            await conn.execute(
                sa.update(_providers)
                .where(_providers.c.replica_id == replica_id)
                .values(replica_id=None)
            )

    async def live(
        self, within_s: float = 5.0, *, at: datetime | None = None
    ) -> list[tuple[str, str, datetime]]:
        """``(id, url, last_seen)`` of the replicas not stopped that beat within
        ``within_s`` seconds, oldest first."""
        since = _when(at) - timedelta(seconds=within_s)
        query = (
            sa.select(_replicas.c.id, _replicas.c.url, _replicas.c.last_seen)
            .where(_replicas.c.stopped_at.is_(None), _replicas.c.last_seen >= since)
            .order_by(_replicas.c.started_at, _replicas.c.id)
        )
        async with self._feed_read() as conn:
            return [(row.id, row.url, row.last_seen) for row in await conn.execute(query)]

    async def get_replica(self, replica_id: str) -> ReplicaRecord | None:
        """One replica's row, or None."""
        async with self._feed_read() as conn:
            row = (
                await conn.execute(sa.select(_replicas).where(_replicas.c.id == replica_id))
            ).first()
        if row is None:
            return None
        return ReplicaRecord(row.id, row.url, row.started_at, row.last_seen, row.stopped_at)

    # -- the change feed --------------------------------------------------------------------

    async def last_seq(self) -> int:
        """The newest change's ``seq`` (0 for none): read it before loading a full view, then
        follow the feed from it."""
        async with self._feed_read() as conn:
            return int(await conn.scalar(sa.select(sa.func.max(_changes.c.seq))) or 0)

    async def changes_since(
        self, seq: int, limit: int = 1000, *, holes: Collection[int] = ()
    ) -> list[Change]:
        """Changes after ``seq`` in order, at most ``limit``; with ``holes``, also those of
        these older numbers that have appeared since (on PostgreSQL a number is taken when a
        row is written and visible when its transaction commits, so a higher one can be read
        first)."""
        after = _changes.c.seq > seq
        where = sa.or_(after, _changes.c.seq.in_(sorted(holes))) if holes else after
        query = (
            sa.select(_changes.c.seq, _changes.c.pubkey, _changes.c.at)
            .where(where)
            .order_by(_changes.c.seq)
            .limit(limit)
        )
        async with self._feed_read() as conn:
            return [Change(row.seq, row.pubkey, row.at) for row in await conn.execute(query)]

    async def provider_views(self, pubkeys: Collection[str]) -> dict[str, ProviderView]:
        """The current view of each of ``pubkeys`` (absent: no such provider), in three
        queries whatever their number (``= ANY(:keys)`` on PostgreSQL)."""
        keys = sorted(set(pubkeys))
        if not keys:
            return {}
        async with self._feed_read() as conn:
            providers = (
                await conn.execute(
                    sa.select(_providers).where(self._any(_providers.c.pubkey, keys))
                )
            ).all()
            offers = (
                await conn.execute(
                    sa.select(_offers)
                    .where(self._any(_offers.c.provider_pubkey, keys))
                    .order_by(_offers.c.provider_pubkey, _offers.c.id)
                )
            ).all()
            leases = (
                await conn.execute(
                    sa.select(_leases).where(
                        self._any(_leases.c.provider_pubkey, keys), _leases.c.state.in_(_LIVE)
                    )
                )
            ).all()
        views = {row.pubkey: ProviderView(_provider_record(row), [], []) for row in providers}
        for row in offers:
            offer = _offer_record(row)
            if (view := views.get(offer.provider_pubkey)) is not None:
                view.offers.append(offer)
        for row in leases:
            lease = _lease_record(row)
            if (view := views.get(lease.provider_pubkey)) is not None:
                view.leases.append(lease)
        return views

    async def lease(self, lease_id: str) -> LeaseRecord | None:
        """One lease as stored, or None (the feed asks this of a lease gone from a view)."""
        async with self._feed_read() as conn:
            row = (await conn.execute(sa.select(_leases).where(_leases.c.id == lease_id))).first()
        return None if row is None else _lease_record(row)

    def _any(self, column: sa.ColumnElement[str], keys: list[str]) -> sa.ColumnElement[bool]:
        # One array parameter on PostgreSQL (one plan, no parameter limit); IN on SQLite.
        if self._postgres:
            array = sa.bindparam(None, keys, type_=postgresql.ARRAY(sa.String))
            return column == sa.any_(array)
        return column.in_(keys)

    # -- the outbox -------------------------------------------------------------------------

    async def post_message(
        self, pubkey: str, body: str, ttl_s: float, *, at: datetime | None = None
    ) -> int:
        """Leave ``body`` (a link message's JSON text) for provider ``pubkey``, for whichever
        replica holds (or gets, within ``ttl_s`` seconds) its link. Returns the row's id."""
        at = _when(at)
        values = {
            "pubkey": pubkey,
            "body": body,
            "created_at": at,
            "expires_at": at + timedelta(seconds=ttl_s),
        }
        async with self._write() as conn:
            inserted = await conn.execute(sa.insert(_outbox).values(values).returning(_outbox.c.id))
            return int(inserted.scalar_one())

    async def message_targets(self, *, at: datetime | None = None) -> set[str]:
        """Providers with unexpired messages waiting (the outbox is small: this is cheap)."""
        query = sa.select(_outbox.c.pubkey).where(_outbox.c.expires_at > _when(at)).distinct()
        async with self._feed_read() as conn:
            return set((await conn.scalars(query)).all())

    async def take_messages(
        self, pubkeys: Collection[str], *, at: datetime | None = None
    ) -> list[OutboxRow]:
        """Delete and return the unexpired messages for ``pubkeys`` in the order posted;
        each row is returned to exactly one caller, whichever replica asks."""
        if not pubkeys:
            return []
        statement = (
            sa.delete(_outbox)
            .where(self._any(_outbox.c.pubkey, sorted(pubkeys)), _outbox.c.expires_at > _when(at))
            .returning(_outbox.c.id, _outbox.c.pubkey, _outbox.c.body)
        )
        async with self._feed_write() as conn:
            rows = (await conn.execute(statement)).all()
        return sorted((OutboxRow(row.id, row.pubkey, row.body) for row in rows), key=_by_id)

    # -- housekeeping -----------------------------------------------------------------------

    async def prune(
        self, *, changes_before: datetime, at: datetime | None = None
    ) -> tuple[int, int]:
        """Delete changes older than ``changes_before``, expired messages, and replicas not
        seen for a day. Any replica may run it (each statement is idempotent). Returns
        ``(changes, messages)`` deleted."""
        at = _when(at)
        async with self._feed_write() as conn:
            changes = await conn.execute(
                sa.delete(_changes).where(_changes.c.at < _when(changes_before))
            )
            messages = await conn.execute(sa.delete(_outbox).where(_outbox.c.expires_at <= at))
            await conn.execute(
                sa.delete(_replicas).where(_replicas.c.last_seen < at - _FORGET_REPLICA)
            )
        return int(changes.rowcount), int(messages.rowcount)


def _by_id(row: OutboxRow) -> int:
    return row.id
