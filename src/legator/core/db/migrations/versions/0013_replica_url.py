"""gateway: a managed backend's row says where its replica takes forwarded /v1 requests

Revision ID: 0013_replica_url
Revises: 0012_token_probe
Create Date: 2026-12-07 02:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_replica_url"
down_revision: str | Sequence[str] | None = "0012_token_probe"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replica_url", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gateway_runtimes", schema=None) as batch_op:
        batch_op.drop_column("replica_url")
