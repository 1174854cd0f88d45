"""Leases say why they ended: ``end_reason`` beside ``failure_reason``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

Written out by hand (see 0001). Ended leases recorded before this revision keep a null
reason; clients then infer a spent budget from the billing, as they did.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("end_reason", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("end_reason")
