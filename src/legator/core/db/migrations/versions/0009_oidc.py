"""core: OIDC single sign-on (provider identities, sign-ins in flight)

Revision ID: 0009_oidc
Revises: 0008_backends
Create Date: 2026-11-25 10:12:40.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import legator.core.db.base

revision: str = "0009_oidc"
down_revision: str | Sequence[str] | None = "0008_backends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_identities",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("issuer", sa.String(length=500), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("created_at", legator.core.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", legator.core.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_identities_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_identities")),
        sa.UniqueConstraint("issuer", "subject", name="uq_user_identities_issuer"),
    )
    with op.batch_alter_table("user_identities", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_user_identities_user_id"), ["user_id"], unique=False)

    op.create_table(
        "oidc_pending",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("next_path", sa.String(length=2048), nullable=False),
        sa.Column("created_at", legator.core.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", legator.core.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name=op.f("pk_oidc_pending")),
    )
    with op.batch_alter_table("oidc_pending", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_oidc_pending_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("oidc_pending", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oidc_pending_expires_at"))
    op.drop_table("oidc_pending")
    with op.batch_alter_table("user_identities", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_user_identities_user_id"))
    op.drop_table("user_identities")
