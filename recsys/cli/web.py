"""`recsys serve`, `recsys apikey` and `recsys admin`: the web process and who may use it.

The web app lives in the `web` package, which the core never imports: `serve` hands
gunicorn (or, with --debug, Flask's development server) the string 'web:create_app()'.
"""

from __future__ import annotations

import os
import secrets
import sys

import click

from recsys.cli.common import emit, ensure_database, fail, json_option
from recsys.config import Settings, get_settings

APP = "web:create_app()"
# gthread workers: the views wait on Postgres and the broker, so threads overlap that waiting,
# and one process per core sidesteps the GIL for the Python work.
DEFAULT_THREADS = 4


def default_workers() -> int:
    """Two processes per core (at most 8): kept-alive connections stay with the process that accepted
    them, and with one process per core an unlucky split left a core idle (964 vs 1,976 cached reads/s
    in two runs on 2 cores); with four the spread was 1,787–1,932."""
    return max(1, min(2 * (os.cpu_count() or 1), 8))


def gunicorn_argv(settings: Settings, workers: int | None = None, threads: int = DEFAULT_THREADS,
                  access_log: bool = False) -> list[str]:
    """The command line that serves the app with gunicorn (also used by `recsys up`)."""
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:web.gunicorn_conf",
        "--bind", f"{settings.web_host}:{settings.web_port}",
        "--workers", str(workers or default_workers()),
        "--threads", str(threads),
        "--worker-class", "gthread",
    ]
    if access_log:
        argv += ["--access-logfile", "-"]
    return [*argv, APP]


def web_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "") else settings.web_host
    return f"http://{host}:{settings.web_port}/admin/"


@click.command("serve")
@click.option("--host", help="Address to listen on (default RECSYS_WEB_HOST).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default RECSYS_WEB_PORT).")
@click.option("--workers", type=click.IntRange(1, 64), help="gunicorn worker processes (default: two per core, ≤ 8).")
@click.option("--threads", type=click.IntRange(1, 64), default=DEFAULT_THREADS, show_default=True,
              help="Threads per worker.")
@click.option("--access-log", is_flag=True, help="Log every request to stdout.")
@click.option("--debug", is_flag=True, help="Flask's dev server with reloader and debugger (never in production).")
def serve(host: str | None, port: int | None, workers: int | None, threads: int, access_log: bool, debug: bool) -> None:
    """Serve the JSON API and the admin pages (gunicorn; Flask's dev server with --debug)."""
    settings = get_settings()
    settings = settings.with_(web_host=host or settings.web_host, web_port=port or settings.web_port)
    ensure_database(settings)
    env = dict(os.environ)
    # One key for every gunicorn worker, or a session made by one worker is rejected by the next.
    env.setdefault("RECSYS_SECRET_KEY", settings.secret_key or secrets.token_hex(32))
    if debug:
        argv = [sys.executable, "-m", "flask", "--app", APP, "run", "--debug",
                "--host", settings.web_host, "--port", str(settings.web_port)]
    else:
        argv = gunicorn_argv(settings, workers, threads, access_log)
    click.echo(f"serving {web_url(settings)} (API {web_url(settings).replace('/admin/', '/api/v1/')})", err=True)
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


@click.group("apikey")
def apikey_group() -> None:
    """API keys for the JSON API (sent as Authorization: Bearer <key>)."""


@apikey_group.command("create")
@click.argument("name")
def apikey_create(name: str) -> None:
    """Create a key called NAME and print it; it is shown only this once."""
    from recsys.platform.auth import AuthError, create_api_key

    settings = ensure_database()
    try:
        key = create_api_key(name, settings)
    except AuthError as exc:
        fail(str(exc))
    click.echo(key)
    click.echo(f"API key {name!r} created; store it now, it cannot be shown again.", err=True)


@apikey_group.command("revoke")
@click.argument("name")
def apikey_revoke(name: str) -> None:
    """Revoke the key called NAME; requests with it get 401 from now on."""
    from recsys.platform.auth import revoke_api_key

    if not revoke_api_key(name, ensure_database()):
        fail(f"no active API key named {name!r}")
    click.echo(f"API key {name!r} revoked")


@apikey_group.command("list")
@json_option
def apikey_list(as_json: bool) -> None:
    """Keys by name, with prefix, creation, last use and whether revoked (never the key)."""
    from recsys.platform.auth import list_api_keys

    keys = [k.as_dict() for k in list_api_keys(ensure_database())]

    def render(rows):
        if not rows:
            click.echo("no API keys; create one with `recsys apikey create NAME`")
        for row in rows:
            state = "active" if row["active"] else f"revoked {row['revoked_at'][:19]}"
            used = row["last_used_at"][:19] if row["last_used_at"] else "never used"
            click.echo(f"{row['name']:24} {row['key_prefix']}…  {state:28} created {row['created_at'][:19]}  {used}")

    emit(keys, as_json, render)


@click.group("admin")
def admin_group() -> None:
    """Users of the admin pages."""


@admin_group.command("create-user")
@click.argument("name")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help="The password (prompted for when left out).")
def admin_create_user(name: str, password: str) -> None:
    """Create admin user NAME, or set a new password for an existing one."""
    from recsys.platform.auth import AuthError, admin_user_exists, create_admin_user

    settings = ensure_database()
    existed = admin_user_exists(name, settings)
    try:
        create_admin_user(name, password, settings)
    except AuthError as exc:
        fail(str(exc))
    click.echo(f"admin user {name!r} {'updated' if existed else 'created'}")


@admin_group.command("disable-user")
@click.argument("name")
def admin_disable_user(name: str) -> None:
    """Stop NAME from logging in (create-user enables them again with a new password)."""
    from recsys.platform.auth import disable_admin_user

    if not disable_admin_user(name, ensure_database()):
        fail(f"no enabled admin user named {name!r}")
    click.echo(f"admin user {name!r} disabled")


@admin_group.command("list-users")
@json_option
def admin_list_users(as_json: bool) -> None:
    """Admin users and their last login."""
    from recsys.platform.auth import list_admin_users

    users = list_admin_users(ensure_database())

    def render(rows):
        if not rows:
            click.echo("no admin users; create one with `recsys admin create-user NAME`")
        for row in rows:
            state = "disabled" if row["disabled"] else "enabled"
            click.echo(f"{row['name']:24} {state:9} last login {(row['last_login_at'] or 'never')[:19]}")

    emit(users, as_json, render)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
    cli.add_command(apikey_group)
    cli.add_command(admin_group)
