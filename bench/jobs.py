"""End-to-end job throughput: submit → real Celery worker → succeeded, against a no-op Celery task. Prints JSON.

    python bench/jobs.py [--retrieval-jobs 1000] [--concurrency 1,2] [--rounds 1] [--kept-jobs 0] [--first-jobs 0]
                         [--statement-stats]
                         [--llm-jobs 100] [--llm-ranker llm-verbalizer] [--llm-batch-sizes 1,8] [--skip-llm]

Ceiling: bench/noop_worker.py, a task that does nothing, on the same broker with the same worker
settings (prefork, acks late, reject on a lost worker, prefetch 1), sent from as many threads and
waited for the same way. For each worker size in `--concurrency` (processes), the no-op run and the
`retrieval` run (the worker's batch size from RECSYS_BATCH_SIZE, default 64) follow each other, each
with a fresh worker, so the ratio holds on a shared, loaded machine; `--rounds` repeats the pair and
reports each round and the medians (the no-op rate alone moved 219-426 tasks/s between runs minutes
apart on the 2-core machine). Each retrieval run also reports the pipeline's stage times per job, from
the results' `timings_ms`, and each run the CPU it cost per task, from /proc: the whole machine's and
that of the worker, the bench database's Postgres backends, this process (the submitting threads) and
the broker, with the medians of the machine's per round and their ratio. Goal (issue 16): retrieval
jobs/s ≥ 50% of the no-op's, 0 lost; and 2 processes against 1.
Then, unless --skip-llm, jobs with the packaged Gemma ranker (`--llm-ranker`, default `llm-verbalizer`),
once per batch size. Every request is distinct (customer, query), so nothing is answered from the
cache. For each: jobs/s from the first submit to the last finished job, submit→succeeded p50/p95 from
the jobs table, and how many jobs were lost (not succeeded when all should be: must be 0). It uses
its own database (`recsys_bench_jobs`, loaded with the bundled file on first use) and its own Valkey
on a free port. Load averages are reported because the cores are shared. `--kept-jobs N` first fills
the jobs table with N jobs finished weeks ago (without results), as a deployment keeps them until
`recsys jobs cleanup`, and keeps them through the rounds: the job statements then run against a table
of that size, as they do in production. `--first-jobs N` also starts N fresh workers, one after the
other, and times each one's first job sent alone (submit→succeeded). `--statement-stats` adds one more
one-process retrieval run with Postgres logging each statement's CPU (`log_statement_stats`, embedded
server only) and reports the statements that cost most, per job.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from common import (
    clear_jobs,
    cpu_seconds,
    cpu_spent,
    database_backends,
    free_port,
    keep_old_jobs,
    load_average,
    loaded_database,
    machine,
    machine_busy_seconds,
    ratio,
    with_children,
)
from sqlalchemy import text
from support import workers

from recsys import jobs
from recsys.cli.jobs import worker_argv
from recsys.config import Settings
from recsys.platform import embedded
from recsys.platform.db import dispose_engines, get_engine
from recsys.rankers import LLM_RANKER_NAMES

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

BENCH_DB = "recsys_bench_jobs"


def workload(settings: Settings, count: int, ranker: str, seed: int) -> list[dict]:
    """Distinct requests: customers with history, queries made of product type words (the notebook's style)."""
    with get_engine(settings).connect() as conn:
        customers = conn.execute(
            text("SELECT customer_id FROM customers WHERE purchase_count >= 5 ORDER BY customer_id")
        ).scalars().all()
        descriptions = conn.execute(
            text("SELECT description FROM products WHERE NOT is_non_product AND embedding IS NOT NULL "
                 "ORDER BY stock_code")
        ).scalars().all()
    rng = random.Random(seed)
    queries = sorted({" ".join(d.split()[-2:]) for d in descriptions if len(d.split()) >= 2})
    pairs: set[tuple[int, str]] = set()
    while len(pairs) < count:
        pairs.add((rng.choice(customers), rng.choice(queries)))
    ordered = sorted(pairs)  # a set's order follows PYTHONHASHSEED: sort, then shuffle with the seeded generator
    rng.shuffle(ordered)
    return [{"customer_id": c, "query": q, "k": 10, "ranker": ranker} for c, q in ordered]


def start_worker(settings: Settings, log_path: Path, pool: str = "prefork", concurrency: int = 1,
                 **env: str) -> workers.WorkerProcess:
    """A real worker process like `recsys worker`, quiet (warnings only)."""
    environment = workers.worker_env(settings, RECSYS_LOG_LEVEL="WARNING", **env)
    return workers.WorkerProcess(settings, environment, log_path, pool=pool, concurrency=concurrency,
                                 loglevel="WARNING", prefix="bench")


def cpu_snapshot(worker_pids, broker_pid: int | None) -> dict:
    """CPU seconds so far of the machine (every process), the worker (main process and pool children), the bench
    database's Postgres backends, this process (the submitting threads, or the no-op's client) and the broker."""
    return {
        "machine": machine_busy_seconds(),
        "worker": {pid: cpu_seconds(pid) for pid in worker_pids},
        "postgres": {pid: cpu_seconds(pid) for pid in database_backends(BENCH_DB)},
        "bench_process": {os.getpid(): cpu_seconds(os.getpid())},
        "broker": {broker_pid: cpu_seconds(broker_pid)} if broker_pid else {},
    }


def cpu_per_task(before: dict, after: dict, tasks: int) -> dict | None:
    """Milliseconds of CPU per finished task between two snapshots: the machine's (all of it: what the rate
    competes for on shared cores) and each part's. A process that ended in between is not counted."""
    if not tasks or before["machine"] is None or after["machine"] is None:
        return None
    spent = {"machine": after["machine"] - before["machine"]}
    for part in ("worker", "postgres", "bench_process", "broker"):
        spent[part] = cpu_spent(before[part], after[part])
    return {f"{part}_ms": round(seconds * 1000 / tasks, 2) for part, seconds in spent.items()}


def rate(count: int, seconds: float) -> float:
    """Per second, with three decimals when it is below 10 (Gemma on a CPU) and one above."""
    value = count / seconds
    return round(value, 3 if value < 10 else 1)


def noop_config(broker_url: str) -> dict:
    """worker.app's settings that JSON can carry (queues, routes and beat aside), pointed at the bench broker."""
    from worker.app import app

    skipped = {"task_queues", "task_routes", "beat_schedule", "include", "imports", "task_default_queue"}
    config = {}
    for key, value in app.conf.changes.items():
        if key in skipped:
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        config[key] = value
    return config | {"broker_url": broker_url, "result_backend": broker_url}


def run_noop(settings: Settings, count: int, concurrency: int, args, log_dir: Path, broker_pid: int | None) -> dict:
    """`count` no-op tasks sent from `--submit-threads` threads to a fresh no-op worker, until all are done."""
    import redis
    from celery import Celery
    from noop_worker import QUEUE, TASK

    redis.Redis.from_url(settings.celery_broker_url).flushall()
    config = noop_config(settings.celery_broker_url)
    argv = worker_argv(settings, concurrency=concurrency, pool=args.pool, queues=QUEUE, beat=False,
                       name=f"bench-noop-{os.getpid()}-{time.monotonic_ns()}@%h", loglevel="WARNING")
    argv[argv.index("worker.app")] = "noop_worker"
    bench_dir = str(Path(__file__).resolve().parent)
    env = workers.worker_env(settings, RECSYS_LOG_LEVEL="WARNING", BENCH_NOOP_CONF=json.dumps(config),
                             PYTHONPATH=os.pathsep.join(filter(None, [bench_dir, os.environ.get("PYTHONPATH")])))
    client = Celery("bench_noop_client")
    client.conf.update(config)
    log = open(log_dir / f"noop-{time.monotonic_ns()}.log", "ab")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for warm in [client.send_task(TASK, args=[-1 - i], queue=QUEUE) for i in range(concurrency)]:
            warm.get(timeout=300)
        load_before = load_average()
        cpu_before = cpu_snapshot(with_children(proc.pid), broker_pid)
        started = datetime.now(UTC)
        with ThreadPoolExecutor(args.submit_threads) as pool:
            sent = list(pool.map(lambda n: client.send_task(TASK, args=[n], queue=QUEUE), range(count)))
        submitted = datetime.now(UTC)
        succeeded, finished = 0, []
        for result in sent:
            try:
                result.get(timeout=args.timeout)
            except Exception:  # noqa: BLE001  (a lost or failed task is counted, not raised)
                continue
            succeeded += 1
            done = result.date_done
            if isinstance(done, str):
                done = datetime.fromisoformat(done)
            finished.append(done if done.tzinfo else done.replace(tzinfo=UTC))
        cpu_after = cpu_snapshot(with_children(proc.pid), broker_pid)
        load_after = load_average()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        client.close()
    span = (max(finished) - started).total_seconds() if finished else None
    return {
        "tasks": count,
        "succeeded": succeeded,
        "lost": count - succeeded,
        "submit_seconds": round((submitted - started).total_seconds(), 2),
        "end_to_end_seconds": round(span, 2) if span else None,
        "tasks_per_second": rate(succeeded, span) if span else None,
        "cpu_per_task": cpu_per_task(cpu_before, cpu_after, succeeded),
        "load_average_1m": [load_before[0], load_after[0]],
    }


def run_scenario(settings: Settings, requests: list[dict], worker_env: dict[str, str], args, log_dir: Path,
                 concurrency: int = 1, broker_pid: int | None = None) -> dict:
    clear_jobs(settings, keep_old=args.kept_jobs > 0)
    import redis

    redis.Redis.from_url(settings.celery_broker_url).flushall()
    worker = start_worker(settings, log_dir / f"worker-{len(list(log_dir.iterdir()))}.log", args.pool,
                          concurrency, **worker_env)
    try:
        worker.wait_ready()
        load_before = os.getloadavg()[0]
        with get_engine(settings).connect() as conn:
            since = conn.execute(text("SELECT now()")).scalar_one()
        cpu_before = cpu_snapshot(worker.pids(), broker_pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.submit_threads) as pool:
            outcomes = list(pool.map(lambda r: jobs.submit_recommendation(r, settings=settings), requests))
        submitted = time.perf_counter()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            open_jobs = jobs.count_jobs(settings, "queued") + jobs.count_jobs(settings, "running")
            if open_jobs == 0:
                break
            time.sleep(0.05)
        cpu_after = cpu_snapshot(worker.pids(), broker_pid)
        with get_engine(settings).connect() as conn:
            row = conn.execute(text(
                """
                SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                       extract(epoch FROM max(finished_at) - min(created_at)) AS span,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
                           AS p50,
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
                           AS p95,
                       avg((result->>'batch_size')::int) AS mean_batch
                FROM jobs WHERE created_at >= :since
                """
            ), {"since": since}).one()
            stages = conn.execute(text(
                "SELECT t.key, avg(t.value::float8) FROM jobs, jsonb_each_text(result->'timings_ms') AS t "
                "WHERE status = 'succeeded' AND created_at >= :since GROUP BY t.key ORDER BY t.key"
            ), {"since": since}).all()
        load_after = os.getloadavg()[0]
    finally:
        worker.stop()
    lost = len(requests) - row.succeeded
    return {
        "jobs": len(requests),
        "cached_at_submit": sum(o.cached for o in outcomes),
        "succeeded": row.succeeded,
        "lost": lost,
        "submit_seconds": round(submitted - started, 2),
        "submits_per_second": round(len(requests) / (submitted - started), 1),
        "end_to_end_seconds": round(float(row.span), 2) if row.span else None,
        "jobs_per_second": rate(row.succeeded, float(row.span)) if row.span else None,
        "p50_ms": round(float(row.p50) * 1000, 1) if row.p50 is not None else None,
        "p95_ms": round(float(row.p95) * 1000, 1) if row.p95 is not None else None,
        "mean_batch": round(float(row.mean_batch), 2) if row.mean_batch is not None else None,
        "pipeline_ms_per_job": {key: round(float(value), 2) for key, value in stages},
        "cpu_per_job": cpu_per_task(cpu_before, cpu_after, row.succeeded),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
    }


def run_first_jobs(settings: Settings, requests: list[dict], args, log_dir: Path) -> dict:
    """Each request alone, to a worker started for it: submit→succeeded of a fresh worker's first job."""
    import redis

    latencies = []
    for request in requests:
        clear_jobs(settings)
        redis.Redis.from_url(settings.celery_broker_url).flushall()
        worker = start_worker(settings, log_dir / f"worker-{len(list(log_dir.iterdir()))}.log", args.pool)
        try:
            worker.wait_ready()
            job_id = jobs.submit_recommendation(request, settings=settings).job_id
            deadline = time.monotonic() + args.timeout
            while jobs.get_job(job_id, settings)["status"] in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.01)
            with get_engine(settings).connect() as conn:
                row = conn.execute(text("SELECT status, extract(epoch FROM finished_at - created_at) AS seconds "
                                        "FROM jobs WHERE id = :id"), {"id": job_id}).one()
        finally:
            worker.stop()
        latencies.append(round(float(row.seconds) * 1000, 1) if row.status == "succeeded" else None)
    return {"jobs": len(requests), "submit_to_succeeded_ms": latencies,
            "median_ms": None if None in latencies else statistics.median(latencies)}


_LOG_ENTRY = re.compile(r"^\S+ \S+ \S+ \[\d+\] [A-Z]+:  ")  # the embedded server's prefix: '%m [%p] '
_USAGE = re.compile(r"!\s+([\d.]+) s user, ([\d.]+) s system")


def statement_cpu(log_text: str) -> dict[str, list]:
    """Postgres's `log_statement_stats` entries summed by statement: {statement: [CPU seconds, messages]}.

    Each entry is a LOG line (QUERY, or PARSE/BIND/EXECUTE MESSAGE STATISTICS), a DETAIL whose first usage line
    has the user and system CPU the message cost, then the STATEMENT it was for. Statements are told apart by
    their first 100 characters, whitespace collapsed."""
    spent: dict[str, list] = {}
    in_stats, usage, cpu, statement = False, None, None, None

    def close() -> None:
        if statement is not None:
            total = spent.setdefault(" ".join(" ".join(statement).split())[:100], [0.0, 0])
            total[0] += cpu
            total[1] += 1

    for line in log_text.splitlines():
        if _LOG_ENTRY.match(line):
            close()
            statement = None
            if " LOG:  " in line and line.rstrip().endswith("STATISTICS"):
                in_stats, usage = True, None
            elif " STATEMENT:  " in line and usage is not None:
                statement, cpu, usage = [line.split(" STATEMENT:  ", 1)[1]], usage, None
            continue
        if in_stats:
            found = _USAGE.search(line)
            if found:
                usage, in_stats = float(found.group(1)) + float(found.group(2)), False
        elif statement is not None:
            statement.append(line)
    close()
    return spent


def run_with_statement_stats(settings: Settings, requests: list[dict], batch: int, args, log_dir: Path,
                              broker_pid: int | None) -> dict:
    """One more one-process retrieval run with Postgres reporting each statement's CPU (`log_statement_stats`
    on the bench database), summed by statement from the embedded server's log: where Postgres's part of a
    job goes, the worker's start (its best sellers and co-purchase partners, read once) and the bench's own
    statements included. Its rate is not comparable with the rounds' (the logging costs Postgres CPU of its own)."""
    if not settings.uses_embedded_db:
        return {"skipped": "needs the embedded Postgres (the statistics are read from its log file)"}
    log_file = settings.pgdata / "log"
    if not log_file.is_file():
        return {"skipped": f"no server log at {log_file}"}

    def set_stats(value: str) -> None:
        with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"ALTER DATABASE {BENCH_DB} {value}"))
        dispose_engines()  # the setting reaches new sessions only

    set_stats("SET log_statement_stats = on")
    offset = log_file.stat().st_size
    try:
        run = run_scenario(settings, requests, {"RECSYS_BATCH_SIZE": str(batch)}, args, log_dir, broker_pid=broker_pid)
    finally:
        set_stats("RESET log_statement_stats")
    with open(log_file, "rb") as handle:
        handle.seek(offset)
        spent = statement_cpu(handle.read().decode(errors="replace"))
    total = sum(seconds for seconds, _ in spent.values())
    jobs_done = run["succeeded"] or 1
    top = sorted(spent.items(), key=lambda item: -item[1][0])[:12]
    return {
        "jobs": run["jobs"], "lost": run["lost"], "jobs_per_second": run["jobs_per_second"],
        "postgres_cpu_ms_per_job": round(total * 1000 / jobs_done, 3),
        "statements": [{"statement": statement, "messages": messages,
                        "cpu_ms_per_job": round(seconds * 1000 / jobs_done, 3),
                        "share": round(seconds / total, 3) if total else None}
                       for statement, (seconds, messages) in top],
    }


def median_cpu(costs) -> float | None:
    """The median of the rounds' machine CPU per task (None when a round could not read /proc/stat).

    Where both the no-op and the retrieval runs keep every core busy, their rates stand in the inverse ratio of
    their CPU per task; where a run leaves cores idle, its rate is bound by waiting, not by CPU."""
    costs = [cost and cost["machine_ms"] for cost in costs]
    return None if None in costs else round(statistics.median(costs), 2)


def median_of(rates) -> float | None:
    """The median of the rounds' rates (None when a round finished nothing)."""
    rates = list(rates)
    return None if None in rates else round(statistics.median(rates), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrieval-jobs", type=int, default=1000)
    parser.add_argument("--noop-tasks", type=int, default=None, help="default: as many as --retrieval-jobs")
    parser.add_argument("--retrieval-batch-size", type=int, default=None, help="default RECSYS_BATCH_SIZE")
    parser.add_argument("--llm-jobs", type=int, default=100)
    parser.add_argument("--llm-batch-sizes", default="1,8")
    parser.add_argument("--llm-ranker", default="llm-verbalizer", choices=LLM_RANKER_NAMES)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--submit-threads", type=int, default=4, help="like a web server's request threads")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one scenario")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo"])
    parser.add_argument("--concurrency", default="1,2", help="worker processes (prefork children), comma-separated")
    parser.add_argument("--kept-jobs", type=int, default=0,
                        help="finished jobs kept in the table from before (a deployment's history), inserted once")
    parser.add_argument("--first-jobs", type=int, default=0,
                        help="also time N fresh workers' first job, each alone (submit→succeeded)")
    parser.add_argument("--statement-stats", action="store_true",
                        help="after the rounds, one more one-process retrieval run with Postgres's CPU by statement")
    parser.add_argument("--rounds", type=int, default=1,
                        help="no-op then retrieval runs per worker size; rates are the rounds' medians")
    args = parser.parse_args()

    base = Settings.from_env()
    bench = loaded_database(base, BENCH_DB)
    home = Path(tempfile.mkdtemp(prefix="recsys-bench-jobs-"))
    broker = Settings(home=home, broker_port=free_port())
    broker_pid = embedded.start_broker(broker).pid
    settings = bench.with_(broker_port=broker.broker_port, broker_url=broker.celery_broker_url)
    sizes = [int(size) for size in args.concurrency.split(",")]
    report: dict = {
        "machine": machine(),
        "worker": f"celery {args.pool}, acks late, prefetch 1, processes {sizes}",
        "baseline": "bench/noop_worker.py: a task that does nothing, same broker and worker settings",
        "submit_threads": args.submit_threads,
        "kept_jobs": args.kept_jobs,
    }
    try:
        keep_old_jobs(settings, args.kept_jobs)
        batch = args.retrieval_batch_size or settings.batch_size
        requests = workload(settings, args.retrieval_jobs, "retrieval", 1)
        for size in sizes:
            rounds = []
            for _ in range(args.rounds):
                noop = run_noop(settings, args.noop_tasks or args.retrieval_jobs, size, args, home, broker_pid)
                retrieval = run_scenario(settings, requests, {"RECSYS_BATCH_SIZE": str(batch)}, args, home,
                                         concurrency=size, broker_pid=broker_pid) | {"batch_size": batch}
                rounds.append({"noop": noop, "retrieval": retrieval,
                               "retrieval_share_of_noop": ratio(retrieval["jobs_per_second"],
                                                                noop["tasks_per_second"])})
            noop_rate = median_of(r["noop"]["tasks_per_second"] for r in rounds)
            retrieval_rate = median_of(r["retrieval"]["jobs_per_second"] for r in rounds)
            noop_cpu = median_cpu(r["noop"]["cpu_per_task"] for r in rounds)
            retrieval_cpu = median_cpu(r["retrieval"]["cpu_per_job"] for r in rounds)
            report[f"processes_{size}"] = {
                "noop_tasks_per_second": noop_rate,
                "retrieval_jobs_per_second": retrieval_rate,
                "retrieval_share_of_noop": ratio(retrieval_rate, noop_rate),
                "goal_share_of_noop": 0.5,
                "machine_cpu_ms_per_noop_task": noop_cpu,
                "machine_cpu_ms_per_retrieval_job": retrieval_cpu,
                "noop_cpu_over_retrieval_cpu": ratio(noop_cpu, retrieval_cpu),
                "lost": sum(r["retrieval"]["lost"] + r["noop"]["lost"] for r in rounds),
                "rounds": rounds,
            }
        if len(sizes) > 1:
            first, last = report[f"processes_{sizes[0]}"], report[f"processes_{sizes[-1]}"]
            report[f"processes_{sizes[-1]}_vs_{sizes[0]}"] = {
                "retrieval": ratio(last["retrieval_jobs_per_second"], first["retrieval_jobs_per_second"], 2),
                "noop": ratio(last["noop_tasks_per_second"], first["noop_tasks_per_second"], 2),
            }
        if args.statement_stats:
            report["postgres_cpu_by_statement"] = run_with_statement_stats(settings, requests, batch, args, home,
                                                                           broker_pid)
        if args.first_jobs:
            report["first_job_of_a_fresh_worker"] = run_first_jobs(
                settings, workload(settings, args.first_jobs, "retrieval", 3), args, home)
        if not args.skip_llm:
            from recsys.llm.acquisition import prepare_model

            prepare_model(settings)
            llm_requests = workload(settings, args.llm_jobs, args.llm_ranker, 2)
            for size in [int(s) for s in args.llm_batch_sizes.split(",")]:
                report[f"{args.llm_ranker}_batch_{size}"] = run_scenario(
                    settings, llm_requests, {"RECSYS_BATCH_SIZE": str(size), "RECSYS_RANKER": args.llm_ranker},
                    args, home,
                ) | {"batch_size": size, "model": settings.llm_model}
    finally:
        clear_jobs(settings)
        dispose_engines()
        embedded.stop_broker(broker)
        shutil.rmtree(home, ignore_errors=True)
    report["machine"]["load_average_end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
