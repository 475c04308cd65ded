"""`recsys up`: everything `make up` needs, from an empty machine to a serving system."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import click

from recsys.cli.common import SERVICE_FAILURE, fail
from recsys.config import Settings, get_settings

BUNDLED_DATA = "data/online_retail.csv.gz"


def serving_processes(settings: Settings) -> list[tuple[str, list[str], str | None]]:
    """(name, argv, url) of the long-running parts `up` supervises."""
    from recsys.cli.jobs import worker_argv
    from recsys.cli.web import gunicorn_argv, web_url

    return [
        ("worker", worker_argv(settings), None),
        ("web", gunicorn_argv(settings), web_url(settings)),
    ]


@click.command("up")
@click.option("--data", "data_path", default=BUNDLED_DATA, show_default=True,
              help="File to ingest when the database holds no purchases.")
@click.option("--no-serve", is_flag=True, help="Prepare everything, then exit instead of serving.")
def up(data_path: str, no_serve: bool) -> None:
    """Start services, migrate, ingest and embed when empty, then serve until Ctrl-C."""
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file
    from recsys.catalog.retrieval import stats
    from recsys.platform import embedded as svc
    from recsys.platform import migrations

    settings = get_settings()
    was_running = {s.name: s.running for s in svc.status_all(settings)}
    try:
        svc.start_all(settings)
    except svc.ServiceError as exc:
        fail(str(exc), SERVICE_FAILURE)
    migrations.upgrade(settings)
    if stats(settings)["purchases"] == 0:
        click.echo(f"loading {data_path} ...")
        report = ingest_file(data_path, settings)
        click.echo(f"  {report.rows_loaded:,} purchases in {report.seconds:.1f} s")
    embedded = embed_products(settings)
    if embedded.embedded:
        click.echo(f"  embedded {embedded.embedded:,} products in {embedded.seconds:.1f} s")
    summary = stats(settings)
    click.echo(
        f"catalog: {summary['purchases']:,} purchases, {summary['customers']:,} customers, "
        f"{summary['embedded_products']:,}/{summary['products']:,} products embedded"
    )
    for key, value in svc.service_env(settings).items():
        click.echo(f"{key}={value}")
    if no_serve:
        return

    children: list[tuple[str, subprocess.Popen]] = []
    for name, argv, url in serving_processes(settings):
        children.append((name, subprocess.Popen(argv)))
        click.echo(f"{name}: {url or 'started'}")
    click.echo("up; press Ctrl-C to stop")
    stopping = False

    def _stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping:
        for name, proc in children:
            if proc.poll() is not None:
                click.echo(f"{name} exited with {proc.returncode}", err=True)
                stopping = True
        time.sleep(0.5)
    for _name, proc in children:
        proc.terminate()
    for _name, proc in children:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    started_here = {name for name, running in was_running.items() if not running}
    if "broker" in started_here:
        svc.stop_broker(settings)
    if "postgres" in started_here:
        svc.stop_postgres(settings)
    click.echo(f"stopped ({', '.join(sorted(started_here)) or 'services were already running; left up'})")
    sys.exit(0)


def register(cli: click.Group) -> None:
    cli.add_command(up)
