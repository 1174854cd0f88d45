"""Replicas (issue 17): several coordinators on one database, one marketplace.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Written out by hand (see 0001).

* ``replicas``: one row per coordinator process sharing the database (its id, the URL
  providers reach it at, and a heartbeat every second).
* ``providers.replica_id``: the replica holding the provider's latest link, set with
  ``link_generation`` and cleared when the provider goes offline or is lost.
* ``provider_changes``: the change feed every replica polls to keep its scheduler's index
  current. Database TRIGGERS write it, so every writer feeds it (any replica, any code
  path): providers INSERT and UPDATE of any column but ``last_heartbeat`` (heartbeat
  flushes never feed it), offers INSERT / UPDATE / DELETE, leases INSERT and UPDATE OF
  ``state`` / ``gpu_indices``. A row names the provider whose view changed; readers re-read
  that provider.
* ``link_messages``: the outbox of provider-link messages (``dial``, ``end``) for a provider
  linked at another replica; the replica holding the link takes each row with
  ``DELETE ... RETURNING``, so exactly one sends it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PUBKEY = 44
# BIGSERIAL on PostgreSQL; SQLite's autoincrement needs INTEGER PRIMARY KEY.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Every provider column but last_heartbeat: an UPDATE that changes one of these feeds the
# change feed. (A new providers column that the scheduler reads belongs here too.)
_PROVIDER_COLUMNS = (
    "display_name",
    "region",
    "reachable_url",
    "status",
    "first_seen",
    "online_since",
    "sessions_ok",
    "sessions_failed",
    "heartbeats_missed",
    "times_lost",
    "online_seconds",
    "link_generation",
    "replica_id",
)
# UPDATE OF these columns: a heartbeat flush (which sets last_heartbeat only) does not even
# consider the trigger, on either database (a WHEN alone costs every flushed row measurably).
_COLUMN_LIST = ", ".join(_PROVIDER_COLUMNS)

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION jupyter_io_provider_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'providers' THEN
        INSERT INTO provider_changes (pubkey) VALUES (NEW.pubkey);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO provider_changes (pubkey) VALUES (OLD.provider_pubkey);
    ELSE
        INSERT INTO provider_changes (pubkey) VALUES (NEW.provider_pubkey);
    END IF;
    RETURN NULL;
END
$$
"""


def _pg_triggers() -> list[str]:
    old = ", ".join(f"OLD.{c}" for c in _PROVIDER_COLUMNS)
    new = ", ".join(f"NEW.{c}" for c in _PROVIDER_COLUMNS)
    run = "FOR EACH ROW EXECUTE PROCEDURE jupyter_io_provider_changed()"
    return [
        f"CREATE TRIGGER providers_feed_insert AFTER INSERT ON providers {run}",
        f"CREATE TRIGGER providers_feed_update AFTER UPDATE OF {_COLUMN_LIST} ON providers "
        f"FOR EACH ROW "
        f"WHEN (({old}) IS DISTINCT FROM ({new})) "
        f"EXECUTE PROCEDURE jupyter_io_provider_changed()",
        f"CREATE TRIGGER offers_feed AFTER INSERT OR UPDATE OR DELETE ON offers {run}",
        f"CREATE TRIGGER leases_feed AFTER INSERT OR UPDATE OF state, gpu_indices ON leases {run}",
    ]


# SQLite stores UTCDateTime as naive text with microseconds; %f gives milliseconds.
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


def _sqlite_trigger(name: str, event: str, table: str, key: str, when: str = "") -> str:
    return (
        f"CREATE TRIGGER {name} AFTER {event} ON {table} {when} BEGIN "
        f"INSERT INTO provider_changes (pubkey, at) VALUES ({key}, {_SQLITE_NOW}); END"
    )


def _sqlite_triggers() -> list[str]:
    changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in _PROVIDER_COLUMNS)
    return [
        _sqlite_trigger("providers_feed_insert", "INSERT", "providers", "NEW.pubkey"),
        _sqlite_trigger(
            "providers_feed_update",
            f"UPDATE OF {_COLUMN_LIST}",
            "providers",
            "NEW.pubkey",
            f"WHEN {changed}",
        ),
        _sqlite_trigger("offers_feed_insert", "INSERT", "offers", "NEW.provider_pubkey"),
        _sqlite_trigger("offers_feed_update", "UPDATE", "offers", "NEW.provider_pubkey"),
        _sqlite_trigger("offers_feed_delete", "DELETE", "offers", "OLD.provider_pubkey"),
        _sqlite_trigger("leases_feed_insert", "INSERT", "leases", "NEW.provider_pubkey"),
        _sqlite_trigger(
            "leases_feed_update", "UPDATE OF state, gpu_indices", "leases", "NEW.provider_pubkey"
        ),
    ]


_SQLITE_TRIGGER_NAMES = (
    "providers_feed_insert",
    "providers_feed_update",
    "offers_feed_insert",
    "offers_feed_update",
    "offers_feed_delete",
    "leases_feed_insert",
    "leases_feed_update",
)


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        _timestamp("started_at", nullable=False),
        _timestamp("last_seen", nullable=False),
        _timestamp("stopped_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
    )
    # A plain ADD COLUMN (see 0005): a batch copy of providers would trip the leases' keys.
    op.add_column("providers", sa.Column("replica_id", sa.String(64), nullable=True))
    op.create_table(
        "provider_changes",
        sa.Column("seq", _SEQ, autoincrement=True, nullable=False),
        sa.Column("pubkey", sa.String(_PUBKEY), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_provider_changes")),
        # Never reuse a pruned seq (a reader past it would miss the change).
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_provider_changes_at"), "provider_changes", ["at"])
    op.create_table(
        "link_messages",
        sa.Column("id", _SEQ, autoincrement=True, nullable=False),
        sa.Column("pubkey", sa.String(_PUBKEY), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        _timestamp("expires_at", nullable=False),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_link_messages")),
    )
    op.create_index(op.f("ix_link_messages_pubkey"), "link_messages", ["pubkey"])
    op.create_index(op.f("ix_link_messages_expires_at"), "link_messages", ["expires_at"])
    if op.get_context().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        for statement in _pg_triggers():
            op.execute(statement)
    else:
        for statement in _sqlite_triggers():
            op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for name, table in (
            ("providers_feed_insert", "providers"),
            ("providers_feed_update", "providers"),
            ("offers_feed", "offers"),
            ("leases_feed", "leases"),
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS jupyter_io_provider_changed()")
    else:
        for name in _SQLITE_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index(op.f("ix_link_messages_expires_at"), table_name="link_messages")
    op.drop_index(op.f("ix_link_messages_pubkey"), table_name="link_messages")
    op.drop_table("link_messages")
    op.drop_index(op.f("ix_provider_changes_at"), table_name="provider_changes")
    op.drop_table("provider_changes")
    if op.get_context().dialect.name == "sqlite":
        # SQLite's own DROP COLUMN (3.35+): a batch copy of ``providers`` would trip the
        # foreign keys of the leases that point at it (as in 0005's upgrade).
        op.execute("ALTER TABLE providers DROP COLUMN replica_id")
    else:
        op.drop_column("providers", "replica_id")
    op.drop_table("replicas")
