"""fleet: an enrolment token may be bound to the one probe it re-enrols

Revision ID: 0012_token_probe
Revises: 0011_backend_owner
Create Date: 2026-12-07 01:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_token_probe"
down_revision: str | Sequence[str] | None = "0011_backend_owner"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fleet_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("probe_id", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_fleet_tokens_probe_id"), ["probe_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_fleet_tokens_probe_id_fleet_probes"),
            "fleet_probes",
            ["probe_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("fleet_tokens", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_fleet_tokens_probe_id_fleet_probes"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_fleet_tokens_probe_id"))
        batch_op.drop_column("probe_id")
