"""Discover throughput and what it finds, with the packaged Gemma 3 270M on this CPU. Prints JSON.

    python bench/discover.py [--jobs 8] [--batch-sizes 1,8] [--table] [--skip-throughput]

Throughput: `--jobs` distinct discover requests (a fixed need for a customer with history; no two
alike, so nothing comes from the cache) are submitted at once to a real Celery worker (prefork, one
process) whose RECSYS_BATCH_SIZE is each of `--batch-sizes` in turn, with a fresh worker each time.
Reported per batch size: jobs/s from the first submit to the last finished job, submit→succeeded
p50/p95 from the jobs table, the pipeline's own p50 per request (the result's `timings_ms.total_ms`,
a batch's time shared by its requests) and its stages, and how many jobs were lost (must be 0).

`--table`: the FIXED_NEEDS without a customer (no profile in the prompt), one batch in this process:
per need the ideas (category | description), whether the model's answer was usable (`fallback`),
and the first product shown under each idea, for judging by reading whether they are on topic.

It uses its own database (`recsys_bench_jobs`, loaded with the bundled file on first use, shared
with bench/jobs.py) and its own Valkey on a free port. Load averages go with the figures because
the cores are shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from common import clear_jobs, free_port, load_average, loaded_database, machine
from sqlalchemy import text
from support import workers

from recsys import jobs
from recsys.config import Settings
from recsys.platform import embedded
from recsys.platform.db import dispose_engines, get_engine

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

BENCH_DB = "recsys_bench_jobs"
FIXED_NEEDS = [
    "a garden party next week",
    "stocking the shop for Christmas",
    "a baby shower",
    "tea time with friends",
    "back to school for my kids",
    "a birthday present for a five year old boy",
    "decorating a vintage kitchen",
    "Valentine's day gifts",
    "a picnic at the beach",
    "Halloween decorations",
]


def workload(settings: Settings, count: int) -> list[dict]:
    """Distinct requests: each fixed need for customers with at least five purchases, in turn."""
    with get_engine(settings).connect() as conn:
        customers = conn.execute(
            text("SELECT customer_id FROM customers WHERE purchase_count >= 5 ORDER BY customer_id LIMIT :n"),
            {"n": count},
        ).scalars().all()
    pairs = zip(itertools.cycle(FIXED_NEEDS), customers, strict=False)
    return [{"need": need, "customer_id": customer} for need, customer in itertools.islice(pairs, count)]


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 1)


def run_batch_size(settings: Settings, requests: list[dict], batch_size: int, timeout: float, log_dir: Path) -> dict:
    import redis

    clear_jobs(settings)
    redis.Redis.from_url(settings.celery_broker_url).flushall()
    environment = workers.worker_env(settings, RECSYS_LOG_LEVEL="WARNING", RECSYS_BATCH_SIZE=str(batch_size),
                                     RECSYS_BATCH_WAIT_MS="200")
    worker = workers.WorkerProcess(settings, environment, log_dir / f"worker-{batch_size}.log", loglevel="WARNING",
                                   prefix="bench-discover")
    try:
        worker.wait_ready(timeout=300)
        load_before = os.getloadavg()[0]
        outcomes = [jobs.submit_discover(request, settings) for request in requests]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if jobs.count_jobs(settings, "queued") + jobs.count_jobs(settings, "running") == 0:
                break
            time.sleep(0.2)
        with get_engine(settings).connect() as conn:
            rows = conn.execute(text(
                "SELECT status, extract(epoch FROM finished_at - created_at) AS latency, created_at, finished_at, "
                "result->'timings_ms' AS timings, result->'batch_size' AS batch, result->'flags' AS flags "
                "FROM jobs WHERE kind = 'discover'"
            )).all()
        load_after = os.getloadavg()[0]
    finally:
        worker.stop()
    done = [row for row in rows if row.status == "succeeded"]
    span = (max(r.finished_at for r in done) - min(r.created_at for r in rows)).total_seconds() if done else None
    stages = {}
    for stage in ("profile_ms", "generate_ms", "parse_ms", "embed_ms", "search_ms", "group_ms", "total_ms"):
        stages[stage] = percentile([float(r.timings[stage]) for r in done if r.timings], 0.5)
    return {
        "batch_size": batch_size,
        "jobs": len(requests),
        "cached_at_submit": sum(o.cached for o in outcomes),
        "succeeded": len(done),
        "lost": len(requests) - len(done),
        "end_to_end_seconds": round(span, 1) if span else None,
        "jobs_per_second": round(len(done) / span, 3) if span else None,
        "submit_to_succeeded_p50_ms": percentile([float(r.latency) * 1000 for r in done], 0.5),
        "submit_to_succeeded_p95_ms": percentile([float(r.latency) * 1000 for r in done], 0.95),
        "pipeline_p50_ms_per_request": stages,
        "mean_batch": round(sum(int(r.batch) for r in done) / len(done), 2) if done else None,
        "fallbacks": sum(bool(r.flags and r.flags.get("fallback")) for r in done),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
    }


def topic_table(settings: Settings) -> list[dict]:
    """The fixed needs, profile-free, in one batch: ideas and the first product found for each."""
    from recsys.discover.pipeline import discover_batch
    from recsys.discover.request import DiscoverRequest

    started = time.perf_counter()
    results = discover_batch([DiscoverRequest(need=need) for need in FIXED_NEEDS], settings)
    seconds = time.perf_counter() - started
    rows = []
    for result in results:
        rows.append({
            "need": result["need"],
            "summary": result["summary"],
            "fallback": result["flags"]["fallback"],
            "problems": result["problems"],
            "ideas": [
                {"idea": f"{g['idea']['category']} | {g['idea']['description']}",
                 "shown": [f"{i['stock_code']} {i['description']}" for i in g["items"]]}
                for g in result["groups"]
            ],
        })
    return [{"batch_seconds": round(seconds, 1), "load_average": load_average()}, *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for one batch size")
    parser.add_argument("--table", action="store_true", help="also the on-topic table for the fixed needs")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    base = Settings.from_env()
    bench = loaded_database(base, BENCH_DB)
    from recsys.llm.acquisition import prepare_model

    prepare_model(bench)
    home = Path(tempfile.mkdtemp(prefix="recsys-bench-discover-"))
    broker = Settings(home=home, broker_port=free_port())
    embedded.start_broker(broker)
    settings = bench.with_(broker_port=broker.broker_port, broker_url=broker.celery_broker_url)
    report: dict = {"machine": machine(), "model": settings.llm_model,
                    "worker": "celery prefork, 1 process, RECSYS_BATCH_WAIT_MS=200"}
    try:
        if not args.skip_throughput:
            requests = workload(settings, args.jobs)
            for size in [int(s) for s in args.batch_sizes.split(",")]:
                report[f"batch_{size}"] = run_batch_size(settings, requests, size, args.timeout, home)
        if args.table:
            report["fixed_needs"] = topic_table(settings)
    finally:
        clear_jobs(settings)
        dispose_engines()
        embedded.stop_broker(broker)
        shutil.rmtree(home, ignore_errors=True)
    report["machine"]["load_average_end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
