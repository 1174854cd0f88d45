"""Providers count their links: ``link_generation``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Written out by hand (see 0001). Each link of a provider (to any coordinator sharing the
database) raises it by one; a coordinator marks a provider offline only if the link that said
goodbye is still the latest, so a provider that moved to another coordinator stays online
there. Rows recorded before this revision start at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite has it): a batch copy of ``providers`` would trip the
    # foreign keys of the leases that point at it.
    op.add_column(
        "providers",
        sa.Column("link_generation", sa.BigInteger, server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("providers") as batch:
        batch.drop_column("link_generation")
