"""The API relay's cost a submission at a steady rate into one process, against sending on the request. Prints JSON.

    python bench/relay.py [--rate 250] [--seconds 8] [--rounds 2]

Each gunicorn worker of `recsys serve` takes its share of the submissions (4 processes on 2 cores: ~250/s each
at 1,000/s in all). This bench submits recommendations from one thread of this process at `--rate` per
second, paced, for `--seconds`, as `POST /recommendations` does (`wait_for_broker=False`: the job row commits
and the process's relay pushes the message), and alternately as the CLI does (`wait_for_broker=True`: the
message pushed on the submitting thread, its reply awaited). Reported for each, medians over `--rounds`:
submissions, LPUSHes and messages per push, the process's CPU per submission and, for the relay, its
thread's CPU per submission (`/proc/<pid>/task/<thread id>/stat`). It uses the API bench's database
(`recsys_bench_api`, loaded on first use) and its own Valkey on a free port; the jobs are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from api import CACHED, prepare_database, start_broker
from common import cpu_seconds, load_average, machine, ratio
from sqlalchemy import text

from recsys import jobs
from recsys.config import Settings
from recsys.jobs import relay
from recsys.platform import broker, embedded
from recsys.platform.db import dispose_engines, get_engine


class PushCounter:
    """Counts the LPUSHes of rerank messages and the messages they carry (wraps `broker._push`)."""

    def __init__(self):
        self.pushes = self.messages = 0
        self.wrapped = broker._push

    def __call__(self, messages, *args, **kwargs):
        self.pushes += 1
        self.messages += len(messages)
        return self.wrapped(messages, *args, **kwargs)


def submit_paced(settings: Settings, rate: float, seconds: float, through_relay: bool, run: str) -> int:
    """Submissions at `rate` per second for `seconds` (each waits for its slot); how many were made."""
    made, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        delay = started + made / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jobs.submit_recommendation({**CACHED, "query": f"relay bench {run} {made}"}, settings,
                                   wait_for_broker=not through_relay)
        made += 1
    return made


def measure(settings: Settings, args, through_relay: bool, counter: PushCounter) -> dict:
    run = uuid.uuid4().hex[:8]
    relay_thread = next(iter(relay._relays.values())).thread.native_id if through_relay else None
    counter.pushes = counter.messages = 0
    relay_before = cpu_seconds(os.getpid(), relay_thread) if relay_thread else 0.0
    process_before = time.process_time()
    load = load_average()
    made = submit_paced(settings, args.rate, args.seconds, through_relay, run)
    if through_relay:
        relay.flush()
    process_cpu = time.process_time() - process_before
    result = {
        "submissions": made, "pushes": counter.pushes,
        "messages_per_push": round(counter.messages / max(counter.pushes, 1), 2),
        "process_cpu_ms_per_submission": round(process_cpu * 1000 / made, 3),
        "load_average_at_start": load,
    }
    if relay_thread:
        result["relay_thread_cpu_ms_per_submission"] = round(
            (cpu_seconds(os.getpid(), relay_thread) - relay_before) * 1000 / made, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=250.0, help="submissions per second into this process")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured run")
    parser.add_argument("--rounds", type=int, default=2, help="relay and direct runs alternate, this many times")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="recsys-bench-relay-", dir="/tmp"))
    own_broker = start_broker(scratch)
    settings = prepare_database(Settings.from_env()).with_(broker_url=own_broker.celery_broker_url)
    counter = PushCounter()
    broker._push = counter
    runs: dict[str, list[dict]] = {"relay": [], "direct": []}
    started_machine = machine()
    try:
        # the first message declares the queue (through send_task) and starts the relay: not measured
        jobs.submit_recommendation({**CACHED, "query": "relay bench warm-up"}, settings, wait_for_broker=False)
        relay.flush()
        for round_number in range(args.rounds):
            order = [True, False] if round_number % 2 == 0 else [False, True]
            for through_relay in order:
                runs["relay" if through_relay else "direct"].append(measure(settings, args, through_relay, counter))
    finally:
        broker._push = counter.wrapped
        relay.flush()
        with get_engine(settings).begin() as conn:
            conn.execute(text("DELETE FROM jobs"))
            conn.execute(text("DELETE FROM result_cache"))
        dispose_engines()
        embedded.stop_broker(own_broker)
        shutil.rmtree(scratch, ignore_errors=True)

    def median(side: str, field: str):
        values = [run[field] for run in runs[side] if field in run]
        return round(statistics.median(values), 3) if values else None

    summary = {side: {field: median(side, field) for field in (
        "submissions", "pushes", "messages_per_push", "process_cpu_ms_per_submission",
        "relay_thread_cpu_ms_per_submission")} for side in runs}
    print(json.dumps({
        "machine": started_machine | {"load_average_end": load_average()},
        "rate_per_second": args.rate, "seconds": args.seconds, "rounds": args.rounds,
        "push_interval_seconds": relay.PUSH_INTERVAL_SECONDS,
        "summary": summary,
        "relay_process_cpu_share_of_direct": ratio(summary["relay"]["process_cpu_ms_per_submission"],
                                                   summary["direct"]["process_cpu_ms_per_submission"]),
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
