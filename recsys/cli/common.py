"""What every command shares: one-line failures, JSON output, making sure the database is there."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps

import click

from recsys.config import Settings, get_settings

BAD_INPUT = 2
SERVICE_FAILURE = 1


def fail(message: str, code: int = BAD_INPUT) -> None:
    """Print one line to stderr and exit; bad input exits 2, service trouble 1."""
    click.echo(f"recsys: error: {message}", err=True)
    sys.exit(code)


def emit(payload, as_json: bool, render: Callable[[object], None] | None = None) -> None:
    if as_json or render is None:
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        render(payload)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def ensure_database(settings: Settings | None = None, migrated: bool = True) -> Settings:
    """Start the embedded Postgres if needed; insist the schema is at the latest migration.

    The CLI is an entry point: without `settings` it reads them from the environment.
    """
    settings = settings or get_settings()
    from recsys.platform import migrations
    from recsys.platform.embedded import ServiceError, check_database, start_postgres

    try:
        if settings.uses_embedded_db:
            start_postgres(settings)
        else:
            check_database(settings)
        if migrated:
            current, head = migrations.current_revision(settings), migrations.head_revision()
            if current != head:
                fail(f"database schema is at {current or 'nothing'}, not {head}: run `recsys db upgrade`",
                     SERVICE_FAILURE)
    except ServiceError as exc:
        fail(str(exc), SERVICE_FAILURE)
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlalchemy", "psycopg")):
            fail(f"database unreachable: {str(exc).splitlines()[0]}", SERVICE_FAILURE)
        raise
    return settings


def bad_input_errors(*kinds: type[Exception]):
    """Turn the listed exceptions into a one-line message with exit code 2."""

    def decorator(func):
        @wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except kinds as exc:
                fail(str(exc))

        return wrapper

    return decorator
