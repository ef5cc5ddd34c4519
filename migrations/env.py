"""Alembic environment: the models' metadata is the target; the URL comes from the config or
LORANODE_DATABASE_URL. SQLite runs in batch mode so later ALTERs work there too."""

from __future__ import annotations

import os

from alembic import context
from node.db.models import Base
from node.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("LORANODE_DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or LORANODE_DATABASE_URL")
    return url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(_url(), pooled=False)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
