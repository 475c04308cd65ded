"""`recsys eval`: the offline evaluation (temporal split, two tasks, every ranker on the same cases)."""

from __future__ import annotations

import sys

import click

from recsys.cli.common import SERVICE_FAILURE, emit, ensure_database, fail, json_option


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))


def _limits(values: tuple[str, ...]) -> dict[str, int | None]:
    """`RANKER=N` (cases per task for that ranker) or `RANKER=all`; each replaces the default cap."""
    from recsys.evaluation.runner import DEFAULT_LIMITS

    limits: dict[str, int | None] = dict(DEFAULT_LIMITS)
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not name.strip():
            fail(f"--limit takes RANKER=N or RANKER=all, got {value!r}")
        count = count.strip().lower()
        if count == "all":
            limits[name.strip()] = None
            continue
        try:
            limits[name.strip()] = int(count)
        except ValueError:
            fail(f"--limit takes RANKER=N or RANKER=all, got {value!r}")
    return limits


@click.command("eval")
@click.option("--rankers", default=None, help="Comma-separated rankers (default: all).")
@click.option("--tasks", default=None, help="Comma-separated tasks: query, next (default: both).")
@click.option("--cases", "cases", type=int, default=None, help="Cases per task (default 500).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default 42).")
@click.option("--cutoff", default=None, help="Known before this date, held out from it (default 2011-11-01).")
@click.option("--until", default=None, help="End of the held-out window (default: the end of the data).")
@click.option("--limit", "limit", multiple=True, metavar="RANKER=N",
              help="Cases per task for one ranker; RANKER=all removes its default cap. Repeatable.")
@click.option("--max-candidates", type=int, default=None, help="Candidates each ranker sees (RECSYS_MAX_CANDIDATES).")
@click.option("--batch-size", type=int, default=None,
              help="Requests per ranking call (default 32, whatever RECSYS_BATCH_SIZE says).")
@click.option("--exclude-purchased", is_flag=True,
              help="Leave products bought before the cutoff out of the candidates.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Folder for the runs (default $RECSYS_HOME/eval); each run gets a timestamped subfolder.")
@json_option
def evaluate(rankers, tasks, cases, seed, cutoff, until, limit, max_candidates, batch_size, exclude_purchased,
             out, as_json) -> None:
    """Score every ranker on the same held-out cases through the production pipeline, against a snapshot
    database of the purchases before the cutoff; write metrics.json, report.md and a plot."""
    from tqdm import tqdm

    from recsys.evaluation.report import eval_root, report_markdown, write_report
    from recsys.evaluation.runner import EvalParams, EvaluationError, run_evaluation

    params = EvalParams(exclude_purchased=exclude_purchased, limits=_limits(limit))
    for name, value in (("rankers", _names(rankers)), ("tasks", _names(tasks)), ("cases", cases), ("seed", seed),
                        ("cutoff", cutoff), ("until", until), ("max_candidates", max_candidates),
                        ("batch_size", batch_size)):
        if value is not None:
            setattr(params, name, value)
    try:
        params.validate()
    except EvaluationError as exc:
        fail(str(exc))
    settings = ensure_database()

    def progress(description: str, total: int):
        return tqdm(total=total, desc=description, unit="case", file=sys.stderr, leave=False, disable=None)

    try:
        results = run_evaluation(params, settings, progress=progress)
    except EvaluationError as exc:
        fail(str(exc))
    except Exception as exc:
        if type(exc).__name__ == "ModelLoadError":
            fail(str(exc), SERVICE_FAILURE)
        raise
    folder = write_report(results, out or eval_root(settings))
    payload = {key: value for key, value in results.items() if key != "per_case"} | {"folder": str(folder)}
    emit(payload, as_json, lambda _: click.echo(report_markdown(results) + f"\nwritten to {folder}"))


def register(cli: click.Group) -> None:
    cli.add_command(evaluate)
