"""The evaluation's output folder: metrics.json, report.md, a plot, per-case ranks, and a `latest` pointer.

Runs go to `<root>/<UTC timestamp>/` (root defaults to `$RECSYS_HOME/eval`) and
`<root>/latest` points at the newest, so the admin page can show it with `latest_report`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from recsys.config import Settings

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOT_FILE = "ndcg_latency.png"
CASES_FILE = "cases.jsonl"
LATEST = "latest"
TABLE_COLUMNS = (
    ("HR@5", "all", "hit_rate@5"),
    ("HR@10", "all", "hit_rate@10"),
    ("Recall@10", "all", "recall@10"),
    ("NDCG@5", "all", "ndcg@5"),
    ("NDCG@10", "all", "ndcg@10"),
    ("MRR@10", "all", "mrr@10"),
    ("NDCG@10 reachable", "reachable", "ndcg@10"),
    ("NDCG@10 repeat", "repeat", "ndcg@10"),
    ("NDCG@10 new", "new", "ndcg@10"),
)


def eval_root(settings: Settings) -> Path:
    """Where `recsys eval` writes its runs and the admin page reads them."""
    return settings.home / "eval"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def _delta(diff: dict | None) -> str:
    if not diff:
        return "–"
    return f"{diff['delta']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"


def task_table(task: dict) -> str:
    """One markdown table: a row per ranker, the metrics, NDCG@10 vs retrieval (95% CI) and latency."""
    head = ["ranker", "cases", *(title for title, _, _ in TABLE_COLUMNS), "ΔNDCG@10 vs retrieval",
            "p50 ms", "p95 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in task["rankers"].items():
        segments = result["segments"]
        cells = [name, str(result["cases"])]
        cells += [_fmt(segments[segment].get(metric)) for _, segment, metric in TABLE_COLUMNS]
        cells.append(_delta(result.get("vs_retrieval_ndcg@10")))
        cells += [_ms(result["latency_ms"]["p50"]), _ms(result["latency_ms"]["p95"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(task: dict) -> str:
    """Candidate recall: share of cases with an answer among the first 20 / 100 candidates, per source."""
    recall = task.get("candidate_recall")
    if not recall:
        return ""
    lines = ["| candidates | answer in first 20 | answer in first 100 | candidates per case |", "|---|---|---|---|"]
    for name, row in recall.items():
        lines.append(f"| {name} | {_fmt(row.get('@20'))} | {_fmt(row.get('@100'))} | {row.get('mean_found', 0):.1f} |")
    return "\n".join(lines)


def baselines_table(task: dict) -> str:
    """Paired ΔNDCG@10 (95% interval) of every ranker against each classical baseline."""
    baselines = [b for b in ("retrieval", "popularity", "copurchase") if b in task["rankers"]]
    rows = [(name, result.get("vs_ndcg@10") or {}) for name, result in task["rankers"].items()]
    if not baselines or not any(versus for _, versus in rows):
        return ""
    lines = ["| ranker | " + " | ".join(f"Δ vs {b}" for b in baselines) + " |", "|---|" + "---|" * len(baselines)]
    for name, versus in rows:
        lines.append(f"| {name} | " + " | ".join(_delta(versus.get(b)) for b in baselines) + " |")
    return "\n".join(lines)


def tables_markdown(results: dict) -> str:
    """Every task's table with a line saying what its cases were."""
    parts = []
    for task_name, task in results["tasks"].items():
        parts.append(
            f"**{task['title']}** (`{task_name}`): {task['cases']} cases "
            f"({', '.join(f'{k} {v}' for k, v in task['strata'].items())}); answer among the "
            f"{results['params']['max_candidates']} ranked candidates in {task['reachable']:.0%}, among the "
            f"{results['params']['retrieve_k']} retrieved in {task['retrieved']:.0%}; "
            f"{task['repeat_cases']} cases with a repeat purchase, {task['new_cases']} with a new item.\n"
        )
        parts.append(task_table(task) + "\n")
        for extra in (baselines_table(task), recall_table(task)):
            if extra:
                parts.append(extra + "\n")
    for variant, meta in (results.get("learned") or {}).items():
        importances = meta.get("importances") or {}
        if importances:
            parts.append(f"**Feature importance of `{variant}`** (share of the split gain; trained with cutoff "
                         f"{meta.get('cutoff')}, inner cutoff {meta.get('inner_cutoff')}):\n")
            parts.append("\n".join(["| feature | share |", "|---|---|"]
                                   + [f"| {name} | {share:.3f} |" for name, share in importances.items()]) + "\n")
    return "\n".join(parts)


def report_markdown(results: dict) -> str:
    params, data, machine = results["params"], results["data"], results["machine"]
    limits = ", ".join(f"{k} {v}" for k, v in params["limits"].items()) or "none"
    lines = [
        f"# Evaluation {results['created_at']}",
        "",
        f"Known: purchases before {data['cutoff']} ({data['train_purchases']:,} lines, "
        f"{data['train_customers']:,} customers). Held out: from the cutoff"
        + (f" to {data['until']}" if data.get("until") else "")
        + f" ({data['test_purchases']:,} lines, {data['test_customers']:,} customers).",
        f"Seed {params['seed']}, up to {params['cases']} cases per task; cases per task capped for: {limits}. "
        f"Model {params.get('llm_model') or '–'} (prompt {params.get('prompt_version') or '–'}), "
        f"{params['max_candidates']} candidates ranked of {params['retrieve_k']} retrieved, "
        f"batches of {params['batch_size']}"
        + (", pre-cutoff purchases excluded from candidates" if params.get("exclude_purchased") else "")
        + ".",
        f"Every case went through the production pipeline (`recommend_batch`) against the snapshot database "
        f"{data.get('snapshot', '–')} (purchases before the cutoff only, loaded through the ingest).",
        f"Wall time {results['wall_s']:.0f} s on {machine['cpus']} CPUs ({machine.get('cpu_model') or 'CPU'}; "
        f"load average {machine['load_average_start']} at start, {machine['load_average_end']} at the end).",
        "",
        tables_markdown(results),
        "HR = HitRate. *reachable*: cases whose answer was among the ranked candidates; *repeat* / *new*: "
        "answers the customer had / had not bought before the cutoff. ΔNDCG@10: paired difference on the same "
        "cases, with a 95% interval. Latency: ranking only, ms per request in batches. Candidate recall: an "
        "answer among the first 20 / 100 merged candidates, or among a source's first 20 / 100.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """NDCG@10 per ranker and task, and median ranking latency per ranker (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    rankers = list(dict.fromkeys(name for task in results["tasks"].values() for name in task["rankers"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(tasks), 1)
    for offset, task in enumerate(tasks):
        entries = results["tasks"][task]["rankers"]
        values = [entries[r]["segments"]["all"].get("ndcg@10", 0.0) if r in entries else 0.0 for r in rankers]
        positions = [i + offset * width for i in range(len(rankers))]
        left.bar(positions, values, width, label=task)
    left.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(rankers))], rankers, rotation=30,
                    ha="right")
    left.set_ylabel("NDCG@10 (all cases)")
    left.set_title("Ranking quality")
    left.legend()
    p50, p95 = [], []
    for ranker in rankers:
        latencies = [t["rankers"][ranker]["latency_ms"] for t in results["tasks"].values() if ranker in t["rankers"]]
        p50.append(max(min(lat["p50"] for lat in latencies), 1e-3))
        p95.append(max(max(lat["p95"] for lat in latencies), 1e-3))
    right.bar(rankers, p50, color="tab:gray", label="p50")
    right.scatter(rankers, p95, color="black", marker="_", s=200, label="p95")
    right.set_yscale("log")
    right.set_ylabel("ms per request (ranking only)")
    right.set_title("Latency")
    right.tick_params(axis="x", rotation=30)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _point_latest(root: Path, folder: Path) -> None:
    """Replace `root/latest` with a relative symlink to `folder` in one rename."""
    temporary = root / f".{LATEST}-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(folder.name, target_is_directory=True)
    os.replace(temporary, root / LATEST)


def write_report(results: dict, root: Path) -> Path:
    """Write a run's folder under `root` (usually `eval_root(settings)`) and point `latest` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = root / stamp
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = root / f"{stamp}-{suffix}"
    folder.mkdir()
    metrics = {key: value for key, value in results.items() if key != "per_case"}
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    (folder / REPORT_FILE).write_text(report_markdown(results))
    with (folder / CASES_FILE).open("w") as handle:
        for record in results.get("per_case", []):
            handle.write(json.dumps(record, default=str) + "\n")
    plot(results, folder / PLOT_FILE)
    _point_latest(root, folder)
    log.info("evaluation written to %s", folder)
    return folder


def latest_report(root: Path) -> dict | None:
    """The newest run under `root` for an admin page: {created_at, params, metrics, table_markdown, plot_path}."""
    root = Path(root)
    folder = root / LATEST
    if not (folder / METRICS_FILE).is_file():
        runs = sorted(p for p in root.glob("*/") if (p / METRICS_FILE).is_file()) if root.is_dir() else []
        if not runs:
            return None
        folder = runs[-1]
    folder = folder.resolve()
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", folder / METRICS_FILE, exc)
        return None
    plot_path = folder / PLOT_FILE
    return {
        "created_at": metrics.get("created_at"),
        "params": metrics.get("params", {}),
        "metrics": metrics,
        "table_markdown": tables_markdown(metrics),
        "plot_path": str(plot_path) if plot_path.is_file() else None,
    }
