"""Alembic environment for the coordinator's database.

Two ways in, one migration path:

* **Programmatically** (what the coordinator does): :func:`jupyter_io.coordinator.store.
  upgrade_database` and :meth:`~jupyter_io.coordinator.store.Store.open` open a transaction on
  their async engine and, inside ``AsyncConnection.run_sync``, run ``alembic upgrade`` with the
  sync-facing connection in ``config.attributes["connection"]``; the migration joins that
  transaction.
* **From the ``alembic`` CLI** (``-c jupyter_io/coordinator/migrations/alembic.ini -x url=...``):
  an async engine is built from the URL exactly as the store builds its own, and the same
  code runs in ``run_sync``. ``--sql`` renders the SQL instead (offline mode).

``target_metadata`` is a list so that other parts of jupyter-io (payments) can bring tables
of their own: add their ``MetaData`` to :data:`TARGET_METADATA`, or pass a list in
``config.attributes["target_metadata"]``.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from jupyter_io.coordinator import models
from jupyter_io.coordinator.store import make_engine, migration_transaction, normalise_url

#: Every ``MetaData`` these migrations manage (what autogenerate compares against).
TARGET_METADATA: list[sa.MetaData] = [models.metadata]

config = context.config


def _target_metadata() -> list[sa.MetaData]:
    given = config.attributes.get("target_metadata")
    return list(given) if given is not None else TARGET_METADATA


def _configure(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=_target_metadata(),
        # SQLite can only alter a table by copying it; batch mode does that for us.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        user_module_prefix="models.",
        include_name=_ours,
    )


def _ours(name: str | None, type_: str, _parents: object) -> bool:
    # The embedded ledger keeps its own tables (ledger_*) in this database, created by
    # jupyter_io.coordinator.store.SqlLedgerStore: not this schema's to drop or alter.
    return not (type_ == "table" and name is not None and name.startswith("ledger_"))


def _run(connection: sa.Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def _cli_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=sqlite:///path/to/coordinator.db "
            "(or postgresql://user@host/db), or set sqlalchemy.url in alembic.ini"
        )
    return url


async def _run_cli_online(url: str) -> None:
    # The CLI takes the same lock the store takes, so it cannot interleave with a coordinator
    # upgrading the same database.
    engine = make_engine(url)
    try:
        async with migration_transaction(engine) as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """Render the migrations as SQL for the URL's dialect (``alembic ... --sql``)."""
    context.configure(
        url=normalise_url(_cli_url()),
        target_metadata=_target_metadata(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the connection the store handed over, or one of our own from the CLI."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(_run_cli_online(_cli_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
