"""The candidate statement's rows sent as text against sent in binary, same statements, same connection. Prints JSON.

    RECSYS_HOME=... RECSYS_DB_NAME=... python bench/candidate_rows.py [--batches 6] [--batch-size 64] [--rounds 10]

Against the database the settings point at (the bundled data loaded, embedded). The pipeline runs
`--batches` batches of the jobs bench's requests (customers with purchases, two product-type words as
query text); the parameters of each half batch's candidate statement are kept. Then, on one connection
and transaction, each statement runs alternately as SQLAlchemy's `conn.execute(...).all()` (rows as text,
as the pipeline read them before) and as `recsys.platform.db.fetch_binary` (what it runs now), `--rounds`
times. Reported: median wall ms and this process's CPU ms per statement for each, whether the rows are the
same values of the same types, and the load average, because the cores are shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import load_average, machine, ratio
from jobs import workload
from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.recommend import candidates, pipeline
from recsys.recommend.request import RecommendationRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    settings = Settings.from_env()
    requests = workload(settings, args.batches * args.batch_size, "retrieval", seed=1)

    statements = []
    binary = candidates.fetch_binary

    def kept(conn, statement, params):
        statements.append(params)
        return binary(conn, statement, params)

    candidates.fetch_binary = kept
    try:
        for start in range(0, len(requests), args.batch_size):
            batch = [RecommendationRequest.from_dict(r) for r in requests[start:start + args.batch_size]]
            pipeline.recommend_batch(batch, settings)
    finally:
        candidates.fetch_binary = binary

    timings = {"text": ([], []), "binary": ([], [])}
    same = True
    load_before = load_average()
    with get_engine(settings).begin() as conn:
        conn.execute(text("SELECT set_config('hnsw.ef_search', :ef, true), "
                          "set_config('hnsw.iterative_scan', 'relaxed_order', true)"), {"ef": str(settings.ef_search)})
        for round_ in range(args.rounds):
            order = ("text", "binary") if round_ % 2 == 0 else ("binary", "text")
            for params in statements:
                rows = {}
                for way in order:
                    wall, cpu = time.perf_counter(), time.process_time()
                    if way == "text":
                        rows[way] = [tuple(row) for row in conn.execute(candidates._CANDIDATES, params).all()]
                    else:
                        rows[way] = binary(conn, candidates._CANDIDATES, params)
                    timings[way][0].append((time.perf_counter() - wall) * 1000)
                    timings[way][1].append((time.process_time() - cpu) * 1000)
                same &= rows["text"] == rows["binary"] and all(
                    list(map(type, a)) == list(map(type, b)) for a, b in zip(rows["text"], rows["binary"], strict=True))
    medians = {way: (statistics.median(wall), statistics.median(cpu)) for way, (wall, cpu) in timings.items()}
    print(json.dumps({
        "machine": machine() | {"load_average_before": load_before, "load_average_end": load_average()},
        "statements": len(statements),
        "requests_per_statement": args.batch_size // 2,
        "rounds": args.rounds,
        "text_ms": round(medians["text"][0], 2),
        "binary_ms": round(medians["binary"][0], 2),
        "binary_time_share_of_text": ratio(medians["binary"][0], medians["text"][0]),
        "text_client_cpu_ms": round(medians["text"][1], 2),
        "binary_client_cpu_ms": round(medians["binary"][1], 2),
        "same_rows": same,
    }, indent=2))


if __name__ == "__main__":
    main()
