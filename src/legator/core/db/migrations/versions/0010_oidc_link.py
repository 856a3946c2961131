"""core: OIDC sign-ins in flight may link an identity to the signed-in user

Revision ID: 0010_oidc_link
Revises: 0009_oidc
Create Date: 2026-11-25 14:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_oidc_link"
down_revision: str | Sequence[str] | None = "0009_oidc"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("oidc_pending", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_id", sa.String(length=36), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_oidc_pending_user_id_users"),
            "users",
            ["user_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("oidc_pending", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_oidc_pending_user_id_users"), type_="foreignkey")
        batch_op.drop_column("user_id")
