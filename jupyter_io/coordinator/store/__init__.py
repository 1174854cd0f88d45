"""The coordinator's durable state: providers, offers, leases and usage reports.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ...errors import ConfigError, LeaseError
from ..models import (
    LIVE_LEASE_STATES,
    Lease,
    LeaseState,
    Offer,
    Provider,
    ProviderStatus,
    SettlementKind,
    SettlementRow,
    SettlementState,
    UsageReportRow,
)

__all__ = [
    "MIGRATIONS_DIR",
    "LeaseRecord",
    "LiveOffer",
    "OfferRecord",
    "OfferSpec",
    "ProviderProfile",
    "ProviderRecord",
    "SettlementRecord",
    "Store",
    "UsageReport",
    "alembic_config",
    "make_engine",
    "migration_transaction",
    "normalise_url",
    "upgrade_database",
]

#: The Alembic script directory (``env.py``, ``versions/``).
MIGRATIONS_DIR = Path(__file__).resolve().parent.with_name("migrations")

#: How long a SQLite writer waits for another writer (another coordinator process, say)
#: before giving up with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0

# Execution option that makes the SQLite "begin" hook take the write lock up front.
_WRITE = "jupyter_io_write"
# pg_advisory_xact_lock key serialising schema upgrades between coordinator processes.
_MIGRATION_LOCK_KEY = 0x6A7570696F  # "jupio"
# PostgreSQL SQLSTATEs worth retrying the whole transaction for.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}")
_LIVE = tuple(state.value for state in LIVE_LEASE_STATES)

_T = TypeVar("_T")

_providers = cast(sa.Table, Provider.__table__)
_offers = cast(sa.Table, Offer.__table__)
_leases = cast(sa.Table, Lease.__table__)
_usage = cast(sa.Table, UsageReportRow.__table__)
_settlements = cast(sa.Table, SettlementRow.__table__)


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """What a provider says about itself when it connects; input to
    :meth:`Store.upsert_provider`."""

    pubkey: str
    display_name: str = ""
    region: str = ""
    reachable_url: str | None = None

    def __post_init__(self) -> None:
        _check_pubkey(self.pubkey, "provider")


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A provider as stored, with its reliability counters (see
    :class:`~jupyter_io.coordinator.models.Provider`)."""

    pubkey: str
    display_name: str
    region: str
    reachable_url: str | None
    status: ProviderStatus
    first_seen: datetime
    last_heartbeat: datetime
    online_since: datetime | None
    sessions_ok: int
    sessions_failed: int
    heartbeats_missed: int
    times_lost: int
    online_seconds: int
    #: How many times it linked so far (the latest link's number; see :meth:`Store.
    #: mark_provider_offline`).
    link_generation: int = 0

    @property
    def online(self) -> bool:
        return self.status is ProviderStatus.ONLINE

    def online_seconds_total(self) -> int:
        """Seconds online so far: closed stretches plus the open one up to the last
        heartbeat. Divide by the time since ``first_seen`` for an uptime fraction."""
        if self.online_since is None:
            return self.online_seconds
        open_stretch = (self.last_heartbeat - self.online_since).total_seconds()
        return self.online_seconds + max(0, int(open_stretch))


@dataclass(frozen=True, slots=True)
class OfferSpec:
    """One group of identical GPUs a provider offers; input to :meth:`Store.replace_offers`.

    ``gpu_indices`` are the device indices of the group; leave them out and the store numbers
    the groups' GPUs consecutively from 0, in the order given. ``max_kernels`` (default:
    ``count``) caps the concurrent leases on the group.
    """

    gpu_model: str
    vram_bytes: int
    count: int
    price_lamports_per_hour: int
    simulated: bool = False
    benchmark_tflops: float | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    max_kernels: int | None = None
    gpu_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.gpu_model:
            raise ValueError("an offer needs a GPU model name")
        if self.count < 1:
            raise ValueError(f"an offer needs at least one GPU, not {self.count}")
        if self.vram_bytes < 0 or self.price_lamports_per_hour < 0:
            raise ValueError("VRAM and price cannot be negative")
        if not isinstance(self.price_lamports_per_hour, int):
            raise TypeError("price_lamports_per_hour is an integer number of lamports")
        if self.max_kernels is not None and self.max_kernels < 1:
            raise ValueError(f"max_kernels must be at least 1, not {self.max_kernels}")
        if self.gpu_indices is not None and (
            len(self.gpu_indices) != self.count
            or len(set(self.gpu_indices)) != self.count
            or min(self.gpu_indices) < 0
        ):
            raise ValueError(
                f"gpu_indices {self.gpu_indices} must be {self.count} distinct device indices"
            )


@dataclass(frozen=True, slots=True)
class OfferRecord:
    """An offer as stored."""

    id: int
    provider_pubkey: str
    gpu_model: str
    vram_bytes: int
    count: int
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    simulated: bool
    benchmark_tflops: float | None
    driver_version: str | None
    cuda_version: str | None
    max_kernels: int
    published_at: datetime


@dataclass(frozen=True, slots=True)
class LiveOffer:
    """An offer of an online provider with its current load, for the scheduler's index."""

    offer: OfferRecord
    provider: ProviderRecord
    #: Indices of the group's GPUs held by requested or active leases.
    leased_indices: frozenset[int]
    #: Requested or active leases on the group.
    live_leases: int

    @property
    def free_gpus(self) -> int:
        """GPUs a new lease could get now (0 when the group runs ``max_kernels`` leases)."""
        if self.live_leases >= self.offer.max_kernels:
            return 0
        return self.offer.count - len(self.leased_indices)


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

    @property
    def live(self) -> bool:
        """Whether the lease still holds its GPUs (requested or active)."""
        return self.state in LIVE_LEASE_STATES

    @property
    def funded(self) -> bool:
        """Whether an escrow was verified for this lease."""
        return self.escrow_address is not None


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


# --------------------------------------------------------------------------------------------
# Engines and migrations


def normalise_url(url: str | os.PathLike[str] | URL) -> URL:
    """Turn what a user typed into an async SQLAlchemy URL.

    A filesystem path or ``sqlite:///path`` becomes ``sqlite+aiosqlite:///path``;
    ``postgresql://...`` (or ``postgres://``) becomes ``postgresql+asyncpg://...``. In-memory
    SQLite is refused: every connection would see its own empty database.
    """
    if isinstance(url, os.PathLike) or (isinstance(url, str) and "://" not in url):
        path = Path(os.fspath(url)).expanduser().resolve()
        return URL.create("sqlite+aiosqlite", database=str(path))
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"{url!r} is not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
            raise ConfigError(
                "the coordinator needs a SQLite file, not an in-memory database: "
                "use sqlite:///path/to/coordinator.db"
            )
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigError(
        f"unsupported database {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite:///path/to/coordinator.db or postgresql://user@host/dbname"
    )


def make_engine(url: str | os.PathLike[str] | URL, **engine_kw: Any) -> AsyncEngine:
    """An async engine for ``url`` set up the way the store needs it.

    SQLite: WAL journal (readers never block the writer), ``synchronous=NORMAL`` (a commit
    survives a crash of the process, though not of the machine), foreign keys on, and
    SQLAlchemy in charge of BEGIN so that write transactions can be ``BEGIN IMMEDIATE``.
    Extra keyword arguments go to :func:`~sqlalchemy.ext.asyncio.create_async_engine`.
    """
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(parsed, **engine_kw)

    if parsed.database:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, **engine_kw.pop("connect_args", {})}
    engine = create_async_engine(parsed, connect_args=connect_args, **engine_kw)
    locked_error = (sqlite3.OperationalError, engine.dialect.loaded_dbapi.OperationalError)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 module from issuing its own (deferred) BEGIN; _on_begin does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() != "wal":
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
            except locked_error:
                # Another process is switching this file to WAL right now (the switch needs
                # the file to itself and does not wait on the busy timeout). The mode is
                # stored in the file, so it holds for every later connection; this one works
                # the same meanwhile, writers being serialised by BEGIN IMMEDIATE either way.
                pass
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY
        # when another writer got in between (the busy timeout does not cover upgrading a
        # read lock to a write lock). Taking the write lock at BEGIN makes writers queue.
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@contextlib.asynccontextmanager
async def migration_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A write transaction that only one process at a time can hold: schema upgrades from
    several coordinators starting together (or the ``alembic`` CLI) run one after another."""
    async with engine.execution_options(**{_WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        yield conn


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic :class:`~alembic.config.Config` for the coordinator's migrations, without an
    ini file. With ``connection``, env.py migrates that connection in its transaction."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _alembic_upgrade(connection: sa.Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def _upgrade(engine: AsyncEngine, revision: str) -> None:
    async with migration_transaction(engine) as conn:
        await conn.run_sync(_alembic_upgrade, revision)


async def upgrade_database(url: str | os.PathLike[str] | URL, revision: str = "head") -> None:
    """Upgrade the schema at ``url`` to ``revision`` (Alembic ``upgrade``) in one
    transaction. :meth:`Store.open` does this for ``head``; call it yourself to stop at an
    older revision."""
    engine = make_engine(url)
    try:
        await _upgrade(engine, revision)
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------------------------
# The store


class Store:
    """Durable state of one coordinator (or of several sharing one PostgreSQL database).

    Create it with :meth:`Store.open` and :meth:`close` it when done (or use ``async with``).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        """Wrap an engine from :func:`make_engine` whose schema is already up to date; most
        callers want :meth:`Store.open`."""
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def write_engine(self) -> AsyncEngine:
        """The engine as the store writes with (on SQLite: transactions that take the write
        lock up front), for other tables kept in this database: the embedded ledger's
        (:class:`~jupyter_io.payments.ledger.SqlLedgerStore`)."""
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
                await _upgrade(engine, "head")
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    async def close(self) -> None:
        """Close every pooled connection. The store cannot be used afterwards."""
        await self._engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def engine(self) -> AsyncEngine:
        """The underlying engine (for tests and tools; the methods below are the API)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return str(self._engine.dialect.name)

    # ---- transactions ------------------------------------------------------------------

    def _write(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        return self._writer.begin()

    def _read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        return self._engine.connect()

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table) if self._postgres else sqlite.insert(table)

    async def _lock_provider(self, conn: AsyncConnection, pubkey: str) -> sa.Row[Any] | None:
        # FOR UPDATE is rendered on PostgreSQL and dropped on SQLite, whose BEGIN IMMEDIATE
        # already holds the database's single write lock.
        query = sa.select(_providers).where(_providers.c.pubkey == pubkey).with_for_update()
        return (await conn.execute(query)).first()

    # ---- providers and offers ----------------------------------------------------------

    def _provider_upsert(self) -> Any:
        insert = self._insert(_providers)
        excluded = insert.excluded
        return insert.on_conflict_do_update(
            index_elements=[_providers.c.pubkey],
            set_={
                "display_name": excluded.display_name,
                "region": excluded.region,
                "reachable_url": excluded.reachable_url,
                "status": ProviderStatus.ONLINE.value,
                "last_heartbeat": excluded.last_heartbeat,
                "link_generation": _providers.c.link_generation + 1,
                # A provider that reconnects while still online keeps its open stretch.
                "online_since": sa.case(
                    (
                        _providers.c.status == ProviderStatus.ONLINE.value,
                        _providers.c.online_since,
                    ),
                    else_=excluded.online_since,
                ),
            },
        )

    @staticmethod
    def _provider_values(profile: ProviderProfile, at: datetime) -> dict[str, Any]:
        return {
            "pubkey": profile.pubkey,
            "display_name": profile.display_name,
            "region": profile.region,
            "reachable_url": profile.reachable_url,
            "status": ProviderStatus.ONLINE.value,
            "first_seen": at,
            "last_heartbeat": at,
            "online_since": at,
            "link_generation": 1,
        }

    async def upsert_provider(
        self, profile: ProviderProfile, *, at: datetime | None = None
    ) -> ProviderRecord:
        """Register a provider that connected (or update one that reconnected) and mark it
        online; its counters and ``first_seen`` are kept. Call :meth:`replace_offers` next."""
        at = _when(at)
        async with self._write() as conn:
            row = (
                await conn.execute(
                    self._provider_upsert()
                    .values(self._provider_values(profile, at))
                    .returning(*_providers.c)
                )
            ).one()
        return _provider_record(row)

    async def upsert_providers(
        self, profiles: Iterable[ProviderProfile], *, at: datetime | None = None
    ) -> int:
        """:meth:`upsert_provider` for many providers in one transaction (a coordinator
        restart with thousands reconnecting, or a simulation); the last profile of a public key
        given twice wins. Returns how many providers were upserted."""
        at = _when(at)
        # One row per provider (PostgreSQL refuses to upsert a row twice in one statement),
        # sorted like heartbeat batches so concurrent multi-row writes lock in one order.
        latest = {profile.pubkey: profile for profile in profiles}
        rows = [self._provider_values(latest[pubkey], at) for pubkey in sorted(latest)]
        if not rows:
            return 0

        async def upsert() -> None:
            async with self._write() as conn:
                await conn.execute(self._provider_upsert(), rows)

        await self._retrying(upsert)
        return len(rows)

    async def mark_provider_offline(
        self, pubkey: str, *, at: datetime | None = None, link_generation: int | None = None
    ) -> bool:
        """Record that a provider said goodbye at ``at``. Its leases are left alone: end or
        fail them first. With ``link_generation`` (the :attr:`ProviderRecord.link_generation`
        :meth:`upsert_provider` returned for the link that said goodbye), only if the
        provider has not linked again since, here or at another coordinator sharing the
        database: a goodbye on an old link must not take a newer one offline. Returns whether
        it was marked offline."""
        at = _when(at)
        async with self._write() as conn:
            provider = await self._lock_provider(conn, pubkey)
            if provider is None or provider.status != ProviderStatus.ONLINE.value:
                return False
            if link_generation is not None and provider.link_generation != link_generation:
                return False  # linked again since: that link is the provider's now
            # The goodbye itself shows the provider was up until ``at``.
            last_heartbeat = max(provider.last_heartbeat, at)
            await conn.execute(
                sa.update(_providers)
                .where(_providers.c.pubkey == pubkey)
                .values(
                    status=ProviderStatus.OFFLINE.value,
                    last_heartbeat=last_heartbeat,
                    **_close_online_stretch(provider, last_heartbeat),
                )
            )
        return True

    async def replace_offers(
        self, pubkey: str, offers: Sequence[OfferSpec], *, at: datetime | None = None
    ) -> list[OfferRecord]:
        """Replace everything provider ``pubkey`` offers by ``offers`` (its inventory as
        published on connect). Leases already made are unaffected. Raises ``LookupError`` for
        a provider not registered with :meth:`upsert_provider`."""
        at = _when(at)
        rows = [
            {
                "provider_pubkey": pubkey,
                "gpu_model": spec.gpu_model,
                "vram_bytes": spec.vram_bytes,
                "count": spec.count,
                "gpu_indices": list(indices),
                "price_lamports_per_hour": spec.price_lamports_per_hour,
                "simulated": spec.simulated,
                "benchmark_tflops": spec.benchmark_tflops,
                "driver_version": spec.driver_version,
                "cuda_version": spec.cuda_version,
                "max_kernels": spec.max_kernels if spec.max_kernels is not None else spec.count,
                "published_at": at,
            }
            for spec, indices in zip(offers, _assign_indices(offers), strict=True)
        ]
        async with self._write() as conn:
            # Locked like create_lease, so a lease never sees half of the new inventory.
            if await self._lock_provider(conn, pubkey) is None:
                raise LookupError(
                    f"provider {pubkey} is not registered; call upsert_provider() first"
                )
            await conn.execute(sa.delete(_offers).where(_offers.c.provider_pubkey == pubkey))
            records: list[OfferRecord] = []
            for row in rows:  # one by one: RETURNING keeps the order on every backend
                inserted = (
                    await conn.execute(sa.insert(_offers).values(row).returning(*_offers.c))
                ).one()
                records.append(_offer_record(inserted))
        return records

    async def record_heartbeats(self, batch: Mapping[str, datetime]) -> int:
        """Store the latest heartbeat time of many providers in one SQL statement.

        The coordinator collects heartbeats in memory and calls this about once a second with
        ``{pubkey: time of its latest heartbeat}``. A time older than the stored one is
        ignored (a late flush never rewinds), and so are unknown providers. The provider's
        status is not touched: bringing a lost provider back is :meth:`upsert_provider`'s
        job. Returns how many providers were updated.
        """
        if not batch:
            return 0
        # Sorted, so two coordinators flushing overlapping batches lock rows in one order.
        items = sorted(batch.items())
        statement: sa.TextClause
        params: dict[str, Any]
        if self._postgres:
            statement = _PG_HEARTBEATS
            params = {
                "pubkeys": [pubkey for pubkey, _ in items],
                "beats": [_aware(beat) for _, beat in items],
            }
        else:
            statement = _SQLITE_HEARTBEATS
            params = {"batch": json.dumps([[pubkey, _sqlite_time(beat)] for pubkey, beat in items])}

        async def flush() -> int:
            async with self._write() as conn:
                return int((await conn.execute(statement, params)).rowcount)

        return await self._retrying(flush)

    async def stale_providers(self, before: datetime) -> list[str]:
        """Public keys of providers still marked online whose last heartbeat is older than
        ``before``: after a coordinator restart, the ones to watch (or mark lost)."""
        query = sa.select(_providers.c.pubkey).where(
            _providers.c.status == ProviderStatus.ONLINE.value,
            _providers.c.last_heartbeat < _aware(before),
        )
        async with self._read() as conn:
            return list((await conn.scalars(query)).all())

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
                    heartbeats_missed=_providers.c.heartbeats_missed + heartbeats_missed,
                    times_lost=_providers.c.times_lost + 1,
                    **_close_online_stretch(provider, last_heartbeat),
                )
            if changes:
                await conn.execute(
                    sa.update(_providers).where(_providers.c.pubkey == pubkey).values(changes)
                )
        return sorted((_lease_record(row) for row in failed), key=lambda lease: lease.id)

    async def get_provider(self, pubkey: str) -> ProviderRecord | None:
        """The provider ``pubkey``, or ``None``."""
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(_providers).where(_providers.c.pubkey == pubkey))
            ).first()
        return None if row is None else _provider_record(row)

    async def provider_offers(self, pubkey: str) -> list[OfferRecord]:
        """What provider ``pubkey`` offers now, in the order it published."""
        query = sa.select(_offers).where(_offers.c.provider_pubkey == pubkey).order_by(_offers.c.id)
        async with self._read() as conn:
            return [_offer_record(row) for row in await conn.execute(query)]

    async def load_live_offers(self) -> list[LiveOffer]:
        """Every offer of every online provider, with its current load: the scheduler's index
        after a coordinator restart (or on a replica that just started)."""
        offers_query = (
            sa.select(_offers, _providers)
            .join(_providers, _providers.c.pubkey == _offers.c.provider_pubkey)
            .where(_providers.c.status == ProviderStatus.ONLINE.value)
            .order_by(_offers.c.provider_pubkey, _offers.c.id)
        )
        leases_query = (
            sa.select(_leases.c.provider_pubkey, _leases.c.gpu_indices)
            .join(_providers, _providers.c.pubkey == _leases.c.provider_pubkey)
            .where(
                _leases.c.state.in_(_LIVE),
                _providers.c.status == ProviderStatus.ONLINE.value,
            )
        )
        # One read transaction, so offers and leases are one consistent snapshot.
        async with self._read() as conn, conn.begin():
            offer_rows = (await conn.execute(offers_query)).all()
            lease_rows = (await conn.execute(leases_query)).all()

        leased: dict[str, list[frozenset[int]]] = {}
        for provider_pubkey, indices in lease_rows:
            leased.setdefault(provider_pubkey, []).append(frozenset(indices))
        providers: dict[str, ProviderRecord] = {}
        live: list[LiveOffer] = []
        provider_columns = [column.name for column in _providers.c]
        for row in offer_rows:
            mapping = row._mapping
            offer = _offer_record(row)
            provider = providers.get(offer.provider_pubkey)
            if provider is None:
                provider = _provider_from_mapping(
                    {name: mapping[_providers.c[name]] for name in provider_columns}
                )
                providers[offer.provider_pubkey] = provider
            group = frozenset(offer.gpu_indices)
            holding = [held & group for held in leased.get(offer.provider_pubkey, ())]
            holding = [held for held in holding if held]
            in_use = frozenset().union(*holding) if holding else frozenset[int]()
            live.append(LiveOffer(offer, provider, in_use, len(holding)))
        return live

    # ---- leases ------------------------------------------------------------------------

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
        at: datetime | None = None,
    ) -> LeaseRecord:
        """Claim ``gpu_count`` free ``gpu_model`` GPUs of a provider for a user, atomically.

        The provider's row is locked while its free GPUs are counted and the lease is
        written, so two coordinators racing for the last GPU cannot both get it. Picks the
        cheapest group of that model with enough free GPUs (under ``max_price...`` if given)
        and the lowest free indices; copies the group's price into the lease. The lease
        starts ``requested``: sign its token, then :meth:`activate_lease` once the kernel
        runs.

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
                            price_lamports_per_hour=offer.price_lamports_per_hour,
                            state=LeaseState.REQUESTED.value,
                            requested_at=at,
                            token_expires_at=token_expires_at,
                            relay=relay,
                            acked_seconds=0,
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

    # ---- escrows and settlements --------------------------------------------------------

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
        at = _when(at)
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(
                    _settlements.c.lease_id == lease_id,
                    _settlements.c.state.in_(
                        [SettlementState.PENDING.value, SettlementState.FAILED.value]
                    ),
                )
                .values(
                    state=SettlementState.DONE.value,
                    signature=signature,
                    amount_lamports=amount_lamports,
                    fee_lamports=fee_lamports,
                    error=None,
                    claimed_by=None,
                    claimed_until=None,
                    updated_at=at,
                )
            )
            return bool(result.rowcount)

    async def fail_settlement(
        self, lease_id: str, *, error: str, at: datetime | None = None
    ) -> bool:
        """Mark a pending settlement ``failed``: its escrow can no longer be settled (closed
        by a transaction this coordinator did not submit, or no longer movable by arbiter +
        provider). Nothing is recorded as paid (amount and fee 0, no signature); ``error``
        says why. Returns whether it changed."""
        at = _when(at)
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_settlements)
                .where(
                    _settlements.c.lease_id == lease_id,
                    _settlements.c.state == SettlementState.PENDING.value,
                )
                .values(
                    state=SettlementState.FAILED.value,
                    signature=None,
                    amount_lamports=0,
                    fee_lamports=0,
                    error=error,
                    claimed_by=None,
                    claimed_until=None,
                    updated_at=at,
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

    async def funded_active_leases(self) -> list[LeaseRecord]:
        """Active leases with a verified escrow (the budget watch's list at start-up)."""
        query = sa.select(_leases).where(
            _leases.c.state == LeaseState.ACTIVE.value, _leases.c.escrow_address.is_not(None)
        )
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

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

    # ---- helpers -----------------------------------------------------------------------

    @staticmethod
    async def _retrying(transaction: Callable[[], Awaitable[_T]], attempts: int = 3) -> _T:
        """Run ``transaction`` again when PostgreSQL aborted it to break a deadlock."""
        for attempt in range(attempts):
            try:
                return await transaction()
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate not in _RETRYABLE_SQLSTATES or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")


# One statement however large the batch: the batch travels as one parameter (two arrays on
# PostgreSQL, one JSON array on SQLite), so there is no per-row round trip and no limit on
# the number of bound parameters.
_PG_HEARTBEATS = sa.text(
    """
    UPDATE providers AS p SET last_heartbeat = hb.beat
    FROM unnest(CAST(:pubkeys AS text[]), CAST(:beats AS timestamptz[])) AS hb(pubkey, beat)
    WHERE p.pubkey = hb.pubkey AND p.last_heartbeat < hb.beat
    """
)
_SQLITE_HEARTBEATS = sa.text(
    """
    UPDATE providers SET last_heartbeat = hb.beat
    FROM (
        SELECT json_extract(value, '$[0]') AS pubkey, json_extract(value, '$[1]') AS beat
        FROM json_each(:batch)
    ) AS hb
    WHERE providers.pubkey = hb.pubkey AND providers.last_heartbeat < hb.beat
    """
)


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


def _assign_indices(offers: Sequence[OfferSpec]) -> list[tuple[int, ...]]:
    """Device indices for each offer group: the given ones, else the next unclaimed."""
    claimed: set[int] = set()
    for spec in offers:
        if spec.gpu_indices is not None:
            overlap = claimed & set(spec.gpu_indices)
            if overlap:
                raise ValueError(f"GPU indices {sorted(overlap)} appear in two offers")
            claimed.update(spec.gpu_indices)
    assigned: list[tuple[int, ...]] = []
    next_index = 0
    for spec in offers:
        if spec.gpu_indices is not None:
            assigned.append(tuple(spec.gpu_indices))
            continue
        indices: list[int] = []
        while len(indices) < spec.count:
            if next_index not in claimed:
                indices.append(next_index)
                claimed.add(next_index)
            next_index += 1
        assigned.append(tuple(indices))
    return assigned


def _close_online_stretch(provider: sa.Row[Any], until: datetime) -> dict[str, Any]:
    """Column updates that move the open online stretch (up to ``until``) into
    ``online_seconds``."""
    if provider.online_since is None:
        return {}
    seconds = max(0, int((until - provider.online_since).total_seconds()))
    return {"online_seconds": _providers.c.online_seconds + seconds, "online_since": None}


def _provider_record(row: sa.Row[Any]) -> ProviderRecord:
    return _provider_from_mapping(row._mapping)


def _provider_from_mapping(mapping: Mapping[Any, Any]) -> ProviderRecord:
    return ProviderRecord(
        pubkey=mapping["pubkey"],
        display_name=mapping["display_name"],
        region=mapping["region"],
        reachable_url=mapping["reachable_url"],
        status=ProviderStatus(mapping["status"]),
        first_seen=mapping["first_seen"],
        last_heartbeat=mapping["last_heartbeat"],
        online_since=mapping["online_since"],
        sessions_ok=mapping["sessions_ok"],
        sessions_failed=mapping["sessions_failed"],
        heartbeats_missed=mapping["heartbeats_missed"],
        times_lost=mapping["times_lost"],
        online_seconds=mapping["online_seconds"],
        link_generation=mapping["link_generation"],
    )


def _offer_record(row: sa.Row[Any]) -> OfferRecord:
    m = row._mapping
    return OfferRecord(
        id=m[_offers.c.id],
        provider_pubkey=m[_offers.c.provider_pubkey],
        gpu_model=m[_offers.c.gpu_model],
        vram_bytes=m[_offers.c.vram_bytes],
        count=m[_offers.c.count],
        gpu_indices=tuple(m[_offers.c.gpu_indices]),
        price_lamports_per_hour=m[_offers.c.price_lamports_per_hour],
        simulated=bool(m[_offers.c.simulated]),
        benchmark_tflops=m[_offers.c.benchmark_tflops],
        driver_version=m[_offers.c.driver_version],
        cuda_version=m[_offers.c.cuda_version],
        max_kernels=m[_offers.c.max_kernels],
        published_at=m[_offers.c.published_at],
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
    )


def _claimable(owner: str, at: datetime) -> sa.ColumnElement[bool]:
    """A pending settlement nobody else holds a live claim on."""
    return sa.and_(
        _settlements.c.state == SettlementState.PENDING.value,
        sa.or_(
            _settlements.c.claimed_until.is_(None),
            _settlements.c.claimed_until < at,
            _settlements.c.claimed_by == owner,
        ),
    )


def _settlement_record(row: sa.Row[Any]) -> SettlementRecord:
    m = row._mapping
    values = {name: m[name] for name in SettlementRecord.__dataclass_fields__}
    values["kind"] = SettlementKind(values["kind"])
    values["state"] = SettlementState(values["state"])
    return SettlementRecord(**values)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
    return value.astimezone(timezone.utc)


def _when(at: datetime | None) -> datetime:
    return datetime.now(timezone.utc) if at is None else _aware(at)


def _sqlite_time(value: datetime) -> str:
    # The text form SQLAlchemy's SQLite DateTime stores (UTCDateTime strips the zone), so raw
    # SQL comparisons and ORM reads agree.
    return _aware(value).strftime("%Y-%m-%d %H:%M:%S.%f")


def _check_pubkey(pubkey: str, who: str) -> None:
    if not isinstance(pubkey, str) or not _BASE58.fullmatch(pubkey):
        raise ValueError(f"{pubkey!r} is not a base58 public key of a {who}")
