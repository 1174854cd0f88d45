"""The coordinator's first schema: providers, offers, leases, usage reports.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Written out by hand rather than importing models.py, so that this revision keeps creating
exactly this schema however the models change later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("pubkey", sa.String(44), nullable=False),
        sa.Column("display_name", sa.String(200), server_default="", nullable=False),
        sa.Column("region", sa.String(64), server_default="", nullable=False),
        sa.Column("reachable_url", sa.String(2048), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("first_seen", nullable=False),
        _timestamp("last_heartbeat", nullable=False),
        _timestamp("online_since", nullable=True),
        sa.Column("sessions_ok", sa.Integer, server_default=sa.text("0"), nullable=False),
        sa.Column("sessions_failed", sa.Integer, server_default=sa.text("0"), nullable=False),
        sa.Column("heartbeats_missed", sa.Integer, server_default=sa.text("0"), nullable=False),
        sa.Column("times_lost", sa.Integer, server_default=sa.text("0"), nullable=False),
        sa.Column("online_seconds", sa.BigInteger, server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("pubkey", name=op.f("pk_providers")),
        sa.CheckConstraint(
            "status IN ('online', 'lost', 'offline')", name=op.f("ck_providers_status")
        ),
    )
    op.create_index(op.f("ix_providers_status"), "providers", ["status"])

    op.create_table(
        "offers",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("provider_pubkey", sa.String(44), nullable=False),
        sa.Column("gpu_model", sa.String(128), nullable=False),
        sa.Column("vram_bytes", sa.BigInteger, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("gpu_indices", sa.JSON, nullable=False),
        sa.Column("price_lamports_per_hour", sa.BigInteger, nullable=False),
        sa.Column("simulated", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.Column("benchmark_tflops", sa.Float, nullable=True),
        sa.Column("driver_version", sa.String(64), nullable=True),
        sa.Column("cuda_version", sa.String(32), nullable=True),
        sa.Column("max_kernels", sa.Integer, nullable=False),
        _timestamp("published_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offers")),
        sa.ForeignKeyConstraint(
            ["provider_pubkey"],
            ["providers.pubkey"],
            name=op.f("fk_offers_provider_pubkey_providers"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("count >= 1", name=op.f("ck_offers_count_positive")),
        sa.CheckConstraint("vram_bytes >= 0", name=op.f("ck_offers_vram_not_negative")),
        sa.CheckConstraint(
            "price_lamports_per_hour >= 0", name=op.f("ck_offers_price_not_negative")
        ),
        sa.CheckConstraint("max_kernels >= 1", name=op.f("ck_offers_max_kernels_positive")),
    )
    op.create_index(op.f("ix_offers_provider_pubkey"), "offers", ["provider_pubkey"])
    op.create_index(op.f("ix_offers_gpu_model"), "offers", ["gpu_model"])

    op.create_table(
        "leases",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("user_pubkey", sa.String(44), nullable=False),
        sa.Column("provider_pubkey", sa.String(44), nullable=False),
        sa.Column("gpu_model", sa.String(128), nullable=False),
        sa.Column("gpu_indices", sa.JSON, nullable=False),
        sa.Column("price_lamports_per_hour", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _timestamp("requested_at", nullable=False),
        _timestamp("active_at", nullable=True),
        _timestamp("ended_at", nullable=True),
        _timestamp("end_of_service", nullable=True),
        sa.Column("failure_reason", sa.Text, nullable=True),
        _timestamp("token_expires_at", nullable=True),
        sa.Column("relay", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leases")),
        sa.ForeignKeyConstraint(
            ["provider_pubkey"],
            ["providers.pubkey"],
            name=op.f("fk_leases_provider_pubkey_providers"),
        ),
        sa.CheckConstraint(
            "state IN ('requested', 'active', 'ended', 'failed')", name=op.f("ck_leases_state")
        ),
        sa.CheckConstraint(
            "price_lamports_per_hour >= 0", name=op.f("ck_leases_price_not_negative")
        ),
    )
    op.create_index(op.f("ix_leases_provider_pubkey_state"), "leases", ["provider_pubkey", "state"])
    op.create_index(
        op.f("ix_leases_user_pubkey_requested_at"), "leases", ["user_pubkey", "requested_at"]
    )
    op.create_index(op.f("ix_leases_state"), "leases", ["state"])

    op.create_table(
        "usage_reports",
        sa.Column("lease_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("seconds_delivered", sa.Integer, nullable=False),
        sa.Column("gpu_utilisation", sa.Float, nullable=True),
        sa.Column("signature", sa.Text, nullable=False),
        _timestamp("reported_at", nullable=False),
        _timestamp("received_at", nullable=False),
        sa.PrimaryKeyConstraint("lease_id", "seq", name=op.f("pk_usage_reports")),
        sa.ForeignKeyConstraint(
            ["lease_id"],
            ["leases.id"],
            name=op.f("fk_usage_reports_lease_id_leases"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "seconds_delivered >= 0", name=op.f("ck_usage_reports_seconds_not_negative")
        ),
        sa.CheckConstraint("seq >= 0", name=op.f("ck_usage_reports_seq_not_negative")),
    )


def downgrade() -> None:
    op.drop_table("usage_reports")
    op.drop_index(op.f("ix_leases_state"), table_name=op.f("leases"))
    op.drop_index(op.f("ix_leases_user_pubkey_requested_at"), table_name=op.f("leases"))
    op.drop_index(op.f("ix_leases_provider_pubkey_state"), table_name=op.f("leases"))
    op.drop_table("leases")
    op.drop_index(op.f("ix_offers_gpu_model"), table_name=op.f("offers"))
    op.drop_index(op.f("ix_offers_provider_pubkey"), table_name=op.f("offers"))
    op.drop_table("offers")
    op.drop_index(op.f("ix_providers_status"), table_name=op.f("providers"))
    op.drop_table("providers")
