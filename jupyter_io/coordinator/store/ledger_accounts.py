"""The embedded ledger's accounts in the coordinator's database.

:class:`SqlLedgerStore` is the :class:`~jupyter_io.coordinator.embedded_ledger.LedgerStore`
the coordinator gives its :class:`~jupyter_io.coordinator.embedded_ledger.EmbeddedLedger`: one
row per account (``ledger_accounts``) and the ledger's metadata (``ledger_meta``), written
through the store's own engine (:attr:`Store.write_engine <jupyter_io.coordinator.store.Store.
write_engine>`) so a coordinator keeps users' balances beside its leases. Its tables are not
part of the coordinator's Alembic history (``env.py`` leaves ``ledger_*`` alone): it creates
them if missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from solders.account import Account
from solders.pubkey import Pubkey
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from ..embedded_ledger import LedgerSnapshot

__all__ = ["SqlLedgerStore"]

_T = TypeVar("_T")
_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def _to_i64(value: int) -> int:
    # u64 fields (lamports, rent_epoch = u64::MAX for rent-exempt accounts) in a signed BIGINT.
    return value - _U64 if value > _I64_MAX else value


def _from_i64(value: int) -> int:
    return value + _U64 if value < 0 else value


class SqlLedgerStore:
    """Accounts in two SQL tables (``<prefix>accounts``, ``<prefix>meta``) through SQLAlchemy.

    Takes either engine flavour. Hand it the coordinator's ``AsyncEngine`` (aiosqlite or
    asyncpg) so the ledger lives in the coordinator's database, or use :meth:`sqlite` for a
    file of its own: that one uses a plain (synchronous) SQLite engine on purpose — a WAL commit
    of a few rows takes ~0.05 ms inline, against ~1 ms through aiosqlite's thread hops, and it
    happens on every transaction. Tables are created if missing.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        *,
        table_prefix: str = "ledger_",
        dispose_engine: bool = False,
    ) -> None:
        self.engine = engine
        self._dispose = dispose_engine
        self._metadata = MetaData()
        self.accounts_table = Table(
            f"{table_prefix}accounts",
            self._metadata,
            Column("pubkey", String(44), primary_key=True),
            Column("lamports", BigInteger, nullable=False),
            Column("owner", String(44), nullable=False),
            Column("executable", Boolean, nullable=False),
            Column("rent_epoch", BigInteger, nullable=False),
            Column("data", LargeBinary, nullable=False),
        )
        self.meta_table = Table(
            f"{table_prefix}meta",
            self._metadata,
            Column("key", String(64), primary_key=True),
            Column("value", String(256), nullable=False),
        )

    @classmethod
    def sqlite(cls, path: str | os.PathLike[str]) -> SqlLedgerStore:
        """A store in its own SQLite file (WAL; each commit survives a process crash)."""
        file = Path(path).expanduser()
        file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{file}")

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process dying; only a power cut can
            # lose the last transactions (and then the ledger restarts consistently earlier).
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return cls(engine, dispose_engine=True)

    async def _run(self, work: Callable[[Connection], _T]) -> _T:
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.begin() as conn:
                return await conn.run_sync(work)
        with self.engine.begin() as sync_conn:
            return work(sync_conn)

    async def load(self) -> LedgerSnapshot:
        return await self._run(self._load)

    def _load(self, conn: Connection) -> LedgerSnapshot:
        self._metadata.create_all(conn)
        rows = conn.execute(select(self.accounts_table)).all()
        meta_rows = conn.execute(select(self.meta_table)).all()
        accounts = [
            (
                Pubkey.from_string(row.pubkey),
                Account(
                    lamports=_from_i64(row.lamports),
                    data=bytes(row.data),
                    owner=Pubkey.from_string(row.owner),
                    executable=bool(row.executable),
                    rent_epoch=_from_i64(row.rent_epoch),
                ),
            )
            for row in rows
        ]
        return LedgerSnapshot(accounts, {row.key: row.value for row in meta_rows})

    async def commit(
        self, accounts: Sequence[tuple[Pubkey, Account | None]], meta: Mapping[str, str]
    ) -> None:
        upserts = [
            {
                "pubkey": str(pubkey),
                "lamports": _to_i64(acc.lamports),
                "owner": str(acc.owner),
                "executable": acc.executable,
                "rent_epoch": _to_i64(acc.rent_epoch),
                "data": bytes(acc.data),
            }
            for pubkey, acc in accounts
            if acc is not None
        ]
        deletes = [str(pubkey) for pubkey, acc in accounts if acc is None]
        metas = [{"key": k, "value": v} for k, v in meta.items()]

        def work(conn: Connection) -> None:
            if deletes:
                table = self.accounts_table
                conn.execute(delete(table).where(table.c.pubkey.in_(deletes)))
            self._upsert(conn, self.accounts_table, "pubkey", upserts)
            self._upsert(conn, self.meta_table, "key", metas)

        await self._run(work)

    @staticmethod
    def _upsert(conn: Connection, table: Table, key: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        dialect = conn.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table)
            columns = {c.name: stmt.excluded[c.name] for c in table.columns if c.name != key}
            conn.execute(stmt.on_conflict_do_update(index_elements=[key], set_=columns), rows)
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            pg_stmt = pg_insert(table)
            columns = {c.name: pg_stmt.excluded[c.name] for c in table.columns if c.name != key}
            conn.execute(pg_stmt.on_conflict_do_update(index_elements=[key], set_=columns), rows)
        else:  # portable fallback: replace the rows
            conn.execute(delete(table).where(table.c[key].in_([r[key] for r in rows])))
            conn.execute(insert(table), rows)

    async def count_accounts(self) -> int:
        """How many accounts are stored (what start-up has to load)."""

        def work(conn: Connection) -> int:
            return int(conn.scalar(select(func.count()).select_from(self.accounts_table)) or 0)

        return await self._run(work)

    async def close(self) -> None:
        if not self._dispose:
            return
        if isinstance(self.engine, AsyncEngine):
            await self.engine.dispose()
        else:
            self.engine.dispose()
