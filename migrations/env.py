"""Alembic environment: the URL comes from recsys settings, the metadata from recsys.platform.models."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from recsys.config import get_settings
from recsys.platform.db import get_engine
from recsys.platform.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def include_object(obj, name, type_, reflected, compare_to):
    """Objects made by sql/ (functions, views, materialized views) are not model tables."""
    if type_ == "table" and reflected and compare_to is None:
        return False
    return True


def run_migrations_offline() -> None:
    from recsys.platform.db import database_url

    context.configure(
        url=database_url(config.attributes.get("settings") or get_settings()),
        target_metadata=target_metadata,
        literal_binds=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    settings = config.attributes.get("settings") or get_settings()
    with get_engine(settings).connect() as connection:
        _run(connection)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, include_object=include_object)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
