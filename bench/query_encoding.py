"""A worker's query passes in bf16: autocast on the float32 model against what the worker runs. Prints JSON.

    python bench/query_encoding.py [--passes 40] [--pass-size 32] [--rounds 5]

A worker encodes each batch's queries in two passes of half a batch (32 of a batch of 64) under bf16
autocast (`RECSYS_QUERY_DTYPE=auto` on a CPU with native bf16). Autocast casts every Linear weight to bf16
on each pass; `recsys.catalog.embedding` hands it a twin of the model whose Linear weights are cast once
(`twin`), and runs a pass that fits in one batch without `encode`'s per-call bookkeeping (`query_pass`, what
the worker runs). Baseline: sentence-transformers' `encode` of the same passes under autocast, on the float32
model, in the same process, alternating with the other two round by round. All must give the same bits
(checked here on every pass); reported: ms per query for each (median of the rounds) and the ratios. Queries: the
last two words of product descriptions (the jobs bench's style), from the packaged catalog sample
(data/online_retail.csv.gz) read with pandas, so no database is needed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np
import pandas as pd
from common import load_average, machine, ratio

from recsys.catalog import embedding
from recsys.config import Settings


def queries(path: str, count: int, seed: int) -> list[str]:
    descriptions = pd.read_csv(path, usecols=["Description"], dtype=str)["Description"].dropna().unique()
    distinct = sorted({" ".join(d.split()[-2:]) for d in descriptions if len(d.split()) >= 2})
    random.Random(seed).shuffle(distinct)
    return distinct[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--pass-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", default="data/online_retail.csv.gz")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as a worker process runs (worker.app)
    settings = Settings.from_env()
    model = embedding.load_model(settings.embedding_model)
    texts = queries(args.path, args.passes * args.pass_size, seed=1)
    passes = [texts[i:i + args.pass_size] for i in range(0, len(texts), args.pass_size)]

    def autocast_pass(batch: list[str]) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vectors = model.encode(batch, batch_size=settings.embedding_batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def twin_pass(batch: list[str]) -> np.ndarray:
        return embedding.encode(batch, settings, bfloat16=True)

    def query_pass(batch: list[str]) -> np.ndarray:
        return embedding._encode_query_pass(model, batch, settings, True)

    def timed(run) -> tuple[float, list[np.ndarray]]:
        started = time.perf_counter()
        vectors = [run(batch) for batch in passes]
        return (time.perf_counter() - started) * 1000 / len(texts), vectors

    twin_pass(passes[0])  # make the twin and warm both paths
    autocast_pass(passes[0])
    query_pass(passes[0])
    load_before = load_average()
    baseline_ms, twin_ms, system_ms, identical = [], [], [], True
    for _ in range(args.rounds):
        ms, expected = timed(autocast_pass)
        baseline_ms.append(ms)
        ms, found = timed(twin_pass)
        twin_ms.append(ms)
        identical &= all(np.array_equal(a, b) for a, b in zip(expected, found, strict=True))
        ms, found = timed(query_pass)
        system_ms.append(ms)
        identical &= all(np.array_equal(a, b) for a, b in zip(expected, found, strict=True))
    baseline, twin, system = (statistics.median(v) for v in (baseline_ms, twin_ms, system_ms))
    print(json.dumps({
        "machine": machine() | {"load_average_before": load_before, "load_average_end": load_average()},
        "queries": len(texts),
        "pass_size": args.pass_size,
        "autocast_ms_per_query": round(baseline, 3),
        "twin_ms_per_query": round(twin, 3),
        "query_pass_ms_per_query": round(system, 3),
        "twin_time_share_of_autocast": ratio(twin, baseline),
        "query_pass_time_share_of_autocast": ratio(system, baseline),
        "query_pass_time_share_of_twin": ratio(system, twin),
        "rounds_ms_per_query": {"autocast": [round(v, 3) for v in baseline_ms],
                                "twin": [round(v, 3) for v in twin_ms],
                                "query_pass": [round(v, 3) for v in system_ms]},
        "bit_identical": identical,
    }, indent=2))


if __name__ == "__main__":
    main()
