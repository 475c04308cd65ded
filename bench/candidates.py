"""Cost of the candidate stage: four merged sources vs vector search alone, same batches, same process. Prints JSON.

    RECSYS_HOME=... python bench/candidates.py [--batches 12] [--batch-size 32]

Against the database the settings point at (the bundled data loaded). Each batch is 32 random
customers with purchases, every other batch with query text. For each batch, interleaved:
`candidates_batch` (what the pipeline calls now; co-purchase partners of every product read once
before, as a running worker has them) and the stage it replaced, `history_vectors` + `search_many`
(vector search by the query or the mean embedding of the recent purchases). Both get the recent
histories the pipeline reads before them. Reports the median ms per request of each and the load
average, because the cores are shared.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import machine
from sqlalchemy import text

from recsys.catalog.embedding import encode_queries
from recsys.catalog.history import HISTORY_ITEMS, history_vectors, recent_histories
from recsys.catalog.retrieval import search_many
from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.recommend.candidates import CandidateRequest, candidates_batch, copurchase_neighbours

QUERIES = ("BAG CHARM", "LUNCH BAG", "T-LIGHT HOLDER", "MUG", "LANTERN", "CHRISTMAS DECORATION", "CAKE STAND",
           "NAPKINS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    settings = Settings.from_env()
    with get_engine(settings).connect() as conn:
        customers = list(conn.execute(text("SELECT customer_id FROM customers WHERE purchase_count > 0")).scalars())
        codes = list(conn.execute(text("SELECT stock_code FROM products")).scalars())
    t0 = time.perf_counter()
    copurchase_neighbours(settings, codes)
    warm_s = time.perf_counter() - t0
    vectors = dict(zip(QUERIES, encode_queries(list(QUERIES), settings), strict=True))
    rng = np.random.default_rng(7)
    merged, vector_only = [], []
    size = args.batch_size
    for number in range(args.batches + 2):
        chosen = [int(c) for c in rng.choice(customers, size, replace=False)]
        queries = [QUERIES[i % len(QUERIES)] if number % 2 else None for i in range(size)]
        recent = {c: [h.stock_code for h in found]
                  for c, found in recent_histories(chosen, HISTORY_ITEMS, settings).items()}
        t0 = time.perf_counter()
        candidates_batch([CandidateRequest(c, vectors[q] if q else None, False, q) for c, q in zip(chosen, queries,
                                                                                                   strict=True)],
                         settings, limit=max(settings.max_candidates, 10), recent=recent)
        new = (time.perf_counter() - t0) * 1000 / size
        t0 = time.perf_counter()
        means = history_vectors([c for c, q in zip(chosen, queries, strict=True) if not q], HISTORY_ITEMS, settings)
        search_many([vectors[q] if q else means[c] for c, q in zip(chosen, queries, strict=True)
                     if q or c in means], max(settings.max_candidates, 10), settings)
        old = (time.perf_counter() - t0) * 1000 / size
        if number >= 2:  # the first two warm caches and plans
            merged.append(new)
            vector_only.append(old)
    print(json.dumps({
        "machine": machine(),
        "batches": args.batches,
        "batch_size": size,
        "partners_read_s": round(warm_s, 2),
        "candidates_ms_per_request": round(float(np.median(merged)), 2),
        "vector_search_ms_per_request": round(float(np.median(vector_only)), 2),
        "ratio": round(float(np.median(merged)) / float(np.median(vector_only)), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
