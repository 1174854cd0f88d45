"""One engine for the coordinator's database, its migrations, and what every aggregate's
queries build on.

:func:`make_engine` sets an engine up the way the store needs it (SQLite: WAL, foreign keys,
``BEGIN IMMEDIATE`` for writers); :func:`upgrade_database` and :meth:`Store.open
<jupyter_io.coordinator.store.Store.open>` run the one Alembic history in ``../migrations``
(:data:`MIGRATIONS_DIR`). :class:`Aggregate` is the base of each aggregate's queries
(:mod:`.providers`, :mod:`.leases`, :mod:`.settlements`): one write or read transaction per
method on the shared engine, the dialect's ``INSERT``, the provider-row lock every capacity
write takes first, and the retry of a transaction PostgreSQL aborted to break a deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ...errors import ConfigError
from ..models import Provider

__all__ = [
    "MIGRATIONS_DIR",
    "SQLITE_BUSY_TIMEOUT_S",
    "Aggregate",
    "alembic_config",
    "make_engine",
    "migration_transaction",
    "normalise_url",
    "upgrade_database",
    "upgrade_engine",
]

#: The Alembic script directory (``env.py``, ``versions/``): ``jupyter_io/coordinator/
#: migrations``, beside this package, where ``alembic.ini`` says it is.
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

_T = TypeVar("_T")

_providers = cast(sa.Table, Provider.__table__)


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


async def upgrade_engine(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema behind ``engine`` to ``revision`` in one transaction that only one
    process at a time can hold (:func:`migration_transaction`)."""
    async with migration_transaction(engine) as conn:
        await conn.run_sync(_alembic_upgrade, revision)


async def upgrade_database(url: str | os.PathLike[str] | URL, revision: str = "head") -> None:
    """Upgrade the schema at ``url`` to ``revision`` (Alembic ``upgrade``) in one
    transaction. :meth:`Store.open` does this for ``head``; call it yourself to stop at an
    older revision."""
    engine = make_engine(url)
    try:
        await upgrade_engine(engine, revision)
    finally:
        await engine.dispose()


class Aggregate:
    """The shared base of the store's aggregates: each method of a subclass is one
    transaction on the engine given here (see :class:`~jupyter_io.coordinator.store.Store`,
    which is all of them on one engine)."""

    def __init__(self, engine: AsyncEngine) -> None:
        """Wrap an engine from :func:`make_engine` whose schema is already up to date; most
        callers want :meth:`Store.open`."""
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._postgres = engine.dialect.name == "postgresql"

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


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
    return value.astimezone(timezone.utc)


def _when(at: datetime | None) -> datetime:
    return datetime.now(timezone.utc) if at is None else _aware(at)
