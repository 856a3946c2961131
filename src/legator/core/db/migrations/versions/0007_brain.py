"""brain chat sessions

Revision ID: 0007_brain
Revises: 0004_gateway
Create Date: 2026-11-24 13:43:39.896278
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import legator.core.db.base

revision: str = "0007_brain"
down_revision: str | Sequence[str] | None = "0004_gateway"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "brain_chat_sessions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("created_at", legator.core.db.base.UTCDateTime(), nullable=False),
        sa.Column("updated_at", legator.core.db.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_brain_chat_sessions")),
    )
    op.create_index(op.f("ix_brain_chat_sessions_target"), "brain_chat_sessions", ["target"])
    op.create_index(op.f("ix_brain_chat_sessions_owner"), "brain_chat_sessions", ["owner"])


def downgrade() -> None:
    op.drop_index(op.f("ix_brain_chat_sessions_owner"), table_name="brain_chat_sessions")
    op.drop_index(op.f("ix_brain_chat_sessions_target"), table_name="brain_chat_sessions")
    op.drop_table("brain_chat_sessions")
