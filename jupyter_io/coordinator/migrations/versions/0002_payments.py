"""Payments: each lease's verified escrow, and the durable settlements queue (issue 4).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Written out by hand (see 0001): lease columns ``escrow_address``, ``deposit_lamports``,
``escrow_signature``, ``funded_at`` (null while a lease is unfunded), and ``settlements``,
one row per funded lease that ended or failed, retried until its escrow is closed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("escrow_address", sa.String(44), nullable=True))
        batch.add_column(sa.Column("deposit_lamports", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("escrow_signature", sa.String(100), nullable=True))
        batch.add_column(_timestamp("funded_at", nullable=True))

    op.create_table(
        "settlements",
        sa.Column("lease_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("amount_lamports", sa.BigInteger, server_default=sa.text("0"), nullable=False),
        sa.Column("fee_lamports", sa.BigInteger, server_default=sa.text("0"), nullable=False),
        sa.Column("signature", sa.String(100), nullable=True),
        sa.Column("attempts", sa.Integer, server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        _timestamp("next_attempt_at", nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        _timestamp("claimed_until", nullable=True),
        sa.PrimaryKeyConstraint("lease_id", name=op.f("pk_settlements")),
        sa.ForeignKeyConstraint(
            ["lease_id"],
            ["leases.id"],
            name=op.f("fk_settlements_lease_id_leases"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("kind IN ('settle', 'refund')", name=op.f("ck_settlements_kind")),
        sa.CheckConstraint(
            "state IN ('pending', 'done', 'failed')", name=op.f("ck_settlements_state")
        ),
        sa.CheckConstraint("amount_lamports >= 0", name=op.f("ck_settlements_amount_not_negative")),
    )
    op.create_index(
        op.f("ix_settlements_state_next_attempt_at"), "settlements", ["state", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_settlements_state_next_attempt_at"), table_name="settlements")
    op.drop_table("settlements")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("funded_at")
        batch.drop_column("escrow_signature")
        batch.drop_column("deposit_lamports")
        batch.drop_column("escrow_address")
