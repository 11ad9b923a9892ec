"""Rollouts (one JSON document each, at most one active per route), route mirrors, deployment metrics URLs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
#: an active rollout: pending, progressing or paused (services.registry.store.ACTIVE_ROLLOUT_SQL)
ACTIVE = "state IN ('PENDING', 'PROGRESSING', 'PAUSED')"


def upgrade() -> None:
    # existing deployments get "" (no metrics URL)
    op.add_column("deployments", sa.Column("metrics_url", sa.String(512), nullable=False, server_default=""))

    op.create_table(
        "route_mirrors",
        sa.Column("route_id", sa.String(63), sa.ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("deployment_id", sa.String(63), sa.ForeignKey("deployments.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("percent", sa.Double(), nullable=False),
        sa.UniqueConstraint("route_id", "deployment_id", name="uq_route_mirrors_route_id_deployment_id"),
    )
    op.create_index("ix_route_mirrors_deployment_id", "route_mirrors", ["deployment_id"])

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("route_id", sa.String(63), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("document", Json, nullable=False),
    )
    op.create_index("ix_rollouts_route_id", "rollouts", ["route_id"])
    op.create_index("ix_rollouts_create_time_id", "rollouts", ["create_time", "id"])
    op.create_index(
        "uq_rollouts_route_id_active",
        "rollouts",
        ["route_id"],
        unique=True,
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_table("rollouts")
    op.drop_table("route_mirrors")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("metrics_url")
