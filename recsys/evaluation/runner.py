"""Run every ranker through the production pipeline on the same cases; collect metrics, latencies, ranks.

The rankers see the shop as it was at the cutoff: a snapshot database holding only the purchases
before it (`snapshot.snapshot_settings`, built through the real ingest) with the settings pointed
at it, and every case goes through `recommend_batch` — the function the worker calls — in batches
of `batch_size`. The candidate stage is also run alone once per task (`candidates_batch`, as the
pipeline calls it) to report candidate recall per source. LLM generation is slow on a CPU, so a
ranker may be capped to the first N cases of each task (`limits`); the cases are interleaved by
stratum, so a prefix is still balanced, and each ranker is compared with the baselines on exactly
the cases it ranked. A learned ranker is trained for the evaluation with the evaluation's cutoff
(so it learned nothing after it) into its own model folder.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pandas as pd

from recsys.config import OFFLINE_BATCH_SIZE, Settings
from recsys.evaluation.cases import TASK_TITLES, TASKS, Case, sample_cases
from recsys.evaluation.metrics import case_metrics, mean_metrics, paired_difference, percentile
from recsys.evaluation.snapshot import SnapshotError, snapshot_settings
from recsys.evaluation.split import PurchaseLog, TemporalSplit, load_purchase_log
from recsys.rankers import RANKER_NAMES, is_learned_ranker, is_llm_ranker
from recsys.rankers.base import CANDIDATE_SOURCES

log = logging.getLogger(__name__)

DEFAULT_CUTOFF = "2011-11-01"
DEFAULT_CASES = 500
DEFAULT_SEED = 42
# Cases per task for the slow LLM rankers (see README "Evaluation" for the timings behind them).
DEFAULT_LIMITS = {"llm-verbalizer": 100, "llm-likelihood": 30, "llm-pointwise": 30, "llm-listwise": 20,
                  "learned-llm": 100}
SEGMENTS = ("all", "reachable", "repeat", "new")
BASELINE = "retrieval"
BASELINES = ("retrieval", "popularity", "copurchase")
ITEMS = 10  # products asked of the pipeline per case (the metrics stop at 10)
RECALL_AT = (20, 100)


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


def _requests(cases: Sequence[Case], ranker: str, exclude_purchased: bool):
    from recsys.recommend.request import RecommendationRequest

    return [
        RecommendationRequest(customer_id=c.customer_id, query=c.query, k=ITEMS, ranker=ranker,
                              exclude_purchased=exclude_purchased)
        for c in cases
    ]


def _rank_cases(
    name: str, cases: Sequence[Case], settings: Settings, batch_size: int, exclude_purchased: bool, progress
) -> tuple[list[list[str]], list[float], list[float], list[dict]]:
    """(order, ranking ms, pipeline ms, flags) per case, through `recommend_batch` in batches."""
    from recsys.recommend.pipeline import recommend_batch

    orders, rank_ms, total_ms, flags = [], [], [], []
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        for result in recommend_batch(_requests(batch, name, exclude_purchased), settings):
            orders.append([item["stock_code"] for item in result["items"]])
            rank_ms.append(result["timings_ms"].get("rank_ms", 0.0))
            total_ms.append(result["timings_ms"].get("total_ms", 0.0))
            flags.append({"fallback": bool(result["flags"]["fallback"]), "repaired": bool(result["flags"]["repaired"])})
        progress.update(len(batch))
    return orders, rank_ms, total_ms, flags


def attach_candidates(
    cases: Sequence[Case], settings: Settings, batch_size: int, exclude_purchased: bool, progress
) -> list[dict[str, list[str]]]:
    """Run the candidate stage alone, as the pipeline does, for every case: the merged candidates
    (`RECSYS_RETRIEVE_K`, stored on the case) and each source's list, best first."""
    from recsys.catalog.embedding import encode_queries
    from recsys.catalog.history import HISTORY_ITEMS, recent_histories
    from recsys.recommend.candidates import CandidateRequest, candidates_batch

    queries = sorted({c.query for c in cases if c.query})
    vectors = dict(zip(queries, encode_queries(queries, settings), strict=True)) if queries else {}
    per_source = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        histories = recent_histories(sorted({c.customer_id for c in batch}), HISTORY_ITEMS, settings)
        found = candidates_batch(
            [CandidateRequest(c.customer_id, vectors.get(c.query), exclude_purchased, c.query) for c in batch],
            settings,
            recent={customer: [h.stock_code for h in bought] for customer, bought in histories.items()},
        )
        for case, result in zip(batch, found, strict=True):
            case.candidates = tuple(c.stock_code for c in result.candidates)
            case.window = settings.max_candidates
            lists = {source: [] for source in CANDIDATE_SOURCES}
            for candidate in result.candidates:
                for source in candidate.sources:
                    lists[source].append(candidate)
            per_source.append({source: [c.stock_code for c in sorted(found_by, key=lambda c, s=source: c.sources[s])]
                               for source, found_by in lists.items()})
        progress.update(len(batch))
    return per_source


def candidate_recall(cases: Sequence[Case], per_source: Sequence[dict[str, list[str]]]) -> dict:
    """Share of cases with an answer among the first 20 / 100 candidates, merged and per source."""
    lists = [{"merged": list(case.candidates), **sources} for case, sources in zip(cases, per_source, strict=True)]
    recall = {}
    for name in ("merged", *CANDIDATE_SOURCES):
        row = {}
        for at in RECALL_AT:
            hits = [any(a in set(entry[name][:at]) for a in case.answers) for case, entry in zip(cases, lists,
                                                                                                strict=True)]
            row[f"@{at}"] = sum(hits) / len(hits) if hits else 0.0
        row["mean_found"] = sum(len(entry[name]) for entry in lists) / len(lists) if lists else 0.0
        recall[name] = row
    return recall


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


def learned_models(
    settings: Settings, cutoff: datetime, variants: Sequence[str], progress: ProgressFactory
) -> tuple[Settings, dict]:
    """Settings whose model folder holds learned models trained with the evaluation's cutoff (trained
    now unless a model trained with that cutoff on the same data is there), and their metadata."""
    from recsys.rankers.learned import ModelFileError, model_path, read_model
    from recsys.rankers.training import train_ranker

    folder = settings.models_dir / f"eval-before-{cutoff:%Y%m%d}"
    trained = settings.with_(model_cache=folder)
    metadata = {}
    for variant in variants:
        try:
            existing = read_model(model_path(trained, variant), variant).metadata
        except ModelFileError:
            existing = None
        if existing is None or str(existing.get("cutoff", ""))[:19] != cutoff.isoformat(sep=" ")[:19]:
            log.info("training %s with cutoff %s into %s", variant, cutoff, folder)
            train_ranker(settings.with_(model_cache=folder), variant=variant, cutoff=cutoff, progress=progress,
                         batch_size=settings.batch_size)
        model = read_model(model_path(trained, variant), variant)
        metadata[variant] = model.metadata | {"importances": model.importances()}
    return trained, metadata


def run_evaluation(
    params: EvalParams | None = None,
    settings: Settings | None = None,
    *,
    purchase_log: PurchaseLog | None = None,
    progress: ProgressFactory = no_progress,
) -> dict:
    """Sample the cases, rank them with every ranker through the pipeline, and return the results (see `report`)."""
    from recsys.config import get_settings

    params = params or EvalParams()
    params.validate()
    settings = settings or get_settings()
    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    purchase_log = purchase_log or load_purchase_log(settings)
    split = TemporalSplit(purchase_log, params.cutoff, params.until)
    if split.train.empty or split.test.empty:
        raise EvaluationError(
            f"no purchases on one side of the cutoff {params.cutoff} (data runs from "
            f"{purchase_log.purchases['invoiced_at'].min()} to {purchase_log.purchases['invoiced_at'].max()})"
        )
    cutoff = split.cutoff.to_pydatetime()
    t0 = time.perf_counter()
    try:
        snapshot = snapshot_settings(settings, cutoff, progress=lambda message: log.info("snapshot: %s", message))
    except SnapshotError as exc:
        raise EvaluationError(str(exc)) from exc
    snapshot_s = round(time.perf_counter() - t0, 1)
    max_candidates = params.max_candidates or settings.max_candidates
    batch_size = params.batch_size or OFFLINE_BATCH_SIZE
    snapshot = snapshot.with_(max_candidates=max_candidates, batch_size=batch_size)
    ranker_settings = {name: snapshot for name in params.rankers}
    learned = [name for name in params.rankers if is_learned_ranker(name)]
    learned_metadata: dict = {}
    if learned:
        trained, learned_metadata = learned_models(settings.with_(batch_size=batch_size), cutoff, learned, progress)
        ranker_settings |= {name: snapshot.with_(model_cache=trained.model_cache) for name in learned}

    tasks: dict[str, dict] = {}
    per_case: list[dict] = []
    for task in params.tasks:
        cases = sample_cases(split, task, params.cases, params.seed)
        if not cases:
            raise EvaluationError(f"no {task!r} cases: no customer bought both before and after {params.cutoff}")
        bar = progress(f"{task}: candidates", len(cases))
        t0 = time.perf_counter()
        per_source = attach_candidates(cases, snapshot, batch_size, params.exclude_purchased, bar)
        candidate_ms = (time.perf_counter() - t0) * 1000 / len(cases)
        bar.close()
        records = {case.number: case.as_dict() | {"ranks": {}} for case in cases}
        task_result = {
            "title": TASK_TITLES[task],
            "cases": len(cases),
            "strata": {s: sum(1 for c in cases if c.stratum == s) for s in ("light", "medium", "heavy")},
            "answers_per_case": sum(len(c.answers) for c in cases) / len(cases),
            "repeat_cases": sum(1 for c in cases if c.repeats),
            "new_cases": sum(1 for c in cases if set(c.answers) - c.repeats),
            "repeat_answers": sum(len(c.repeats) for c in cases) / max(sum(len(c.answers) for c in cases), 1),
            "reachable": sum(c.reachable for c in cases) / len(cases),
            "retrieved": sum(any(a in c.candidates for a in c.answers) for c in cases) / len(cases),
            "candidate_recall": candidate_recall(cases, per_source),
            "candidate_ms": candidate_ms,
            "rankers": {},
        }
        rows_by_ranker: dict[str, list[dict]] = {}
        for name in params.rankers:
            subset = cases[: params.limit_for(name)]
            bar = progress(f"{task}: {name}", len(subset))
            t0 = time.perf_counter()
            orders, rank_ms, total_ms, flags = _rank_cases(
                name, subset, ranker_settings[name], batch_size, params.exclude_purchased, bar)
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
                    "p50": percentile(rank_ms, 50),
                    "p95": percentile(rank_ms, 95),
                    "mean": sum(rank_ms) / len(rank_ms),
                },
                "pipeline_ms": {"p50": percentile(total_ms, 50), "p95": percentile(total_ms, 95)},
                "wall_s": round(wall, 2),
                "fallback_rate": sum(f["fallback"] for f in flags) / len(flags),
                "repaired_rate": sum(f["repaired"] for f in flags) / len(flags),
            }
            log.info("%s %s: ndcg@10 %.3f over %d cases in %.1f s", task, name,
                     segments["all"].get("ndcg@10", 0.0), len(subset), wall)
        for name, rows in rows_by_ranker.items():
            versus = {}
            for baseline in BASELINES:
                if baseline in rows_by_ranker and baseline != name:
                    base = [row["ndcg@10"] for row in rows_by_ranker[baseline]]
                    n = min(len(rows), len(base))
                    versus[baseline] = paired_difference([row["ndcg@10"] for row in rows[:n]], base[:n])
            task_result["rankers"][name]["vs_ndcg@10"] = versus
            task_result["rankers"][name]["vs_retrieval_ndcg@10"] = versus.get(BASELINE)
        tasks[task] = task_result
        per_case += list(records.values())

    from recsys.llm.prompts import PROMPT_VERSION

    llm_names = [name for name in params.rankers if is_llm_ranker(name) or name == "learned-llm"]
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params.as_dict()
        | {
            "max_candidates": max_candidates,
            "batch_size": batch_size,
            "retrieve_k": settings.retrieve_k,
            "ef_search": settings.ef_search,
            "candidates": {source: getattr(settings, f"{source}_candidates") for source in CANDIDATE_SOURCES}
            | {"query_pool": settings.query_pool},
            "embedding_model": settings.embedding_model,
            "llm_model": settings.llm_model if llm_names else None,
            "prompt_version": PROMPT_VERSION if llm_names else None,
            "verbalizer_permutations": settings.verbalizer_permutations,
        },
        "data": split.summary() | {"snapshot": snapshot.db_name if not snapshot.database_url else "external",
                                   "snapshot_s": snapshot_s},
        "learned": {
            variant: {key: meta.get(key) for key in ("cutoff", "inner_cutoff", "importances", "metrics", "counts")}
            for variant, meta in learned_metadata.items()
        },
        "tasks": tasks,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "load_average_start": [round(x, 2) for x in load_start] if load_start else None,
            "load_average_end": [round(x, 2) for x in os.getloadavg()] if load_start else None,
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "per_case": per_case,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        return None
