"""GPU challenges (issue 16 part 5): each challenge of a provider's GPU and its verdict.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

Written out by hand (see 0001). ``gpu_checks`` holds one row per judged challenge
(:mod:`jupyter_io.coordinator.challenges`): the provider, the GPU model and device index, when,
whether it passed, why not, the seconds the commitment took and the matrix size. A failed row
is why an offer left the listing; the newest rows are the provider's GPU record.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PUBKEY = 44


def upgrade() -> None:
    op.create_table(
        "gpu_checks",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("provider_pubkey", sa.String(_PUBKEY), nullable=False),
        sa.Column("gpu_model", sa.String(128), nullable=False),
        sa.Column("gpu_index", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("seconds", sa.Float, nullable=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gpu_checks")),
        sa.ForeignKeyConstraint(
            ["provider_pubkey"],
            ["providers.pubkey"],
            name=op.f("fk_gpu_checks_provider_pubkey_providers"),
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        op.f("ix_gpu_checks_provider_pubkey_at"), "gpu_checks", ["provider_pubkey", "at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_gpu_checks_provider_pubkey_at"), table_name="gpu_checks")
    op.drop_table("gpu_checks")
