"""`recsys up`: everything `make up` needs, from an empty machine to a serving system.

`up` owns the embedded services of its own home folder, whether it started them or found them
running (a failed `up` may have left Postgres behind): it stops them when it exits, or when it
fails on the way. `--no-serve` leaves them running on success, for the commands that follow.
The URLs are printed once the web processes answer and are warm, so the first request is fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import click

from recsys.cli.common import SERVICE_FAILURE, fail
from recsys.config import Settings, get_settings

BUNDLED_DATA = "data/online_retail.csv.gz"
WEB_READY_SECONDS = 180
# A worker finishing its batch (or still loading its models on a loaded machine) gets this long to stop.
STOP_SECONDS = 60


def serving_processes(settings: Settings) -> list[tuple[str, list[str]]]:
    """(name, argv) of the long-running parts `up` supervises."""
    from recsys.cli.jobs import worker_argv
    from recsys.cli.web import gunicorn_argv

    return [("worker", worker_argv(settings)), ("web", gunicorn_argv(settings))]


def web_health(settings: Settings) -> dict | None:
    """The web's /api/v1/health answer, or None while nothing answers."""
    from recsys.cli.web import web_url

    url = web_url(settings).removesuffix("/admin/") + "/api/v1/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503: warming, or database/broker down
        try:
            return json.loads(exc.read())
        except ValueError:
            return {"status": f"http {exc.code}"}
    except (OSError, ValueError):
        return None


def wait_for_web(settings: Settings, web: subprocess.Popen, timeout: float = WEB_READY_SECONDS) -> dict:
    """Poll the health check until the web answers and is no longer warming; raise if it exits or never does."""
    deadline = time.monotonic() + timeout
    while True:
        if web.poll() is not None:
            raise click.ClickException(f"the web server exited with {web.returncode} before it was ready")
        health = web_health(settings)
        if health is not None and health.get("status") not in ("warming", None):
            return health
        if time.monotonic() > deadline:
            raise click.ClickException(f"the web server was not ready after {timeout:.0f} s")
        time.sleep(0.2)


def stop_own_services(settings: Settings) -> list[str]:
    """Stop the embedded services of this home that are running; their names."""
    from recsys.platform import embedded as svc

    stopped = []
    if svc.stop_broker(settings):
        stopped.append("broker")
    if svc.stop_postgres(settings):
        stopped.append("postgres")
    return stopped


def prepare(settings: Settings, data_path: str) -> None:
    """Services, schema, data and embeddings, with what was done said as it goes."""
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file
    from recsys.catalog.retrieval import stats
    from recsys.platform import embedded as svc
    from recsys.platform import migrations

    try:
        svc.start_all(settings)
    except svc.ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    migrations.upgrade(settings)
    if stats(settings)["purchases"] == 0:
        click.echo(f"loading {data_path} ...")
        report = ingest_file(data_path, settings)
        click.echo(f"  {report.rows_loaded:,} purchases in {report.seconds:.1f} s")
    embedded = embed_products(settings)
    if embedded.embedded:
        click.echo(f"  embedded {embedded.embedded:,} products in {embedded.seconds:.1f} s")
    from recsys.cli.train import train_when_missing

    train_when_missing(settings)
    summary = stats(settings)
    click.echo(
        f"catalog: {summary['purchases']:,} purchases, {summary['customers']:,} customers, "
        f"{summary['embedded_products']:,}/{summary['products']:,} products embedded"
    )
    for key, value in svc.service_env(settings).items():
        click.echo(f"{key}={value}")


def serve(settings: Settings) -> int:
    """Run the worker and the web until Ctrl-C or until one exits; 0 on Ctrl-C, 1 when a child died."""
    from recsys.cli.web import web_url

    stopping: list[int] = []

    def _stop(*_args) -> None:
        stopping.append(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # Each child leads its own process group, so that a worker's pool processes go with it when it has to
    # be killed (a killed Celery main process leaves its pool children running otherwise).
    children = {name: subprocess.Popen(argv, start_new_session=True) for name, argv in serving_processes(settings)}
    try:
        wait_for_web(settings, children["web"])
        admin = web_url(settings)
        click.echo(f"web: {admin} (admin) · {admin.removesuffix('/admin/')}/api/v1/ (API)")
        click.echo("up; press Ctrl-C to stop")
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    click.echo(f"{name} exited with {proc.returncode}", err=True)
                    stopping.append(1)
            time.sleep(0.5)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in children.values():
            try:
                proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return max(stopping)


@click.command("up")
@click.option("--data", "data_path", default=BUNDLED_DATA, show_default=True,
              help="File to ingest when the database holds no purchases.")
@click.option("--no-serve", is_flag=True, help="Prepare everything, then exit (services left running).")
def up(data_path: str, no_serve: bool) -> None:
    """Start services, migrate, ingest and embed when empty, then serve until Ctrl-C; stops the services after."""
    settings = get_settings()
    finished = False
    code = SERVICE_FAILURE
    try:
        prepare(settings, data_path)
        if no_serve:
            finished = True
            return
        code = serve(settings)
    except click.ClickException as exc:
        fail(exc.message, SERVICE_FAILURE)
    except KeyboardInterrupt:
        code = 130
    finally:
        if not finished:
            stopped = stop_own_services(settings)
            click.echo(f"stopped {', '.join(stopped) or 'nothing (no embedded service was running)'}")
    sys.exit(code)


def register(cli: click.Group) -> None:
    cli.add_command(up)
