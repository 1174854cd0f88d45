"""The coordinator's schema migrations, on a real SQLite file and a real PostgreSQL server:
the migrations build exactly the schema models.py describes, an upgrade keeps the data
already there, coordinators starting together do not trip over each other, and the
``alembic`` CLI works on the same scripts."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from jupyter_io.coordinator.models import LeaseState, ProviderStatus, metadata
from jupyter_io.coordinator.store import (
    MIGRATIONS_DIR,
    Store,
    alembic_config,
    make_engine,
    upgrade_database,
)

pytestmark = pytest.mark.timeout(120)

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()
ALEMBIC_INI = MIGRATIONS_DIR / "alembic.ini"
REPO = Path(__file__).resolve().parents[2]
PROVIDER = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
USER = "4Nd1mBQtrMJVYVfKf2PJy9NZUZdTAsp7D4xWLs4gDB4T"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


async def revision_of(url: str) -> str | None:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


async def alembic_cli(url: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "alembic",
        "-c",
        str(ALEMBIC_INI),
        "-x",
        f"url={url}",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = output.decode()
    assert process.returncode == 0, text
    return text


async def test_open_builds_the_schema_models_describe(store_url: str) -> None:
    store = await Store.open(store_url)
    try:
        async with store.engine.connect() as conn:

            def inspect(sync: sa.Connection) -> tuple[list[Any], dict[str, set[str | None]]]:
                context = MigrationContext.configure(
                    sync, opts={"target_metadata": metadata, "compare_type": True}
                )
                inspector = sa.inspect(sync)
                checks = {
                    table: {c["name"] for c in inspector.get_check_constraints(table)}
                    for table in metadata.tables
                }
                return compare_metadata(context, metadata), checks

            differences, checks = await conn.run_sync(inspect)
    finally:
        await store.close()
    assert differences == []  # models.py and the migrations agree
    assert checks == {
        name: {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}
        for name, table in metadata.tables.items()
    }
    assert await revision_of(store_url) == HEAD


async def test_upgrade_keeps_rows_written_under_an_older_revision(store_url: str) -> None:
    await upgrade_database(store_url, "0001")
    assert await revision_of(store_url) == "0001"
    # Rows as a coordinator running revision 0001 wrote them.
    engine = make_engine(store_url)
    try:
        async with engine.begin() as conn:
            providers, leases = metadata.tables["providers"], metadata.tables["leases"]
            await conn.execute(
                providers.insert().values(
                    pubkey=PROVIDER,
                    display_name="old rig",
                    status=ProviderStatus.ONLINE.value,
                    first_seen=T0,
                    last_heartbeat=T0,
                    online_since=T0,
                    sessions_ok=7,
                )
            )
            await conn.execute(
                leases.insert().values(
                    id="lease-from-0001",
                    user_pubkey=USER,
                    provider_pubkey=PROVIDER,
                    gpu_model="RTX 4090",
                    gpu_indices=[1],
                    price_lamports_per_hour=900_000,
                    state=LeaseState.ACTIVE.value,
                    requested_at=T0,
                    active_at=T0,
                )
            )
    finally:
        await engine.dispose()

    store = await Store.open(store_url)  # upgrades to head
    try:
        lease = await store.get_lease("lease-from-0001")
        provider = await store.get_provider(PROVIDER)
        live = await store.live_leases()
    finally:
        await store.close()
    assert await revision_of(store_url) == HEAD
    assert lease is not None and lease.state is LeaseState.ACTIVE
    assert (lease.gpu_indices, lease.active_at) == ((1,), T0)
    assert provider is not None and (provider.display_name, provider.sessions_ok) == ("old rig", 7)
    assert [lease.id for lease in live] == ["lease-from-0001"]


async def test_coordinators_starting_together_migrate_once(store_url: str) -> None:
    stores = await asyncio.wait_for(
        asyncio.gather(*(Store.open(store_url) for _ in range(6))), timeout=60
    )
    try:
        async with stores[0].engine.connect() as conn:
            versions = (
                await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
            ).all()
        assert [tuple(row) for row in versions] == [(HEAD,)]
    finally:
        for store in stores:
            await store.close()


async def test_alembic_cli_upgrades_downgrades_and_renders_sql(store_url: str) -> None:
    await alembic_cli(store_url, "upgrade", "head")
    assert HEAD is not None and HEAD in await alembic_cli(store_url, "current")
    store = await Store.open(store_url)  # already at head: nothing to do, still opens
    await store.close()

    await alembic_cli(store_url, "downgrade", "base")
    engine = make_engine(store_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    finally:
        await engine.dispose()
    assert tables & set(metadata.tables) == set()
    assert await revision_of(store_url) is None

    sql = await alembic_cli(store_url, "upgrade", "head", "--sql")
    assert "CREATE TABLE providers" in sql and "CREATE TABLE usage_reports" in sql
