"""`recsys train ranker`: fit the learned ranker on past purchases and write it to the model cache."""

from __future__ import annotations

import sys

import click

from recsys.cli.common import emit, ensure_database, fail, json_option


@click.group("train")
def train() -> None:
    """Train models from the purchases in the database."""


def _render(metadata: dict) -> None:
    data = metadata["data"]
    click.echo(f"{metadata['variant']} model {metadata['version']} → {metadata['path']}")
    click.echo(f"features from purchases before {metadata['inner_cutoff']}, labels from then until "
               f"{metadata['cutoff']} ({data['label_customers']} customers)")
    click.echo(f"examples: {data['examples']['next']} next purchase, {data['examples']['query']} query; "
               f"{data['groups_with_answer']} with an answer among the candidates "
               f"({data['train_groups']} train / {data['validation_groups']} validation), {data['rows']} rows")
    for split in ("train", "validation"):
        for task, figures in metadata["metrics"][split].items():
            click.echo(f"{split:>10} {task:>5}: NDCG@10 {figures['ndcg@10']:.3f} "
                       f"(candidate order {figures['candidate_order_ndcg@10']:.3f}, {figures['groups']} groups)")
    top = ", ".join(f"{name} {share:.0%}" for name, share in list(metadata["importances"].items())[:5])
    click.echo(f"best iteration {metadata['best_iteration']}; top features by gain: {top}")
    click.echo(f"took {metadata['timings']['total_s']} s")


@train.command("ranker")
@click.option("--cutoff", default=None,
              help="Train only on purchases before this date (default: everything in the database).")
@click.option("--variant", type=click.Choice(["learned", "learned-llm"]), default="learned", show_default=True)
@click.option("--horizon-days", type=int, default=None,
              help="Label window before the cutoff; features come from before it (default 28).")
@click.option("--max-examples", type=int, default=None,
              help="Examples per task (default: all; 150 for learned-llm, whose LLM scores cost seconds each).")
@click.option("--seed", type=int, default=42, show_default=True)
@json_option
def ranker(cutoff, variant, horizon_days, max_examples, seed, as_json) -> None:
    """Fit the LightGBM LambdaRank model of `learned` (or `learned-llm`) and replace the model file."""
    from tqdm import tqdm

    from recsys.config import get_settings
    from recsys.rankers.training import DEFAULT_HORIZON_DAYS, TrainingError, train_ranker

    if max_examples is not None and max_examples < 1:
        fail(f"--max-examples must be at least 1, got {max_examples}")
    settings = ensure_database(get_settings())

    def progress(description: str, total: int):
        return tqdm(total=total, desc=description, unit="step", file=sys.stderr, leave=False, disable=None)

    try:
        metadata = train_ranker(settings, variant=variant, cutoff=cutoff,
                                horizon_days=horizon_days or DEFAULT_HORIZON_DAYS, seed=seed,
                                max_examples=max_examples, progress=progress)
    except TrainingError as exc:
        fail(str(exc))
    emit(metadata, as_json, _render)


def train_when_missing(settings) -> None:
    """`recsys up`: train the learned ranker once, when the model cache has none (a failure is reported,
    not raised: the other rankers serve without it)."""
    from recsys.rankers.learned import model_path
    from recsys.rankers.training import TrainingError, train_ranker

    if model_path(settings, "learned").exists():
        return
    click.echo("training the learned ranker (recsys train ranker) ...")
    try:
        metadata = train_ranker(settings)
    except TrainingError as exc:
        click.echo(f"  not trained: {exc}")
        return
    validation = metadata["metrics"]["validation"].get("all", {})
    click.echo(f"  model {metadata['version']} in {metadata['timings']['total_s']:.0f} s "
               f"(validation NDCG@10 {validation.get('ndcg@10', 0):.3f}, "
               f"candidate order {validation.get('candidate_order_ndcg@10', 0):.3f})")


def register(cli: click.Group) -> None:
    cli.add_command(train)
