"""fleet: a probe's signing key is salted per enrolment (and rotation)

Existing probes get the empty salt, which derives the key they already hold.

Revision ID: 0014_probe_key_salt
Revises: 0013_replica_url
Create Date: 2026-12-08 01:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_probe_key_salt"
down_revision: str | Sequence[str] | None = "0013_replica_url"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fleet_probes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("key_salt", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("pending_key_salt", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fleet_probes", schema=None) as batch_op:
        batch_op.drop_column("pending_key_salt")
        batch_op.drop_column("key_salt")
