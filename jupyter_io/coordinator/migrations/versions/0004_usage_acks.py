"""Leases record the user's usage acknowledgements: ``acked_seconds`` and ``acked_at``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Written out by hand (see 0001). Leases recorded before this revision keep null columns and
are billed as they were (the lesser of reported and observed); new leases start at 0 and are
billed at most their acknowledged seconds plus the grace period (payments contract §7).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("acked_seconds", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("acked_at")
        batch.drop_column("acked_seconds")
