"""`recsys services` and `recsys db`: the embedded servers and the schema.

recsys.platform.embedded (and psycopg with it, ~0.45 s of every start on a loaded machine) is imported by
the commands that use it, so `recsys --help` and the commands that never touch the servers do not pay it.
"""

from __future__ import annotations

import click

from recsys.cli.common import SERVICE_FAILURE, emit, ensure_database, fail, json_option
from recsys.config import get_settings


@click.group("services")
def services_group() -> None:
    """Embedded PostgreSQL + pgvector and Valkey (skipped where DATABASE_URL / CELERY_BROKER_URL are set)."""


def _render_status(statuses: dict) -> None:
    for name, status in statuses.items():
        state = "running" if status["running"] else "stopped"
        kind = "embedded" if status["embedded"] else "external"
        pid = f" pid {status['pid']}" if status["pid"] else ""
        click.echo(f"{name:9} {state:8} {kind:9} {status['where']}{pid}")


@services_group.command("start")
@json_option
def start(as_json: bool) -> None:
    """Start the services; they keep running after this command exits."""
    from recsys.platform import embedded as svc

    settings = get_settings()
    try:
        statuses = svc.start_all(settings)
    except svc.ServiceError as exc:
        fail(str(exc), SERVICE_FAILURE)
    if not as_json and not any(s.embedded for s in statuses):
        click.echo("nothing started: DATABASE_URL and CELERY_BROKER_URL name external services, both answering")
    emit({s.name: s.as_dict() for s in statuses}, as_json, _render_status)


@services_group.command("stop")
@json_option
def stop(as_json: bool) -> None:
    """Stop the embedded services."""
    from recsys.platform import embedded as svc

    stopped = svc.stop_all(get_settings())
    emit(stopped, as_json, lambda d: click.echo(", ".join(f"{k}: {'stopped' if v else 'was not running'}"
                                                          for k, v in d.items())))


@services_group.command("status")
@json_option
def status(as_json: bool) -> None:
    """Say what runs where."""
    from recsys.platform import embedded as svc

    emit({s.name: s.as_dict() for s in svc.status_all(get_settings())}, as_json, _render_status)


@services_group.command("env")
def env() -> None:
    """Print DATABASE_URL=… and CELERY_BROKER_URL=… lines for other programs."""
    from recsys.platform import embedded as svc

    for key, value in svc.service_env(get_settings()).items():
        click.echo(f"{key}={value}")


@click.group("db")
def db_group() -> None:
    """Schema migrations (Alembic)."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Migrate the schema up to REVISION (default: head)."""
    from recsys.platform import migrations

    settings = ensure_database(migrated=False)
    migrations.upgrade(settings, revision)
    click.echo(f"schema at {migrations.current_revision(settings)}")


@db_group.command("downgrade")
@click.argument("revision", default="-1")
def downgrade(revision: str) -> None:
    """Migrate the schema down to REVISION (default: one step; `base` drops everything)."""
    from recsys.platform import migrations

    settings = ensure_database(migrated=False)
    migrations.downgrade(settings, revision)
    click.echo(f"schema at {migrations.current_revision(settings) or 'base'}")


@db_group.command("current")
def current() -> None:
    """Print the schema's current and latest revisions."""
    from recsys.platform import migrations

    settings = ensure_database(migrated=False)
    click.echo(f"current {migrations.current_revision(settings) or 'base'}, head {migrations.head_revision()}")


def register(cli: click.Group) -> None:
    cli.add_command(services_group)
    cli.add_command(db_group)
