"""Run every ranker on the same cases and collect metrics, latencies and per-case ranks.

The cases of a task are sampled and retrieved once; each ranker then ranks them in batches
(`batch_size` requests per `Ranker.rank` call, as a worker would), timed per batch.
LLM generation is slow on a CPU, so a ranker may be capped to the first N cases of each
task (`limits`); the cases are interleaved by stratum, so a prefix is still balanced, and
each ranker is compared with retrieval on exactly the cases it ranked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pandas as pd

from recsys.config import Settings
from recsys.evaluation.cases import TASK_TITLES, TASKS, Case, attach_candidates, sample_cases
from recsys.evaluation.metrics import case_metrics, mean_metrics, paired_difference, percentile
from recsys.evaluation.split import PurchaseLog, TemporalSplit, load_purchase_log
from recsys.rankers import RANKER_NAMES, Ranker, RankRequest, get_ranker, is_llm_ranker
from recsys.recommend.ordering import final_order

log = logging.getLogger(__name__)

DEFAULT_CUTOFF = "2011-11-01"
DEFAULT_CASES = 300
DEFAULT_SEED = 42
# Cases per task for the slow LLM rankers (see README "Evaluation" for the timings behind them).
DEFAULT_LIMITS = {"llm-verbalizer": 100, "llm-likelihood": 30, "llm-pointwise": 30, "llm-listwise": 20}
SEGMENTS = ("all", "reachable", "repeat", "new")
BASELINE = "retrieval"


class EvaluationError(ValueError):
    """Parameters that cannot give an evaluation (the message is one line for the user)."""


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


ProgressFactory = Callable[[str, int], object]


def no_progress(description: str, total: int) -> _NoProgress:
    return _NoProgress()


@dataclass
class EvalParams:
    """What one evaluation run asks; defaults are the README's run."""

    cutoff: str = DEFAULT_CUTOFF
    until: str | None = None
    tasks: tuple[str, ...] = TASKS
    rankers: tuple[str, ...] = RANKER_NAMES
    cases: int = DEFAULT_CASES
    seed: int = DEFAULT_SEED
    max_candidates: int | None = None
    limits: dict[str, int | None] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    batch_size: int | None = None
    exclude_purchased: bool = False

    def validate(self) -> None:
        for name, value in (("cutoff", self.cutoff), ("until", self.until)):
            if value is not None:
                try:
                    pd.Timestamp(value)
                except ValueError as exc:
                    raise EvaluationError(f"{name} must be a date like 2011-11-01, got {value!r}") from exc
        if self.until is not None and pd.Timestamp(self.until) <= pd.Timestamp(self.cutoff):
            raise EvaluationError(f"until ({self.until}) must be after the cutoff ({self.cutoff})")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise EvaluationError(f"tasks must be among {', '.join(TASKS)}, got {', '.join(self.tasks) or 'none'}")
        unknown = [r for r in self.rankers if r not in RANKER_NAMES]
        if unknown or not self.rankers:
            raise EvaluationError(
                f"rankers must be among {', '.join(RANKER_NAMES)}, got {', '.join(self.rankers) or 'none'}"
            )
        for name, value in (("cases", self.cases), ("max_candidates", self.max_candidates),
                            ("batch_size", self.batch_size)):
            if value is not None and value < 1:
                raise EvaluationError(f"{name} must be at least 1, got {value}")
        for ranker, limit in self.limits.items():
            if ranker not in RANKER_NAMES:
                raise EvaluationError(f"limit for unknown ranker {ranker!r}")
            if limit is not None and limit < 1:
                raise EvaluationError(f"the limit for {ranker} must be at least 1, got {limit}")

    def limit_for(self, ranker: str) -> int:
        limit = self.limits.get(ranker)
        return self.cases if limit is None else min(limit, self.cases)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["tasks"], data["rankers"] = list(self.tasks), list(self.rankers)
        data["limits"] = {r: self.limit_for(r) for r in self.rankers if self.limit_for(r) < self.cases}
        return data


def full_order(order: Sequence[str], candidates: Sequence) -> list[str]:
    """The ranker's order cut to the candidates, the missing ones appended (as the pipeline's last stage)."""
    shown = [c.stock_code for c in candidates]
    return final_order(order, shown, shown)


def _segment_answers(case: Case) -> dict[str, tuple[str, ...]]:
    """The answers each segment scores against; a segment is absent when the case has none."""
    segments = {"all": case.answers}
    if case.reachable:
        segments["reachable"] = case.answers
    repeats = tuple(a for a in case.answers if a in case.repeats)
    new = tuple(a for a in case.answers if a not in case.repeats)
    if repeats:
        segments["repeat"] = repeats
    if new:
        segments["new"] = new
    return segments


def _build_ranker(name: str, settings: Settings, split: TemporalSplit, model) -> Ranker:
    return get_ranker(name, settings=settings, stats=split.stats, model=model if is_llm_ranker(name) else None)


def _rank_cases(
    ranker: Ranker, cases: Sequence[Case], batch_size: int, progress
) -> tuple[list[list[str]], list[float], list[dict]]:
    """(full order, ms per request, flags) for each case, ranked in batches."""
    orders, latencies, flags = [], [], []
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        requests = [
            RankRequest(candidates=c.candidates, history=c.history, query=c.query, customer_id=c.customer_id)
            for c in batch
        ]
        started = time.perf_counter()
        results = ranker.rank(requests)
        per_request = (time.perf_counter() - started) * 1000 / len(batch)
        for case, result in zip(batch, results, strict=True):
            orders.append(full_order(result.order, case.candidates))
            latencies.append(per_request)
            flags.append({"fallback": bool(result.fallback), "repaired": bool(result.repaired)})
        progress.update(len(batch))
    return orders, latencies, flags


def _summarize(cases: Sequence[Case], orders: Sequence[Sequence[str]]) -> tuple[dict, list[dict]]:
    """Segment means and the per-case metric rows (against all answers)."""
    by_segment: dict[str, list[dict]] = {segment: [] for segment in SEGMENTS}
    rows = []
    for case, order in zip(cases, orders, strict=True):
        for segment, answers in _segment_answers(case).items():
            row = case_metrics(order, answers)
            by_segment[segment].append(row)
            if segment == "all":
                rows.append(row)
    return {segment: mean_metrics(values) for segment, values in by_segment.items()}, rows


def run_evaluation(
    params: EvalParams | None,
    settings: Settings,
    *,
    purchase_log: PurchaseLog | None = None,
    model=None,
    progress: ProgressFactory = no_progress,
) -> dict:
    """Sample the cases, rank them with every ranker, and return the results (see `report`)."""
    params = params or EvalParams()
    params.validate()
    max_candidates = params.max_candidates or settings.max_candidates
    rank_settings = settings.with_(max_candidates=max_candidates)
    batch_size = params.batch_size or settings.batch_size
    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    purchase_log = purchase_log or load_purchase_log(settings)
    split = TemporalSplit(purchase_log, params.cutoff, params.until)
    if split.train.empty or split.test.empty:
        raise EvaluationError(
            f"no purchases on one side of the cutoff {params.cutoff} (data runs from "
            f"{purchase_log.purchases['invoiced_at'].min()} to {purchase_log.purchases['invoiced_at'].max()})"
        )

    llm_names = [name for name in params.rankers if is_llm_ranker(name)]
    model_load_s = None
    if llm_names and model is None:
        from recsys.llm.loading import load_model

        t0 = time.perf_counter()
        model = load_model(settings)
        model_load_s = round(time.perf_counter() - t0, 2)
    rankers = {name: _build_ranker(name, rank_settings, split, model) for name in params.rankers}

    tasks: dict[str, dict] = {}
    per_case: list[dict] = []
    for task in params.tasks:
        cases = sample_cases(split, task, params.cases, params.seed)
        if not cases:
            raise EvaluationError(f"no {task!r} cases: no customer bought both before and after {params.cutoff}")
        bar = progress(f"{task}: retrieve", len(cases))
        retrieve_ms = attach_candidates(
            cases, split, settings, max_candidates=max_candidates,
            exclude_purchased=params.exclude_purchased, progress=bar.update,
        )
        bar.close()
        records = {case.number: case.as_dict() | {"ranks": {}} for case in cases}
        task_result = {
            "title": TASK_TITLES[task],
            "cases": len(cases),
            "strata": {s: sum(1 for c in cases if c.stratum == s) for s in ("light", "medium", "heavy")},
            "answers_per_case": sum(len(c.answers) for c in cases) / len(cases),
            "repeat_cases": sum(1 for c in cases if c.repeats),
            "new_cases": sum(1 for c in cases if set(c.answers) - c.repeats),
            "reachable": sum(c.reachable for c in cases) / len(cases),
            "retrieved": sum(any(a in c.retrieved for a in c.answers) for c in cases) / len(cases),
            "retrieve_ms": {"p50": percentile(retrieve_ms, 50), "p95": percentile(retrieve_ms, 95)},
            "rankers": {},
        }
        rows_by_ranker: dict[str, list[dict]] = {}
        for name in params.rankers:
            subset = cases[: params.limit_for(name)]
            ranker = rankers[name]
            bar = progress(f"{task}: {name}", len(subset))
            t0 = time.perf_counter()
            orders, latencies, flags = _rank_cases(ranker, subset, batch_size, bar)
            wall = time.perf_counter() - t0
            bar.close()
            segments, rows = _summarize(subset, orders)
            rows_by_ranker[name] = rows
            for case, order, row in zip(subset, orders, rows, strict=True):
                records[case.number]["ranks"][name] = {
                    "answer_ranks": [order.index(a) + 1 for a in case.answers if a in order],
                    "ndcg@10": round(row["ndcg@10"], 4),
                }
            task_result["rankers"][name] = {
                "cases": len(subset),
                "segments": segments,
                "latency_ms": {
                    "p50": percentile(latencies, 50),
                    "p95": percentile(latencies, 95),
                    "mean": sum(latencies) / len(latencies),
                },
                "wall_s": round(wall, 2),
                "fallback_rate": sum(f["fallback"] for f in flags) / len(flags),
                "repaired_rate": sum(f["repaired"] for f in flags) / len(flags),
            }
            log.info("%s %s: ndcg@10 %.3f over %d cases in %.1f s", task, name,
                     segments["all"].get("ndcg@10", 0.0), len(subset), wall)
        if BASELINE in rows_by_ranker:
            base = [row["ndcg@10"] for row in rows_by_ranker[BASELINE]]
            for name, rows in rows_by_ranker.items():
                if name != BASELINE:
                    diff = paired_difference([row["ndcg@10"] for row in rows], base[: len(rows)])
                    task_result["rankers"][name]["vs_retrieval_ndcg@10"] = diff
        tasks[task] = task_result
        per_case += list(records.values())

    from recsys.llm.prompts import PROMPT_VERSION

    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params.as_dict()
        | {
            "max_candidates": max_candidates,
            "batch_size": batch_size,
            "retrieve_k": settings.retrieve_k,
            "ef_search": settings.ef_search,
            "embedding_model": settings.embedding_model,
            "llm_model": getattr(model, "name", settings.llm_model) if llm_names else None,
            "prompt_version": PROMPT_VERSION if llm_names else None,
            "verbalizer_permutations": settings.verbalizer_permutations,
        },
        "data": split.summary(),
        "tasks": tasks,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_start": [round(x, 2) for x in load_start] if load_start else None,
            "load_average_end": [round(x, 2) for x in os.getloadavg()] if load_start else None,
            "model_load_s": model_load_s,
            "device": str(getattr(model, "device", "")) or None,
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "per_case": per_case,
    }
