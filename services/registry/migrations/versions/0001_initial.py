"""Initial schema: revision counter, deployments, routes with backends and header overrides, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-05-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_registry_state_single_row"),
    )
    op.execute("INSERT INTO registry_state (id, revision) VALUES (1, 0)")

    op.create_table(
        "deployments",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("version", sa.String(63), nullable=False),
        sa.Column("endpoint", sa.String(300), nullable=False),
        sa.Column("engine", sa.String(63), nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deployments_service", "deployments", ["service"])

    op.create_table(
        "routes",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("route_class", sa.String(63), nullable=False),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("timeout_us", sa.BigInteger(), nullable=True),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("service", "route_class", name="uq_routes_service_route_class"),
    )

    op.create_table(
        "route_backends",
        sa.Column("route_id", sa.String(63), sa.ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("deployment_id", sa.String(63), sa.ForeignKey("deployments.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.UniqueConstraint("route_id", "deployment_id", name="uq_route_backends_route_id_deployment_id"),
    )
    op.create_index("ix_route_backends_deployment_id", "route_backends", ["deployment_id"])

    op.create_table(
        "route_header_overrides",
        sa.Column("route_id", sa.String(63), sa.ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("header", sa.String(64), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("deployment_id", sa.String(63), sa.ForeignKey("deployments.id", ondelete="RESTRICT"), nullable=False),
    )
    op.create_index("ix_route_header_overrides_deployment_id", "route_header_overrides", ["deployment_id"])

    op.create_table(
        "audit_entries",
        sa.Column("revision", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("resource", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("before", Json, nullable=True),
        sa.Column("after", Json, nullable=True),
    )
    op.create_index("ix_audit_entries_resource", "audit_entries", ["resource"])


def downgrade() -> None:
    for table in ("audit_entries", "route_header_overrides", "route_backends", "routes", "deployments"):
        op.drop_table(table)
    op.drop_table("registry_state")
