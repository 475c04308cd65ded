"""The `recsys` command line. Each domain's commands live in their own module, registered below."""

from __future__ import annotations

import logging
import warnings

import click

from recsys.cli import data, deploy, discover, evaluate, jobs, llm, services, train, up, web
from recsys.config import get_settings
from recsys.platform import logs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level to stderr.")
def cli(verbose: bool) -> None:
    """recsys: LLM-reranked product recommendations on PostgreSQL + pgvector."""
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    settings = get_settings()
    level = logging.INFO if verbose else getattr(logging, settings.log_level.upper(), logging.WARNING)
    logging.basicConfig(level=max(level, logging.INFO) if verbose else logging.WARNING, format=logs.TEXT_FORMAT)
    logs.use_format(logging.getLogger().handlers, settings)


for module in (services, data, llm, jobs, discover, up, web, evaluate, train, deploy):
    module.register(cli)


def main() -> None:
    cli(prog_name="recsys")
