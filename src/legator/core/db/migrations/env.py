"""Alembic environment: always handed a live connection by legator.core.db.migrate."""

from alembic import context

from legator.core.db.base import Base
from legator.core.db.migrate import import_all_models

import_all_models()
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `legator db upgrade`, not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
