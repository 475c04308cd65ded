"""The `recsys` command line. Each domain's commands live in their own module, registered below."""

from __future__ import annotations

import logging
import warnings

import click

from recsys.cli import data, evaluate, jobs, llm, services, up, web
from recsys.config import get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level to stderr.")
def cli(verbose: bool) -> None:
    """recsys: LLM-reranked product recommendations on PostgreSQL + pgvector."""
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    level = logging.INFO if verbose else getattr(logging, get_settings().log_level.upper(), logging.WARNING)
    logging.basicConfig(level=max(level, logging.INFO) if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for module in (services, data, llm, jobs, up, web, evaluate):
    module.register(cli)


def main() -> None:
    cli(prog_name="recsys")
