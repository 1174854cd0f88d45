"""Measured reliability (issue 16): a provider's links, and leases found by when they ended.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Written out by hand (see 0001). ``provider_links`` holds one row per link of a provider
(opened when it links, closed when it says goodbye or is lost); a link after a
loss carries ``down_since``, the outage's start. With the leases that ended in the window
(the new index on ``leases.ended_at``) they are a provider's record over a rolling 30 days
(:mod:`jupyter_io.coordinator.reliability`). Links made before this revision have no row:
the record starts with the next link.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PUBKEY = 44


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "provider_links",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("provider_pubkey", sa.String(_PUBKEY), nullable=False),
        _timestamp("linked_at", nullable=False),
        _timestamp("closed_at", nullable=True),
        sa.Column("closed_how", sa.String(16), nullable=True),
        _timestamp("down_since", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_links")),
        sa.ForeignKeyConstraint(
            ["provider_pubkey"],
            ["providers.pubkey"],
            name=op.f("fk_provider_links_provider_pubkey_providers"),
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        op.f("ix_provider_links_provider_pubkey_linked_at"),
        "provider_links",
        ["provider_pubkey", "linked_at"],
    )
    op.create_index(op.f("ix_provider_links_closed_at"), "provider_links", ["closed_at"])
    op.create_index(op.f("ix_leases_ended_at"), "leases", ["ended_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_leases_ended_at"), table_name="leases")
    op.drop_index(op.f("ix_provider_links_closed_at"), table_name="provider_links")
    op.drop_index(op.f("ix_provider_links_provider_pubkey_linked_at"), table_name="provider_links")
    op.drop_table("provider_links")
