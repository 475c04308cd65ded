"""`recsys recommend` and `recsys models`: the ranking engine from the command line."""

from __future__ import annotations

import click

from recsys.cli.common import SERVICE_FAILURE, emit, ensure_database, fail, json_option
from recsys.rankers import RANKER_NAMES


@click.command("recommend")
@click.option("--customer", "customer_id", type=int, default=None, help="Customer to recommend for.")
@click.option("--query", default=None, help="What the customer is looking for; omit to use the history alone.")
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many products.")
@click.option("--ranker", type=click.Choice(RANKER_NAMES), default=None, help="Ranker (default RECSYS_RANKER).")
@click.option("--explain", is_flag=True,
              help="Give each item its reasons from the data (and an LLM ranker's own words, labelled).")
@click.option("--exclude-purchased", is_flag=True, help="Leave out what the customer already bought.")
@json_option
def recommend(customer_id, query, k, ranker, explain, exclude_purchased, as_json) -> None:
    """Run the four-stage pipeline for one customer, in this process."""
    from recsys.recommend.pipeline import recommend as run_pipeline
    from recsys.recommend.request import RecommendationRequest, RequestError

    try:
        request = RecommendationRequest.from_dict({
            "customer_id": customer_id, "query": query, "k": k, "ranker": ranker, "explain": explain,
            "exclude_purchased": exclude_purchased,
        })
    except RequestError as exc:
        fail(str(exc))
    settings = ensure_database()
    try:
        result = run_pipeline(request, settings)
    except RequestError as exc:
        fail(str(exc))
    emit(result, as_json, _render)


def _render(result: dict) -> None:
    head = f"ranker {result['ranker']}"
    if result["model"]:
        head += f" ({result['model']}, prompt {result['prompt_version']})"
    click.echo(head)
    for note in result["notes"]:
        click.echo(f"note: {note}")
    for item in result["items"]:
        score = f"{item['score']:.4f}" if item["score"] is not None else "-"
        click.echo(f"{item['rank']:3}. {item['stock_code']:10} {score:>8}  {item['description']}")
        for reason in item.get("reasons") or []:
            click.echo(f"      - {reason}")
        if item.get("model_reason"):
            click.echo(f"      the model's words: \"{item['model_reason']}\"")
    click.echo("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_ms"].items()))


@click.group("models")
def models_group() -> None:
    """The LLM used by the llm-* rankers."""


@models_group.command("prepare")
@click.option("--model", "model_name", default=None, help="Model to prepare (default RECSYS_LLM_MODEL).")
def prepare(model_name: str | None) -> None:
    """Convert/cache the model once (packaged GGUF → bf16 folder) so workers load it in seconds."""
    from recsys.config import get_settings
    from recsys.llm.acquisition import ModelLoadError, prepare_model

    try:
        folder = prepare_model(get_settings(), model_name=model_name)
    except ModelLoadError as exc:
        fail(str(exc), SERVICE_FAILURE)
    click.echo(str(folder))


def register(cli: click.Group) -> None:
    cli.add_command(recommend)
    cli.add_command(models_group)
