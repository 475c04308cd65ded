"""`recsys deploy check`: the production files read and checked before anything is started."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from recsys.cli.common import SERVICE_FAILURE


@click.group("deploy")
def deploy_group() -> None:
    """The container deployment (docker-compose.yml, Dockerfile, .env)."""


@deploy_group.command("check")
@click.option("--compose", "compose_path", type=click.Path(path_type=Path), default=Path("docker-compose.yml"),
              show_default=True, help="The compose file.")
@click.option("--env-file", type=click.Path(path_type=Path),
              help="The .env the compose file reads (or .env.example, which must list every setting).")
@click.option("--dockerfile", type=click.Path(path_type=Path), help="Also check this Dockerfile.")
def check(compose_path: Path, env_file: Path | None, dockerfile: Path | None) -> None:
    """Services, pins, healthchecks, start order and every variable against the settings; one line
    per problem on stderr and exit 1, or `ok` and exit 0. Needs no Docker engine."""
    from recsys.platform.deploy import check_files

    problems = check_files(compose_path, env_file, dockerfile)
    for problem in problems:
        click.echo(f"recsys: error: {problem}", err=True)
    if problems:
        sys.exit(SERVICE_FAILURE)
    click.echo("ok")


def register(cli: click.Group) -> None:
    cli.add_command(deploy_group)
