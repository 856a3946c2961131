"""core: password sign-in counts and known addresses in the database, not in memory

Revision ID: 0016_sign_in_counts
Revises: 0015_brain_usage_bigint
Create Date: 2026-12-08 00:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import legator.core.db.base

revision: str = "0016_sign_in_counts"
down_revision: str | Sequence[str] | None = "0015_brain_usage_bigint"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sign_in_counts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("expires_at", legator.core.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_counts")),
    )
    op.create_index(
        "ix_sign_in_counts_key_expires", "sign_in_counts", ["key", "expires_at"], unique=False
    )
    op.create_index(
        op.f("ix_sign_in_counts_expires_at"), "sign_in_counts", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_sign_in_counts_expires_at"), table_name="sign_in_counts")
    op.drop_index("ix_sign_in_counts_key_expires", table_name="sign_in_counts")
    op.drop_table("sign_in_counts")
