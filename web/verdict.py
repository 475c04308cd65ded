"""The evaluation report in plain words: which ranker wins each task, by how much, and how sure that is.

Reads the report's metrics (`recsys.evaluation` writes them): per task, per ranker, NDCG@10 and
the paired difference from retrieval order with its 95% interval. "Sure" means that interval
leaves out zero.
"""

from __future__ import annotations

BASELINE = "retrieval"


def _interval(diff: dict) -> str:
    return f"95% interval {diff['low']:+.3f} to {diff['high']:+.3f}"


def _cases(n) -> str:
    return f"{n:,} cases" if isinstance(n, int) else "an unknown number of cases"


def task_verdict(title: str, task: dict) -> list[str]:
    """Sentences for one task: the winner over retrieval (or that there is none), and any sure losers."""
    rankers = task.get("rankers") or {}
    compared = [
        (name, result, result["vs_retrieval_ndcg@10"])
        for name, result in rankers.items()
        if name != BASELINE and isinstance(result.get("vs_retrieval_ndcg@10"), dict)
    ]
    if not compared:
        return [f"{title}: only retrieval order was measured, so there is nothing to compare."]
    compared.sort(key=lambda entry: entry[2]["delta"], reverse=True)
    sure_better = [entry for entry in compared if entry[2]["low"] > 0]
    sure_worse = [entry for entry in compared if entry[2]["high"] < 0]
    lines = []
    if sure_better:
        name, result, diff = sure_better[0]
        ndcg = ((result.get("segments") or {}).get("all") or {}).get("ndcg@10")
        figure = f"NDCG@10 {ndcg:.3f}, " if isinstance(ndcg, int | float) else ""
        lines.append(
            f"{title}: {name} wins — {figure}{diff['delta']:+.3f} over retrieval order "
            f"({_interval(diff)}, so the gain is real), on {_cases(result.get('cases'))}."
        )
        others = [entry[0] for entry in sure_better[1:]]
        if others:
            lines[-1] += f" Also surely better than retrieval: {', '.join(others)}."
    else:
        name, result, diff = compared[0]
        lines.append(
            f"{title}: no ranker is surely better than retrieval order. The closest is {name}, "
            f"{diff['delta']:+.3f} ({_interval(diff)}, which includes zero), on {_cases(result.get('cases'))}."
        )
    if sure_worse:
        worse = ", ".join(f"{name} ({diff['delta']:+.3f})" for name, _, diff in sure_worse)
        lines.append(f"Surely worse than retrieval order on this task: {worse}.")
    return lines


def evaluation_verdict(metrics: dict | None) -> list[str]:
    """A few sentences for the evaluation page; empty when the report has no per-task results."""
    tasks = (metrics or {}).get("tasks") or {}
    lines: list[str] = []
    for key, task in tasks.items():
        if isinstance(task, dict):
            lines += task_verdict(task.get("title") or key, task)
    return lines
