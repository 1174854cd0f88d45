"""The coordinator's durable state: providers, offers, leases, settlements and usage reports.

Open a store with :meth:`Store.open` (a SQLite file by default, PostgreSQL for several
coordinator processes sharing one database); it upgrades the schema to the newest Alembic
revision first, so a coordinator upgrade keeps its data. Then:

* a provider connects: :meth:`Store.upsert_provider`, then :meth:`Store.replace_offers`;
* heartbeats: batch them in memory and flush with :meth:`Store.record_heartbeats` (one SQL
  statement per batch, whatever its size);
* heartbeats stop: :meth:`Store.mark_provider_lost` fails the provider's leases;
* a user leases: the scheduler picks a provider, :meth:`Store.create_lease` claims its GPUs
  atomically (or raises :class:`~jupyter_io.errors.LeaseError`), then
  :meth:`Store.activate_lease`, :meth:`Store.end_lease` / :meth:`Store.fail_lease`;
* usage: :meth:`Store.add_usage_report`, :meth:`Store.usage_for_lease`; the user's
  acknowledgements: :meth:`Store.record_ack`;
* after a coordinator restart: :meth:`Store.live_leases` and :meth:`Store.load_live_offers`
  rebuild the in-memory state.

Every method is one transaction. Results are frozen dataclasses (:class:`LeaseRecord`, ...),
detached from the database. Timestamps are timezone-aware UTC; each write method takes an
``at=`` for the time of the event (default: now).

Concurrency: on PostgreSQL every write that changes a provider's capacity, inventory or
counters first locks the provider's row (``SELECT ... FOR UPDATE``), always before any lease
row, so capacity checks cannot race and these transactions cannot deadlock on each other.
(Heartbeat flushes lock many provider rows; a deadlock between two flushes is retried.) On
SQLite every write transaction is ``BEGIN IMMEDIATE``: one writer at a time, across
processes too.

One module per aggregate, each with its records and queries, all on one engine
(:mod:`.engine`) and one Alembic history (``jupyter_io/coordinator/migrations``):
:mod:`.providers` (providers and offers), :mod:`.leases` (leases, their escrows and
acknowledgements), :mod:`.settlements` (settlements and usage reports), :mod:`.cohorts`
(classroom cohorts: instructors, students, join codes, reservations),
:mod:`.ledger_accounts` (the embedded ledger's accounts, tables of its own in the same
database), and :mod:`.replicas` (replicas sharing the database, the change feed and the
outbox: :attr:`Store.replicas`). :class:`Store` is the first three on one engine; import
every name from this package.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .cohorts import (
    CodeRecord,
    CodeRefused,
    CohortQueries,
    CohortRecord,
    MemberRecord,
    ReservationRecord,
)
from .engine import (
    MIGRATIONS_DIR,
    alembic_config,
    make_engine,
    migration_transaction,
    normalise_url,
    upgrade_database,
    upgrade_engine,
)
from .gpu_checks import GpuCheckQueries, GpuCheckRecord
from .leases import LeaseQueries, LeaseRecord
from .ledger_accounts import SqlLedgerStore
from .providers import (
    LiveOffer,
    OfferRecord,
    OfferSpec,
    ProviderProfile,
    ProviderQueries,
    ProviderRecord,
)
from .reliability import ReliabilityInputs, ReliabilityQueries
from .replicas import Change, OutboxRow, ProviderView, ReplicaQueries, ReplicaRecord
from .settlements import SettlementQueries, SettlementRecord, UsageReport

__all__ = [
    "FEED_POOL",
    "MIGRATIONS_DIR",
    "Change",
    "CodeRecord",
    "CodeRefused",
    "CohortQueries",
    "CohortRecord",
    "GpuCheckQueries",
    "GpuCheckRecord",
    "LeaseQueries",
    "LeaseRecord",
    "LiveOffer",
    "MemberRecord",
    "OfferRecord",
    "OfferSpec",
    "OutboxRow",
    "ProviderProfile",
    "ProviderQueries",
    "ProviderRecord",
    "ProviderView",
    "ReliabilityInputs",
    "ReliabilityQueries",
    "ReplicaQueries",
    "ReplicaRecord",
    "ReservationRecord",
    "SettlementQueries",
    "SettlementRecord",
    "SqlLedgerStore",
    "Store",
    "UsageReport",
    "alembic_config",
    "make_engine",
    "migration_transaction",
    "normalise_url",
    "upgrade_database",
]

#: The pool of the change feed's own engine on PostgreSQL (:attr:`Store.replicas`): the feed
#: pass, the replica's beat and the prune, each one connection at a time.
FEED_POOL: dict[str, Any] = {"pool_size": 2, "max_overflow": 2}


class Store(
    ProviderQueries, LeaseQueries, SettlementQueries, CohortQueries, ReliabilityQueries,
    GpuCheckQueries,
):
    """Durable state of one coordinator (or of several sharing one PostgreSQL database).

    Create it with :meth:`Store.open` and :meth:`close` it when done (or use ``async with``).
    Its methods are its aggregates' queries (:class:`ProviderQueries`, :class:`LeaseQueries`,
    :class:`SettlementQueries`, :class:`CohortQueries`, :class:`ReliabilityQueries`), all on
    this one engine.
    """

    @property
    def write_engine(self) -> AsyncEngine:
        """The engine as the store writes with (on SQLite: transactions that take the write
        lock up front), for other tables kept in this database: the embedded ledger's
        (:class:`SqlLedgerStore`)."""
        return self._writer

    @classmethod
    async def open(
        cls, url: str | os.PathLike[str] | URL, *, migrate: bool = True, **engine_kw: Any
    ) -> Store:
        """Connect to ``url`` (a SQLite path or URL, or ``postgresql://...``) and upgrade its
        schema to the newest revision, creating it in an empty database. Pass
        ``migrate=False`` only when something else has already migrated it. Extra keyword
        arguments configure the engine (``pool_size=`` for a busy PostgreSQL coordinator)."""
        engine = make_engine(url, **engine_kw)
        try:
            if migrate:
                await upgrade_engine(engine, "head")
        except BaseException:
            await engine.dispose()
            raise
        store = cls(engine)
        store.__dict__["_engine_kw"] = engine_kw
        return store

    async def close(self) -> None:
        """Close every pooled connection. The store cannot be used afterwards."""
        feed = self.__dict__.pop("_feed_engine", None)
        if feed is not None:
            await feed.dispose()
        await self._engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def replicas(self) -> ReplicaQueries:
        """The replicas sharing this database, the change feed and the outbox
        (:class:`ReplicaQueries`)."""
        queries = self.__dict__.get("_replica_queries")
        if queries is None:
            feed = None
            if self._postgres:
                # The change feed and the replica's beat get a small pool of their own: lease
                # transactions waiting on provider row locks can take every connection of the
                # main pool, and the view must keep moving meanwhile.
                kw = {**self.__dict__.get("_engine_kw", {}), **FEED_POOL}
                feed = self.__dict__["_feed_engine"] = make_engine(self._engine.url, **kw)
            queries = ReplicaQueries(self._engine, feed_engine=feed)
            self.__dict__["_replica_queries"] = queries
        return queries

    @property
    def engine(self) -> AsyncEngine:
        """The underlying engine (for tests and tools; the methods below are the API)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return str(self._engine.dialect.name)
