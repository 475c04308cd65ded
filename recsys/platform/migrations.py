"""Schema changes through Alembic, callable from the CLI, `make up` and the tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from recsys.config import Settings
from recsys.platform import hnsw
from recsys.platform.db import get_engine

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"
SQL_DIR = PROJECT_ROOT / "sql"


def alembic_config(settings: Settings | None = None) -> Config:
    """Alembic's config for our migrations; `settings` (the database to act on) is left out for offline reads."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["configure_logging"] = False
    if settings is not None:
        config.attributes["settings"] = settings
    return config


def _with_connection(settings: Settings, action) -> None:
    config = alembic_config(settings)
    with get_engine(settings).begin() as connection:
        config.attributes["connection"] = connection
        action(config)


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate; at head, also store embeddings as `settings.embedding_type` (vector or halfvec),
    converting the column and rebuilding the HNSW index when the setting changed."""

    def run(config: Config) -> None:
        command.upgrade(config, revision)
        if revision == "head":
            hnsw.convert_embedding_type(config.attributes["connection"], settings.embedding_type)

    _with_connection(settings, run)


def downgrade(settings: Settings, revision: str = "-1") -> None:
    _with_connection(settings, lambda config: command.downgrade(config, revision))


def current_revision(settings: Settings) -> str | None:
    with get_engine(settings).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def check(settings: Settings) -> None:
    """Raise if the models and the migrated schema differ (`alembic check`)."""
    _with_connection(settings, command.check)
