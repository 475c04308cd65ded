"""Ranker latency and throughput: ms per request and requests/s at several batch sizes. Prints JSON.

    python bench/rankers.py [--rankers llm-verbalizer,llm-likelihood,...] [--batch-sizes 1,8,32]
                            [--repeats 1] [--candidates 20] [--device auto] [--dtype auto]
                            [--model packaged:gemma-3-270m | --random-arch gemma-2b-it]
                            [--explain] [--threads N] [--out FILE]

Requests are built from the Online Retail purchases (no database needed): a customer's ten
most recent distinct products as history, the type words of a product they bought later as
the query ("BAG CHARM"), and as candidates catalog products whose description contains those
words, topped up with random products, `--candidates` in all, with descending made-up
retrieval scores. Every batch holds distinct requests.

Rankers: any of recsys.rankers.RANKER_NAMES, plus `notebook-baseline`: the source notebook's
way of running, one `generate` call per request at batch 1 on the few-shot listwise prompt,
forced to produce as many tokens as a real reranked list of the candidates takes (counted
with the tokenizer), so that random weights cost what a real answer would. It is measured on
`--baseline-requests` requests and reported under batch size 1 only.

Models: `--model` (default: the configured one, normally the packaged Gemma 3 270M, prepared
in the model cache on first use) or `--random-arch gemma-2b-it`: random weights in
google/gemma-2b-it's architecture (hidden 2048, 18 layers, 8 heads, 1 KV head, head dim 256,
MLP 16384, vocabulary 256000), built from a config, with the packaged Gemma 3 tokenizer
(whose ids for ordinary text are all below 256000). That mode is for timing a GPU without
downloading gemma-2b; its rankings are noise and generation runs to its token budget.

`learned` and `learned-llm` rank what the production pipeline hands them: requests built from
the database under RECSYS_HOME (its customers, both tasks: no query, and the type words of a
product the customer bought) through `recommend_batch`, every merged candidate (up to
RECSYS_RETRIEVE_K, `--candidates` does not apply), with the trained model in the model cache
(`recsys train ranker`). The LLM is loaded only when a ranker needs it.

Each ranker is warmed up once before timing (first calls pay one-off kernel set-up).
Progress goes to stderr, JSON to stdout. The CPU may be shared: the JSON records load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny-model builders live with the tests (tests/support), not in the shipped library.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pandas as pd
import torch
from support.synthetic import gemma_2b_config, packaged_tokenizer, random_model

from recsys.config import Settings
from recsys.llm.device import resolve_device, resolve_dtype
from recsys.llm.inference import encode_prompt, generate_greedy
from recsys.llm.loading import LoadedModel, load_model
from recsys.llm.prompts import LISTWISE_ANSWER_PREFIX, listwise_prompt
from recsys.rankers import (
    RANKER_NAMES,
    Candidate,
    HistoryItem,
    RankRequest,
    get_ranker,
    is_learned_ranker,
    is_llm_ranker,
)
from recsys.rankers.llm_common import LLMRanker

BASELINE = "notebook-baseline"
DEFAULT_RANKERS = ["llm-verbalizer", "llm-likelihood", "llm-pointwise", "llm-listwise", BASELINE]
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "online_retail.csv.gz"
HISTORY_ITEMS = 10
NON_PRODUCT_CODES = {"POST", "D", "M", "DOT", "BANK CHARGES", "C2", "CRUK", "PADS", "AMAZONFEE", "S", "B"}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CatalogSampler:
    """Builds realistic ranking requests from the purchases file."""

    def __init__(self, path: Path, seed: int) -> None:
        frame = pd.read_csv(
            path,
            usecols=["InvoiceNo", "StockCode", "Description", "InvoiceDate", "CustomerID"],
            dtype={"InvoiceNo": str, "StockCode": str, "Description": str},
        )
        frame = frame.dropna()
        frame = frame[~frame["InvoiceNo"].str.startswith("C") & ~frame["StockCode"].isin(NON_PRODUCT_CODES)]
        frame = frame.sort_values("InvoiceDate")
        self.catalog = (
            frame.groupby("StockCode")["Description"].agg(lambda s: s.value_counts().index[0]).to_dict()
        )
        self.codes = sorted(self.catalog)
        self.purchases = {
            int(customer): list(dict.fromkeys(reversed(group["StockCode"].tolist())))
            for customer, group in frame.groupby("CustomerID")
            if group["StockCode"].nunique() > HISTORY_ITEMS + 1
        }
        self.customers = sorted(self.purchases)
        self.rng = random.Random(seed)

    def request(self, candidates: int, explain: bool) -> RankRequest:
        customer = self.rng.choice(self.customers)
        recent_first = self.purchases[customer]
        target = recent_first[0]
        history = [HistoryItem(code, self.catalog[code]) for code in recent_first[1 : HISTORY_ITEMS + 1]]
        query = " ".join(self.catalog[target].split()[-2:])
        matches = [code for code in self.codes if query in self.catalog[code]]
        self.rng.shuffle(matches)
        picked = list(dict.fromkeys([target, *matches]))[:candidates]
        while len(picked) < candidates:
            code = self.rng.choice(self.codes)
            if code not in picked:
                picked.append(code)
        self.rng.shuffle(picked)
        return RankRequest(
            candidates=[
                Candidate(code, self.catalog[code], round(0.95 - 0.01 * rank, 4)) for rank, code in enumerate(picked)
            ],
            history=history,
            query=query,
            customer_id=customer,
            explain=explain,
        )


class DatabaseSampler:
    """Rank requests exactly as the pipeline builds them for a learned ranker, from the database."""

    def __init__(self, settings: Settings, seed: int, pool: int = 256) -> None:
        from sqlalchemy import text

        from recsys.evaluation.queries import type_query
        from recsys.platform.db import get_engine
        from recsys.rankers.training import CaptureRanker
        from recsys.recommend.pipeline import recommend_batch
        from recsys.recommend.request import MAX_K, RecommendationRequest

        with get_engine(settings).connect() as conn:
            rows = conn.execute(text(
                "SELECT DISTINCT ON (pu.customer_id) pu.customer_id, p.description FROM purchases pu "
                "JOIN products p USING (stock_code) WHERE NOT p.is_non_product "
                "ORDER BY pu.customer_id, pu.invoiced_at DESC")).all()
        rng = random.Random(seed)
        picked = rng.sample(rows, min(pool // 2, len(rows)))
        requests = [RecommendationRequest(customer_id=r.customer_id, k=MAX_K, ranker="learned") for r in picked]
        requests += [RecommendationRequest(customer_id=r.customer_id, query=type_query(r.description), k=MAX_K,
                                           ranker="learned") for r in picked if type_query(r.description)]
        capture = CaptureRanker()
        for start in range(0, len(requests), 32):
            recommend_batch(requests[start:start + 32], settings, ranker=capture)
        self.requests = capture.requests
        rng.shuffle(self.requests)
        self.position = 0

    def request(self, candidates: int, explain: bool) -> RankRequest:
        request = self.requests[self.position % len(self.requests)]
        self.position += 1
        return RankRequest(candidates=request.candidates, history=request.history, query=request.query,
                           customer_id=request.customer_id, explain=explain)


def build_model(args, settings: Settings) -> LoadedModel:
    if args.random_arch:
        if args.random_arch != "gemma-2b-it":
            raise SystemExit(f"unknown --random-arch {args.random_arch!r}; known: gemma-2b-it")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        tokenizer = packaged_tokenizer(settings.models_dir / "gemma-3-270m-tokenizer")
        return random_model(gemma_2b_config(), tokenizer, name="random:gemma-2b-it", device=device, dtype=dtype)
    return load_model(settings, model_name=args.model, device=args.device, dtype=args.dtype)


def synchronize(model: LoadedModel | None) -> None:
    if model is not None and model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


class NotebookBaseline:
    """One generate call per request, as the notebook does, at a real answer's length."""

    name = BASELINE

    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        self.helper = LLMRanker(model, settings)
        self.model = model

    def answer_tokens(self, prepared) -> int:
        ranked = "\n".join(f"{i}. {name}" for i, name in enumerate(reversed(prepared.case.candidates), 1))
        return len(self.model.tokenizer(ranked, add_special_tokens=False)["input_ids"])

    def rank(self, requests):
        tokens = []
        for request in requests:
            prepared = self.helper.prepare(request)
            prompt = encode_prompt(
                self.model, listwise_prompt(prepared.case, explain=False), LISTWISE_ANSWER_PREFIX, chat=True
            )
            length = self.answer_tokens(prepared)
            generate_greedy(self.model, [prompt], max_new_tokens=length, min_new_tokens=length)
            tokens.append(length)
        return [{"forced_tokens": n} for n in tokens]


def summarize(results) -> dict:
    """Diagnostics that say whether the timings came from sensible work."""
    if results and isinstance(results[0], dict):
        return {"forced_tokens_mean": round(statistics.mean(r["forced_tokens"] for r in results), 1)}
    summary = {
        "fallbacks": sum(r.fallback for r in results),
        "repaired": sum(r.repaired for r in results),
    }
    for key in ("prompt_tokens", "generated_tokens", "parse_failures", "label_mass"):
        values = [r.info[key] for r in results if r.info.get(key) is not None]
        if values:
            summary[f"{key}_mean"] = round(statistics.mean(values), 4)
    return summary


def time_ranker(ranker, model: LoadedModel, sampler: CatalogSampler, batch_size: int, args) -> dict:
    timings, cpu = [], []
    diagnostics = {}
    for _ in range(args.repeats):
        batch = [sampler.request(args.candidates, args.explain) for _ in range(batch_size)]
        synchronize(model)
        started, cpu_started = time.perf_counter(), time.process_time()
        results = ranker.rank(batch)
        synchronize(model)
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        diagnostics = summarize(results)
    seconds = statistics.median(timings)
    return {
        "ms_per_request": round(seconds * 1000 / batch_size, 1),
        # this process's CPU time only (a database's share is not in it): what a shared machine's load
        # does not inflate
        "cpu_ms_per_request": round(statistics.median(cpu) * 1000 / batch_size, 2),
        "requests_per_s": round(batch_size / seconds, 2),
        "batch_seconds": [round(t, 3) for t in timings],
        **diagnostics,
    }


def cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rankers", default=",".join(DEFAULT_RANKERS))
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--baseline-requests", type=int, default=2)
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: RECSYS_DEVICE)")
    parser.add_argument("--dtype", default=None, help="auto, bf16, fp16, fp32 (default: RECSYS_DTYPE)")
    parser.add_argument("--model", default=None, help="default: RECSYS_LLM_MODEL")
    parser.add_argument("--random-arch", default=None, help="gemma-2b-it: random weights, no download")
    parser.add_argument("--explain", action="store_true", help="ask llm-listwise for reasons")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    rankers = [name.strip() for name in args.rankers.split(",") if name.strip()]
    unknown = [name for name in rankers if name not in RANKER_NAMES and name != BASELINE]
    if unknown:
        parser.error(f"unknown rankers {unknown}; choose from {', '.join([*RANKER_NAMES, BASELINE])}")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings.from_env()
    settings = settings.with_(
        device=args.device or settings.device,
        dtype=args.dtype or settings.dtype,
        max_candidates=max(settings.max_candidates, args.candidates),
    )
    args.device, args.dtype = settings.device, settings.dtype
    progress(f"reading {args.data}")
    sampler = CatalogSampler(args.data, args.seed)
    database_sampler = None
    if any(is_learned_ranker(name) for name in rankers):
        progress("building learned-ranker requests through the pipeline (database under RECSYS_HOME)")
        database_sampler = DatabaseSampler(settings, args.seed)
    model, load_seconds = None, 0.0
    if any(is_llm_ranker(name) or name in (BASELINE, "learned-llm") for name in rankers):
        progress("loading model")
        started = time.perf_counter()
        model = build_model(args, settings)
        load_seconds = time.perf_counter() - started

    report = {
        "model": model.name if model else None,
        "device": str(model.device) if model else "cpu",
        "dtype": str(model.dtype).replace("torch.", "") if model else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "gpu": torch.cuda.get_device_name(model.device) if model and model.device.type == "cuda" else None,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "model_load_seconds": round(load_seconds, 2),
        "candidates": args.candidates,
        "explain": args.explain,
        "repeats": args.repeats,
        "results": {},
    }
    for name in rankers:
        if name == BASELINE:
            ranker = NotebookBaseline(model, settings)
            sizes = [1]
        elif name in ("popularity", "copurchase"):
            progress(f"skipping {name}: it needs item statistics from the database")
            continue
        else:
            ranker = get_ranker(name, settings=settings, model=model)
            sizes = batch_sizes
        source = database_sampler if is_learned_ranker(name) else sampler
        progress(f"{name}: warm-up")
        ranker.rank([source.request(args.candidates, args.explain)])
        report["results"][name] = {}
        for size in sizes:
            progress(f"{name}: batch {size}")
            if name == BASELINE:
                measured = time_ranker(ranker, model, sampler, args.baseline_requests, args)
                measured["requests_per_call"] = 1
            else:
                measured = time_ranker(ranker, model, source, size, args)
            report["results"][name][f"batch_{size}"] = measured
            progress(f"  {json.dumps(measured)}")
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
