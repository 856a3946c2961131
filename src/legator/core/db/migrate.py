"""Alembic, driven from code: ``legator db upgrade``, start-up, and new revisions."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from legator.core.db.engine import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def import_all_models() -> None:
    """Import every ``legator.<…>.models`` module so that ``Base.metadata`` knows all tables.

    Found by walking the package rather than importing the wings by name, so core keeps its
    rule of importing no wing.
    """
    import legator

    for module in pkgutil.walk_packages(legator.__path__, "legator."):
        if module.name.endswith(".models"):
            importlib.import_module(module.name)


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(db: Database) -> str | None:
    async with db.session() as session:
        connection = await session.connection()
        return await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )


async def upgrade(db: Database, revision: str = "head") -> None:
    # Replicas starting together on PostgreSQL take turns: the first migrates, the others
    # then find the database at head (at once, each would fail creating the same tables).
    async with db.write(turns="legator:migrate") as session:
        connection = await session.connection()
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), revision))


async def new_revision(db: Database, message: str) -> None:
    """Autogenerate a revision from the models against a database at head (developers)."""
    await upgrade(db)
    async with db.write() as session:
        connection = await session.connection()
        await connection.run_sync(
            lambda sync: command.revision(alembic_config(sync), message=message, autogenerate=True)
        )
