"""gateway: a managed backend's row names the control plane (and replica) that runs it

Revision ID: 0011_backend_owner
Revises: 0010_oidc_link
Create Date: 2026-12-06 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_backend_owner"
down_revision: str | Sequence[str] | None = "0010_oidc_link"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("replica", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gateway_runtimes", schema=None) as batch_op:
        batch_op.drop_column("replica")
        batch_op.drop_column("owner")
