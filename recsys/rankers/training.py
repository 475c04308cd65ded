"""Training the learned rankers: examples from the past, through the production candidate stage.

For a cutoff C (default: just after the newest purchase) and an inner cutoff C' = C − horizon:
- the *features* come from a snapshot database holding only the purchases before C' (the same
  snapshot builder the evaluation uses), read through the real pipeline (`recommend_batch`, the
  worker's code) and the same feature reader the ranker uses when serving;
- the *labels* are what each customer bought in [C', C) (read from the full database);
- both tasks: `next` (no query; every product bought in the window is an answer) and `query`
  (the type words of a product bought in the window; that product is the answer).
Nothing on or after C is read, so a model trained with `--cutoff` the evaluation's cutoff never
saw the evaluation's answers. Customers are split 80/20 into training and validation groups; the
validation groups stop the boosting early and give the reported metrics.
"""

from __future__ import annotations

import logging
import platform
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import text

from recsys.config import OFFLINE_BATCH_SIZE, Settings
from recsys.platform.db import get_engine
from recsys.rankers.base import RankRequest, RankResult
from recsys.rankers.features import BatchFeatures, feature_names, read_features
from recsys.rankers.learned import LLM_SCORER, VARIANTS, llm_scorer, model_path, window_scores, write_model

log = logging.getLogger(__name__)

DEFAULT_HORIZON_DAYS = 28
MIN_CUSTOMERS = 10
MIN_GROUPS = 20
QUERIES_PER_CUSTOMER = 2
VALIDATION_SHARE = 0.2
MAX_ROUNDS = 400
EARLY_STOPPING_ROUNDS = 40
DEFAULT_LLM_REQUESTS = 150  # per task: the LLM scores 20 candidates per request, seconds each on a CPU
# Chosen on the 2011-11-01 split (validation NDCG@10 within 0.005 of 31 leaves at rate 0.05, with a
# third of the trees: 104 instead of 335, so ranking costs a third).
LGBM_PARAMS = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    "learning_rate": 0.1,
    "num_leaves": 15,
    "min_data_in_leaf": 100,
    "lambda_l2": 1.0,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambdarank_truncation_level": 30,
    "num_threads": 2,
    "verbose": -1,
}


class TrainingError(ValueError):
    """Training cannot run as asked (too little data, bad dates); the message is one line for the user."""


ProgressFactory = Callable[[str, int], object]


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(description: str, total: int) -> _NoProgress:
    return _NoProgress()


SnapshotBuilder = Callable[[Settings, datetime], Settings]


@dataclass
class Example:
    """One training question: a customer, an optional query, and the products that answer it."""

    task: str
    customer_id: int
    query: str | None
    answers: tuple[str, ...]


@dataclass
class TrainingData:
    examples: list[Example]
    requests: list[RankRequest]
    features: BatchFeatures
    validation: list[bool] = field(default_factory=list)


def _timestamp(value: datetime | str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value)) if not isinstance(value, datetime) else value
    except ValueError as exc:
        raise TrainingError(f"cutoff must be a date like 2011-11-01, got {value!r}") from exc
    return parsed.replace(tzinfo=None)


def training_period(
    settings: Settings, cutoff: datetime | str | None, horizon_days: int = DEFAULT_HORIZON_DAYS
) -> tuple[datetime, datetime]:
    """(cutoff, inner cutoff). Without a cutoff: everything, i.e. just after the newest purchase."""
    if horizon_days < 1:
        raise TrainingError(f"the label window must be at least one day, got {horizon_days}")
    asked = _timestamp(cutoff) if cutoff is not None else None
    with get_engine(settings).connect() as conn:
        newest = conn.execute(text("SELECT max(last_purchase_at) FROM customers")).scalar_one()
    if newest is None:
        raise TrainingError("the database holds no purchases: ingest data first (recsys ingest PATH)")
    end = asked if asked is not None else newest + timedelta(seconds=1)
    return end, end - timedelta(days=horizon_days)


def training_labels(settings: Settings, inner: datetime, cutoff: datetime) -> tuple[dict[int, list[str]], dict]:
    """Per customer who bought a recommendable product before `inner`: the recommendable products
    they bought in [inner, cutoff), first bought first; and the counts behind them."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                """
                WITH known AS (
                    SELECT DISTINCT pu.customer_id FROM purchases pu
                    JOIN products pr ON pr.stock_code = pu.stock_code
                    WHERE pu.invoiced_at < :inner AND NOT pr.is_non_product AND pr.embedding IS NOT NULL
                )
                SELECT pu.customer_id, pu.stock_code, min(pu.invoiced_at) AS first_at
                FROM purchases pu
                JOIN known USING (customer_id)
                JOIN products pr ON pr.stock_code = pu.stock_code
                WHERE pu.invoiced_at >= :inner AND pu.invoiced_at < :cutoff AND NOT pr.is_non_product
                GROUP BY pu.customer_id, pu.stock_code
                ORDER BY pu.customer_id, first_at, pu.stock_code
                """
            ),
            {"inner": inner, "cutoff": cutoff},
        ).all()
        counts = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE invoiced_at < :inner) AS before_inner, "
                "count(*) FILTER (WHERE invoiced_at >= :inner AND invoiced_at < :cutoff) AS in_window "
                "FROM purchases"
            ),
            {"inner": inner, "cutoff": cutoff},
        ).one()
    labels: dict[int, list[str]] = {}
    for row in rows:
        labels.setdefault(int(row.customer_id), []).append(row.stock_code)
    return labels, {"purchases_before_inner_cutoff": counts.before_inner, "purchases_in_label_window": counts.in_window,
                    "label_customers": len(labels)}


def make_examples(
    labels: dict[int, list[str]], descriptions: dict[str, str], seed: int,
    queries_per_customer: int = QUERIES_PER_CUSTOMER,
) -> list[Example]:
    """One `next` example per customer and up to `queries_per_customer` `query` examples (seeded)."""
    from recsys.evaluation.queries import type_query

    rng = np.random.default_rng(seed)
    examples = []
    for customer in sorted(labels):
        codes = labels[customer]
        examples.append(Example("next", customer, None, tuple(codes)))
        options = [code for code in codes if type_query(descriptions.get(code))]
        if not options:
            continue
        picked = rng.choice(len(options), size=min(queries_per_customer, len(options)), replace=False)
        seen_queries = set()
        for index in sorted(int(i) for i in picked):
            query = type_query(descriptions[options[index]])
            if query in seen_queries:
                continue
            seen_queries.add(query)
            examples.append(Example("query", customer, query, (options[index],)))
    return examples


class CaptureRanker:
    """Records the pipeline's rank requests (every candidate) and answers in the given order."""

    name = "capture"
    uses_llm = False
    ranks_all_candidates = True

    def __init__(self) -> None:
        self.requests: list[RankRequest] = []

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        self.requests += list(requests)
        return [RankResult(order=[c.stock_code for c in r.candidates], scores={}) for r in requests]


def collect_requests(
    examples: Sequence[Example], settings: Settings, batch_size: int, progress: ProgressFactory = no_progress
) -> list[RankRequest]:
    """Each example's rank request as the worker's pipeline builds it (history, merged candidates)."""
    from recsys.recommend.pipeline import recommend_batch
    from recsys.recommend.request import MAX_K, RecommendationRequest

    capture = CaptureRanker()
    bar = progress("candidates", len(examples))
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        requests = [RecommendationRequest(customer_id=e.customer_id, query=e.query, k=MAX_K, ranker="learned")
                    for e in batch]
        recommend_batch(requests, settings, ranker=capture)
        bar.update(len(batch))
    bar.close()
    return capture.requests


def collect_features(
    requests: Sequence[RankRequest], settings: Settings, batch_size: int, with_llm: bool,
    progress: ProgressFactory = no_progress, llm_model=None,
) -> BatchFeatures:
    """Features of every candidate, read in batches as the ranker reads them when serving."""
    scorer = llm_scorer(settings, llm_model) if with_llm else None
    matrices = []
    bar = progress("features" + (" + LLM scores" if with_llm else ""), len(requests))
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start:start + batch_size])
        llm_scores = window_scores(scorer, batch, settings) if scorer is not None else None
        matrices += read_features(batch, settings, llm_scores=llm_scores).matrices
        bar.update(len(batch))
    bar.close()
    return BatchFeatures(names=feature_names(with_llm), matrices=matrices)


def _is_validation(customer_id: int, seed: int) -> bool:
    return zlib.crc32(f"{seed}:{customer_id}".encode()) % 1000 < VALIDATION_SHARE * 1000


def _ndcg_at_10(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")[:10]
    gains = labels[order] / np.log2(np.arange(2, len(order) + 2))
    ideal = np.sort(labels)[::-1][:10]
    best = float(np.sum(ideal / np.log2(np.arange(2, len(ideal) + 2))))
    return float(np.sum(gains)) / best if best else 0.0


def _group_metrics(groups: Sequence[tuple[Example, np.ndarray, np.ndarray]]) -> dict:
    """Mean NDCG@10 of the model and of the pipeline's candidate order, per task and over all."""
    out = {}
    for task in ("all", "next", "query"):
        chosen = [(s, y) for e, s, y in groups if task in ("all", e.task)]
        if not chosen:
            continue
        model = [_ndcg_at_10(s, y) for s, y in chosen]
        given = [_ndcg_at_10(-np.arange(len(y), dtype=float), y) for _, y in chosen]
        out[task] = {"groups": len(chosen), "ndcg@10": round(float(np.mean(model)), 4),
                     "candidate_order_ndcg@10": round(float(np.mean(given)), 4)}
    return out


def train_ranker(
    settings: Settings,
    *,
    variant: str = "learned",
    cutoff: datetime | str | None = None,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
    seed: int = 42,
    max_examples: int | None = None,
    snapshot: SnapshotBuilder | None = None,
    feature_settings: Settings | None = None,
    progress: ProgressFactory = no_progress,
    llm_model=None,
    params: dict | None = None,
    batch_size: int = OFFLINE_BATCH_SIZE,
) -> dict:
    """Train and save the variant's model; returns its metadata (also in the model file).

    `params` overrides entries of `LGBM_PARAMS`; `batch_size` is the requests per pass of the feature runs.

    `feature_settings` points at a database that already holds only the purchases before the
    inner cutoff (tests); otherwise `snapshot(settings, inner_cutoff)` builds one (default: the
    evaluation's snapshot builder). `max_examples` caps the examples per task (default: all, or
    `DEFAULT_LLM_REQUESTS` for `learned-llm`).
    """
    import lightgbm

    if variant not in VARIANTS:
        raise TrainingError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    with_llm = variant == "learned-llm"
    started = time.perf_counter()
    end, inner = training_period(settings, cutoff, horizon_days)
    labels, counts = training_labels(settings, inner, end)
    if len(labels) < MIN_CUSTOMERS or counts["purchases_before_inner_cutoff"] == 0:
        raise TrainingError(
            f"too little data to train: {len(labels)} customers bought between {inner:%Y-%m-%d} and "
            f"{end:%Y-%m-%d %H:%M} after buying before it (need at least {MIN_CUSTOMERS}); choose a later --cutoff"
        )
    with get_engine(settings).connect() as conn:
        descriptions = dict(conn.execute(text("SELECT stock_code, description FROM products")).all())
    examples = make_examples(labels, descriptions, seed)
    cap = max_examples if max_examples is not None else (DEFAULT_LLM_REQUESTS if with_llm else None)
    if cap is not None:
        examples = [e for e in examples if e.task == "next"][:cap] + [e for e in examples if e.task == "query"][:cap]

    if feature_settings is None:
        if snapshot is None:
            from recsys.evaluation.snapshot import snapshot_settings as snapshot
        t0 = time.perf_counter()
        feature_settings = snapshot(settings, inner)
        counts["snapshot_s"] = round(time.perf_counter() - t0, 1)
    requests = collect_requests(examples, feature_settings, batch_size, progress)
    t0 = time.perf_counter()
    features = collect_features(requests, feature_settings, batch_size, with_llm, progress, llm_model)
    feature_ms = (time.perf_counter() - t0) * 1000 / max(len(requests), 1)

    train_x, train_y, train_groups, valid_x, valid_y, valid_groups = [], [], [], [], [], []
    valid_examples, train_examples = [], []
    for example, request, matrix in zip(examples, requests, features.matrices, strict=True):
        answers = set(example.answers)
        y = np.array([1.0 if c.stock_code in answers else 0.0 for c in request.candidates], dtype=np.float32)
        if not y.any():
            continue
        if _is_validation(example.customer_id, seed):
            valid_x.append(matrix), valid_y.append(y), valid_groups.append(len(y)), valid_examples.append(example)
        else:
            train_x.append(matrix), train_y.append(y), train_groups.append(len(y)), train_examples.append(example)
    reachable = len(train_groups) + len(valid_groups)
    if len(train_groups) < MIN_GROUPS or not valid_groups:
        raise TrainingError(
            f"too little data to train: only {reachable} of {len(examples)} examples have an answer among "
            f"their candidates (need at least {MIN_GROUPS + 1}); choose a later --cutoff or a longer window"
        )
    params = dict(LGBM_PARAMS, seed=seed, deterministic=True) | (params or {})
    train_set = lightgbm.Dataset(np.vstack(train_x), np.concatenate(train_y), group=train_groups,
                                 feature_name=list(features.names), free_raw_data=False)
    valid_set = lightgbm.Dataset(np.vstack(valid_x), np.concatenate(valid_y), group=valid_groups,
                                 reference=train_set)
    bar = progress("boosting", MAX_ROUNDS)
    t0 = time.perf_counter()
    booster = lightgbm.train(
        params, train_set, num_boost_round=MAX_ROUNDS, valid_sets=[valid_set], valid_names=["validation"],
        callbacks=[lightgbm.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False), lambda env: bar.update(1)],
    )
    bar.close()
    fit_s = time.perf_counter() - t0

    def scored(examples_, xs, ys):
        return [(e, booster.predict(x, num_iteration=booster.best_iteration), y)
                for e, x, y in zip(examples_, xs, ys, strict=True)]

    gains = booster.feature_importance(importance_type="gain", iteration=booster.best_iteration)
    total_gain = float(np.sum(gains)) or 1.0
    importances = {name: round(float(g) / total_gain, 4) for name, g in zip(features.names, gains, strict=True)}
    metadata = {
        "variant": variant,
        "features": list(features.names),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cutoff": end.isoformat(sep=" "),
        "inner_cutoff": inner.isoformat(sep=" "),
        "horizon_days": horizon_days,
        "seed": seed,
        "data": counts | {
            "examples": {task: sum(1 for e in examples if e.task == task) for task in ("next", "query")},
            "groups_with_answer": reachable,
            "train_groups": len(train_groups),
            "validation_groups": len(valid_groups),
            "rows": int(sum(train_groups) + sum(valid_groups)),
            "positives": int(sum(float(y.sum()) for y in train_y + valid_y)),
            "candidates_per_request": round(float(np.mean([len(r.candidates) for r in requests])), 1),
        },
        "params": {key: value for key, value in params.items() if key != "verbose"},
        "best_iteration": int(booster.best_iteration or booster.current_iteration()),
        "metrics": {
            "train": _group_metrics(scored(train_examples, train_x, train_y)),
            "validation": _group_metrics(scored(valid_examples, valid_x, valid_y)),
        },
        "importances": dict(sorted(importances.items(), key=lambda item: -item[1])),
        "timings": {"total_s": round(time.perf_counter() - started, 1), "fit_s": round(fit_s, 1),
                    "feature_ms_per_request": round(feature_ms, 2)},
        "versions": {"lightgbm": lightgbm.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    if with_llm:
        metadata["llm"] = {"scorer": LLM_SCORER, "model": getattr(llm_model, "name", settings.llm_model),
                           "window": settings.max_candidates}
    if booster.best_iteration:
        booster = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
    path = model_path(settings, variant)
    version = write_model(path, booster, metadata)
    log.info("trained %s: validation %s; wrote %s", variant, metadata["metrics"]["validation"], path)
    return metadata | {"version": version, "path": str(path)}
