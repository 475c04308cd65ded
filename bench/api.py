"""HTTP API throughput and latency under gunicorn on loopback against a bare Flask ceiling, measured with wrk.

    python bench/api.py [--duration 10] [--rounds 2] [--connections 8] [--workers N] [--threads 4] [--skip-broker-down]
                        [--scenarios cached_job_get,cached_post,submit_post,health_get]

Scenarios: a GET of a finished job, a POST /recommendations answered from the result cache (200),
and submissions that miss the cache (each inserts a job and sends a Celery message: 202); health is
measured too. Each is run against recsys and against bench/baseline_app.py, a minimal Flask app under
the same gunicorn command line answering with the same JSON body, alternating over `--rounds`, so
the ratio holds on a shared, loaded machine. Before the rounds both servers get 2 s of cached POSTs and 2 s
of submissions, so no round pays a process's first answers. After each of recsys's submission rounds the
jobs it inserted are vacuumed (the seconds are in the round's JSON), so autovacuum does not run in the next
run. Goals (issue 16): cached read ≥ 50% of the baseline's req/s, cached POST ≥ 35%, submission ≥ 25%, each
p99 ≤ 3× the baseline's.
Last, `submit_post_broker_down`: the same submissions to a second recsys server whose broker is down (nothing
listens on its port), against the baseline's submission rate of the rounds: a submission commits its job
and answers while its message waits for the sweeper; the JSON counts the jobs left to it.
`--scenarios` runs only the named ones (the broker-down run needs `submit_post`): more rounds of one goal in
the same time, where the host's noise moves single rounds by a fifth or more.
It uses its own database (`recsys_bench_api`, loaded with the bundled file on first use) and its
own Valkey on a free port, so it never floods the shared broker; no worker runs, so submitted
jobs just queue and are deleted at the end. Prints JSON with the machine and load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

from common import (
    clear_jobs,
    cpu_seconds,
    cpu_spent,
    database_backends,
    free_port,
    load_average,
    loaded_database,
    machine,
    ratio,
    with_children,
)
from sqlalchemy import text

from recsys import jobs
from recsys.cli.web import DEFAULT_THREADS, default_workers, gunicorn_argv
from recsys.config import Settings
from recsys.platform import auth, embedded
from recsys.platform.db import dispose_engines, get_engine

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

BENCH_DB = "recsys_bench_api"
CACHED = {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"}
# Share of the baseline's req/s each scenario must reach (issue 16), each with p99 at most 3x the baseline's.
GOALS = {"cached_job_get": 0.50, "cached_post": 0.35, "submit_post": 0.25}

SCENARIOS = ("cached_job_get", "cached_post", "submit_post", "health_get")

SUBMIT_LUA = """
counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function request()
  counter = counter + 1
  local body = string.format(
    '{"customer_id": 15781, "query": "bench %s %d %d", "k": 3, "ranker": "retrieval"}', RUN, tid, counter)
  return wrk.format("POST", PATH, nil, body)
end
"""


def prepare_database(settings: Settings) -> Settings:
    bench = loaded_database(settings, BENCH_DB)
    clear_jobs(bench)
    return bench


def start_broker(home: Path) -> Settings:
    broker = Settings(home=home, broker_port=free_port())
    embedded.start_broker(broker)
    return broker


def vacuum_jobs(settings: Settings) -> float:
    """VACUUM ANALYZE of the jobs a submission round inserted, before the next round: left to autovacuum, it ran in
    whichever run came next (often the baseline's). Returns its seconds, reported with the round."""
    started = time.perf_counter()
    with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) jobs"))
    return round(time.perf_counter() - started, 3)


def submissions_with_broker_down(settings: Settings, env: dict, args, key: str) -> dict:
    """Submissions/s and latency of a recsys server whose broker is down, and how many of its jobs were left to the
    sweeper (sent_at cleared) once it stopped."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = settings.with_(broker_url=dead, web_port=free_port())
    server = start_server(gunicorn_argv(down, args.workers, args.threads), env | {"CELERY_BROKER_URL": dead})
    base = f"http://127.0.0.1:{down.web_port}"
    clear_jobs(settings)
    try:
        wait_for(f"{base}/api/v1/openapi.json")
        url = f"{base}/api/v1/recommendations"
        result = run_wrk(url, key, args, script=SUBMIT_LUA, server_pid=server.pid,
                         extra_lua=f'RUN = "{uuid.uuid4().hex[:8]}"\nPATH = "{urlparse(url).path}"\n')
    finally:
        stop_server(server)
    with get_engine(settings).connect() as conn:
        counts = conn.execute(text("SELECT count(*), count(*) FILTER (WHERE sent_at IS NULL) FROM jobs "
                                   "WHERE status = 'queued'")).one()
    result["jobs_created"], result["jobs_left_to_sweeper"] = counts
    return result


def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse_wrk(output: str) -> dict:
    """Requests/s, latency percentiles (ms) and error counts from `wrk --latency` output."""
    result = {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        result[f"p{pct}_ms"] = round(_ms(*match.groups()), 2) if match else None
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    result["requests"] = int(total.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["socket_errors"] = sum(int(g) for g in errors.groups()) if errors else 0
    return result


def cpu_snapshot(server_pid: int, backends: bool = True) -> dict:
    """CPU seconds so far of the gunicorn processes, the bench database's backends and finished children (wrk)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "app": {pid: cpu_seconds(pid) for pid in with_children(server_pid)},
        "postgres": {pid: cpu_seconds(pid) for pid in database_backends(BENCH_DB)} if backends else {},
        "load_tool": children.ru_utime + children.ru_stime,
    }


def cpu_per_request(before: dict, after: dict, requests: int) -> dict:
    """Milliseconds of CPU per request spent in the app, in Postgres and in wrk."""
    per = {part: cpu_spent(before[part], after[part]) for part in ("app", "postgres")}
    per["load_tool"] = after["load_tool"] - before["load_tool"]
    return {f"{part}_ms": round(seconds * 1000 / max(requests, 1), 3) for part, seconds in per.items()}


def run_wrk(url: str, key: str, args, script: str | None = None, body: dict | None = None,
            extra_lua: str = "", server_pid: int | None = None, backends: bool = True) -> dict:
    lua = f'wrk.headers["Authorization"] = "Bearer {key}"\nwrk.headers["Content-Type"] = "application/json"\n'
    if body is not None:
        lua += f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
    lua += extra_lua + (script or "")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(lua)
    before = cpu_snapshot(server_pid, backends) if server_pid else None
    load = load_average()
    try:
        output = subprocess.run(
            ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{args.duration}s",
             "--latency", "-s", handle.name, url],
            check=True, capture_output=True, text=True, timeout=args.duration + 60,
        ).stdout
    finally:
        os.unlink(handle.name)
    result = parse_wrk(output)
    result["load_average_at_start"] = load
    if before is not None:
        result["cpu_per_request"] = cpu_per_request(before, cpu_snapshot(server_pid, backends), result["requests"])
    return result


def fetch(url: str, key: str, body: dict | None = None) -> dict:
    """One real request: its status and JSON body, for the baseline to answer with."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
        return {"status": response.status, "body": json.loads(raw), "bytes": len(raw)}


def start_server(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def summarize(system: list[dict], baseline: list[dict], goal_share: float | None) -> dict:
    """Medians over the rounds and the two ratios each goal is stated in."""
    def med(runs, field):
        values = [run[field] for run in runs if run.get(field) is not None]
        return round(statistics.median(values), 2) if values else None

    summary = {
        "requests_per_second": med(system, "requests_per_second"),
        "p99_ms": med(system, "p99_ms"),
        "baseline_requests_per_second": med(baseline, "requests_per_second"),
        "baseline_p99_ms": med(baseline, "p99_ms"),
    }
    summary["share_of_baseline"] = ratio(summary["requests_per_second"], summary["baseline_requests_per_second"])
    summary["p99_times_baseline"] = ratio(summary["p99_ms"], summary["baseline_p99_ms"], 2)
    if goal_share is not None:
        summary["goal"] = {"share_of_baseline": goal_share, "p99_times_baseline": 3.0}
        summary["met"] = bool(summary["share_of_baseline"] and summary["share_of_baseline"] >= goal_share
                              and summary["p99_times_baseline"] is not None and summary["p99_times_baseline"] <= 3.0)
    summary["rounds"] = {"system": system, "baseline": baseline}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario and server")
    parser.add_argument("--rounds", type=int, default=2, help="baseline and system alternate, this many times")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None,
                        help="gunicorn worker processes (default: what `recsys serve` uses)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="threads per gunicorn worker")
    parser.add_argument("--skip-broker-down", action="store_true", help="leave out submissions with the broker down")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated scenarios to run (default: all)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        parser.error(f"unknown scenarios {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}" if unknown
                     else "name at least one scenario")
    if shutil.which("wrk") is None:
        sys.exit("bench/api.py needs wrk (apt-get install wrk)")

    scratch = Path(tempfile.mkdtemp(prefix="recsys-bench-api-", dir="/tmp"))
    broker = start_broker(scratch)
    settings = prepare_database(Settings.from_env())
    settings = settings.with_(broker_url=broker.celery_broker_url, web_port=free_port())
    key_name = f"bench-{uuid.uuid4().hex[:8]}"
    key = auth.create_api_key(key_name, settings)
    first = jobs.submit_recommendation(CACHED, settings=settings)
    jobs.run_job(first.job_id, worker=jobs.worker_identity(), settings=settings)
    assert jobs.submit_recommendation(CACHED, settings=settings).cached

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DATABASE_URL", "CELERY_"))}
    env.update(embedded.service_env(settings))
    env.update(RECSYS_HOME=str(settings.home), RECSYS_LOG_LEVEL="WARNING")
    argv = gunicorn_argv(settings, args.workers, args.threads)
    baseline_port = free_port()
    baseline_argv = [*argv[:-1], "baseline_app:create_app()"]
    baseline_argv[baseline_argv.index("--config") + 1] = "python:baseline_gunicorn"
    baseline_argv[baseline_argv.index("--bind") + 1] = f"127.0.0.1:{baseline_port}"
    bodies_path = scratch / "baseline_bodies.json"
    baseline_env = env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                                       env.get("PYTHONPATH")])),
                          "BENCH_BASELINE_BODIES": str(bodies_path)}
    server = start_server(argv, env)
    baseline_server = None
    base = f"http://127.0.0.1:{settings.web_port}"
    ceiling = f"http://127.0.0.1:{baseline_port}/baseline"
    started_machine = machine()
    runs: dict[str, dict[str, list]] = {}
    responses: dict = {}
    try:
        wait_for(f"{base}/api/v1/health")
        responses = {
            "cached_post": fetch(f"{base}/api/v1/recommendations", key, CACHED),
            "cached_job_get": fetch(f"{base}/api/v1/jobs/{first.job_id}", key),
            "submit_post": fetch(f"{base}/api/v1/recommendations", key,
                                 {**CACHED, "query": f"bench body {uuid.uuid4().hex[:8]}"}),
        }
        bodies_path.write_text(json.dumps(responses))
        baseline_server = start_server(baseline_argv, baseline_env)
        wait_for(f"{ceiling}/cached_job_get")
        # Both servers warmed the same way before any round counts: each process's and thread's first cached answer
        # and first submission (its broker connection and message template, the queue declared once) are paid here.
        warm = argparse.Namespace(**{**vars(args), "duration": 2})
        run_wrk(f"{base}/api/v1/recommendations", key, warm, body=CACHED)
        run_wrk(f"{ceiling}/cached_post", key, warm, body=CACHED)
        for url in (f"{base}/api/v1/recommendations", f"{ceiling}/submit_post"):
            run_wrk(url, key, warm, script=SUBMIT_LUA,
                    extra_lua=f'RUN = "warm{uuid.uuid4().hex[:8]}"\nPATH = "{urlparse(url).path}"\n')
        scenarios = {
            "cached_job_get": (dict(url=f"{base}/api/v1/jobs/{first.job_id}"),
                               dict(url=f"{ceiling}/cached_job_get/{first.job_id}")),
            "cached_post": (dict(url=f"{base}/api/v1/recommendations", body=CACHED),
                            dict(url=f"{ceiling}/cached_post", body=CACHED)),
            "submit_post": (dict(url=f"{base}/api/v1/recommendations", script=SUBMIT_LUA),
                            dict(url=f"{ceiling}/submit_post", script=SUBMIT_LUA)),
            "health_get": (dict(url=f"{base}/api/v1/health"), None),
        }
        scenarios = {name: calls for name, calls in scenarios.items() if name in chosen}
        for round_number in range(args.rounds):
            for name, (system_call, baseline_call) in scenarios.items():
                entry = runs.setdefault(name, {"system": [], "baseline": []})
                order = [("system", system_call), ("baseline", baseline_call)]
                for side, call in order if round_number % 2 == 0 else order[::-1]:
                    if call is None:
                        continue
                    call = dict(call)
                    url = call.pop("url")
                    if call.get("script"):
                        # the script builds each request, so it must name the path (the baseline's differs)
                        call["extra_lua"] = f'RUN = "{uuid.uuid4().hex[:8]}"\nPATH = "{urlparse(url).path}"\n'
                    pid = server.pid if side == "system" else baseline_server.pid
                    entry[side].append(run_wrk(url, key, args, server_pid=pid, backends=side == "system", **call))
                    if side == "system" and name == "submit_post":
                        entry[side][-1]["vacuum_seconds_after"] = vacuum_jobs(settings)
        with get_engine(settings).connect() as conn:
            jobs_created = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'queued'")).scalar_one()
        broker_down = (None if args.skip_broker_down or "submit_post" not in scenarios
                       else submissions_with_broker_down(settings, env, args, key))
    finally:
        load_after = load_average()
        stop_server(server)
        if baseline_server is not None:
            stop_server(baseline_server)
        auth.revoke_api_key(key_name, settings)
        with get_engine(settings).begin() as conn:
            conn.execute(text("DELETE FROM jobs"))
            conn.execute(text("DELETE FROM result_cache"))
            conn.execute(text("DELETE FROM api_keys WHERE name = :name"), {"name": key_name})
        dispose_engines()
        embedded.stop_broker(broker)
        shutil.rmtree(scratch, ignore_errors=True)

    results = {name: summarize(entry["system"], entry["baseline"], GOALS.get(name)) for name, entry in runs.items()}
    if "submit_post" in results:
        results["submit_post"]["jobs_created"] = jobs_created
    if broker_down is not None:
        baseline = results["submit_post"]["baseline_requests_per_second"]
        results["submit_post_broker_down"] = {
            "requests_per_second": broker_down["requests_per_second"], "p99_ms": broker_down["p99_ms"],
            "baseline_requests_per_second": baseline,
            "share_of_baseline": ratio(broker_down["requests_per_second"], baseline), "run": broker_down}
    for name, response in responses.items():
        if name not in results:
            continue
        results[name]["body_bytes"] = response["bytes"]
        results[name]["status"] = response["status"]
    print(json.dumps({
        "machine": started_machine | {"load_average_end": load_after},
        "server": {"gunicorn_workers": args.workers or default_workers(), "threads": args.threads,
                   "worker_class": "gthread"},
        "baseline": "bench/baseline_app.py: minimal Flask app, same gunicorn command line, same JSON bodies",
        "load": {"tool": "wrk", "threads": args.wrk_threads, "connections": args.connections,
                 "seconds_per_scenario": args.duration, "rounds": args.rounds, "scenarios": chosen},
        "scenarios": results,
    }, indent=2))


if __name__ == "__main__":
    main()
