"""Offline evaluation: metrics, query words, the split, the snapshot database (leakage), seeded sampling, end to end
through the production pipeline."""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from recsys.cli import cli
from recsys.evaluation.cases import STRATA, TASKS, sample_cases
from recsys.evaluation.metrics import (
    case_metrics,
    hit_rate_at,
    mean_metrics,
    mrr_at,
    ndcg_at,
    paired_difference,
    percentile,
    recall_at,
)
from recsys.evaluation.queries import type_query
from recsys.evaluation.report import latest_report, write_report
from recsys.evaluation.runner import EvalParams, EvaluationError, run_evaluation
from recsys.evaluation.snapshot import snapshot_name, snapshot_settings
from recsys.evaluation.split import PurchaseLog, TemporalSplit
from recsys.rankers import CLASSICAL_RANKER_NAMES

# ---------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    order = ["a", "b", "c", "d", "e", "f"]
    answers = {"b", "e", "z"}  # ranks 2 and 5; z never shown
    assert hit_rate_at(order, answers, 1) == 0.0 and hit_rate_at(order, answers, 2) == 1.0
    assert recall_at(order, answers, 5) == pytest.approx(2 / 3)
    assert recall_at(order, answers, 4) == pytest.approx(1 / 3)
    assert mrr_at(order, answers, 5) == 0.5 and mrr_at(order, answers, 1) == 0.0
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(order, answers, 5) == pytest.approx(dcg / ideal)
    # one answer: NDCG is 1/log2(rank+1), recall equals hit rate
    single = case_metrics(order, {"c"}, ks=(5, 10))
    assert single["ndcg@5"] == pytest.approx(0.5) and single["mrr@10"] == pytest.approx(1 / 3)
    assert single["recall@5"] == single["hit_rate@5"] == 1.0
    # ideal cut at k: two answers at ranks 1 and 2 with k=1 is perfect
    assert ndcg_at(["x", "y"], {"x", "y"}, 1) == 1.0
    assert ndcg_at(order, set(), 5) == 0.0 and recall_at(order, set(), 5) == 0.0
    assert mean_metrics([{"m": 1.0}, {"m": 0.0}]) == {"n": 2, "m": 0.5}
    assert mean_metrics([]) == {"n": 0}


def test_percentile_and_paired_difference():
    assert percentile([], 50) is None
    assert percentile([3, 1, 2, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    diff = paired_difference([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])
    assert diff["delta"] == pytest.approx(0.5) and diff["low"] < 0.5 < diff["high"] and diff["n"] == 4
    assert paired_difference([1.0], [0.0]) is None


# ---------------------------------------------------------------- query words


@pytest.mark.parametrize(
    ("description", "query"),
    [
        ("COPPER AND BRASS BAG CHARM", "BAG CHARM"),
        ("WHITE HANGING HEART T-LIGHT HOLDER", "T-LIGHT HOLDER"),
        ("HANGING HEART ZINC T-LIGHT HOLDER", "T-LIGHT HOLDER"),
        ("LUNCH BAG RED RETROSPOT", "LUNCH BAG"),
        ("JUMBO BAG CHARLIE AND LOLA TOYS", "JUMBO BAG"),
        ("SMALL RED RETROSPOT MUG IN BOX", "MUG"),
        ("SET OF 4 PISTACHIO LOVEBIRD COASTER", "COASTER"),
        ("PINK PILLAR CANDLE SILVER FLOCK", "PILLAR CANDLE"),
        ("DOORMAT I LOVE LONDON", "DOORMAT"),
        ("RABBIT NIGHT LIGHT", "NIGHT LIGHT"),
        ("HEART OF WICKER SMALL", "HEART"),
        ("SET/6 RED SPOTTY PAPER CUPS", "PAPER CUPS"),
        ("WHITE METAL LANTERN", "LANTERN"),
        ("PINK HORSE SOCK PUPPET", "SOCK PUPPET"),
        ("PAPERWEIGHT HOME SWEET HOME", "PAPERWEIGHT"),
        ("12 PINK SMALL", None),
        ("", None),
        (None, None),
    ],
)
def test_type_query(description, query):
    assert type_query(description) == query


# ---------------------------------------------------------------- split and sampling (no database)

CUTOFF = pd.Timestamp("2011-09-01")


def synthetic_log(customers: int = 60, products: int = 30, seed: int = 0) -> PurchaseLog:
    """Random invoices over 2011, with heavier and lighter customers, a product only sold after the
    cutoff (NEW1), a non-product (POST) and a purchase exactly at the cutoff."""
    rng = np.random.default_rng(seed)
    codes = [f"P{i:02d}" for i in range(products)]
    rows = []
    invoice = 0
    for customer in range(1, customers + 1):
        for _ in range(1 + customer % 7):
            invoice += 1
            day = pd.Timestamp("2011-01-01") + pd.Timedelta(days=int(rng.integers(0, 340)))
            for code in rng.choice(codes, size=int(rng.integers(1, 6)), replace=False):
                rows.append((customer, f"I{invoice}", str(code), day))
            if customer % 5 == 0:
                rows.append((customer, f"I{invoice}", "POST", day))
    rows += [(1, "LATE1", "NEW1", CUTOFF + pd.Timedelta(days=3)), (2, "LATE2", "NEW1", CUTOFF),
             (2, "LATE2", "P00", CUTOFF), (3, "LATE3", "NEW1", CUTOFF + pd.Timedelta(days=9)),
             (3, "LATE3", "P01", CUTOFF + pd.Timedelta(days=9))]
    purchases = pd.DataFrame(rows, columns=["customer_id", "invoice_no", "stock_code", "invoiced_at"])
    names = {code: f"RED RETROSPOT ITEM {code} MUG" if i % 2 else f"WHITE {code} LANTERN" for i, code in
             enumerate(codes)}
    names |= {"NEW1": "NEW BAG CHARM", "POST": "POSTAGE"}
    catalog = pd.DataFrame(
        [(code, name, code == "POST") for code, name in names.items()],
        columns=["stock_code", "description", "is_non_product"],
    ).set_index("stock_code")
    vectors = rng.normal(size=(len(names), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return PurchaseLog(purchases=purchases, products=catalog, embeddings=dict(zip(names, vectors, strict=True)))


def test_nothing_on_or_after_the_cutoff_reaches_histories():
    full = synthetic_log()
    before_only = PurchaseLog(
        purchases=full.purchases[full.purchases["invoiced_at"] < CUTOFF],
        products=full.products,
        embeddings=full.embeddings,
    )
    split, reference = TemporalSplit(full, CUTOFF), TemporalSplit(before_only, CUTOFF)
    assert split.train["invoiced_at"].max() < CUTOFF
    assert split.test["invoiced_at"].min() >= CUTOFF  # the purchase exactly at the cutoff is held out
    assert split.histories == reference.histories
    assert split.purchase_counts == reference.purchase_counts
    assert all("NEW1" not in codes for codes in split.histories.values())
    for task in TASKS:
        for case in sample_cases(split, task, 30, seed=7):
            known = set(reference.histories[case.customer_id])
            assert {item.stock_code for item in case.history} <= known
            assert case.repeats <= known


def test_same_seed_same_cases_and_strata_interleaved():
    split = TemporalSplit(synthetic_log(), CUTOFF)
    for task in TASKS:
        first = [c.as_dict() for c in sample_cases(split, task, 9, seed=42)]
        again = [c.as_dict() for c in sample_cases(TemporalSplit(synthetic_log(), CUTOFF), task, 9, seed=42)]
        other = [c.as_dict() for c in sample_cases(split, task, 9, seed=43)]
        assert first == again and first != other
        assert [c["stratum"] for c in first] == list(STRATA) * 3
    query_cases = sample_cases(split, "query", 9, seed=42)
    assert all(c.query and len(c.answers) == 1 for c in query_cases)
    next_cases = sample_cases(split, "next", 9, seed=42)
    assert all(c.query is None and "POST" not in c.answers for c in next_cases)


def test_params_are_validated():
    with pytest.raises(EvaluationError, match="cutoff must be a date"):
        EvalParams(cutoff="soon").validate()
    with pytest.raises(EvaluationError, match="must be after the cutoff"):
        EvalParams(cutoff="2011-11-01", until="2011-10-01").validate()
    with pytest.raises(EvaluationError, match="rankers must be among"):
        EvalParams(rankers=("magic",)).validate()
    with pytest.raises(EvaluationError, match="tasks must be among"):
        EvalParams(tasks=("guess",)).validate()
    with pytest.raises(EvaluationError, match="at least 1"):
        EvalParams(cases=0).validate()
    assert EvalParams(cases=50, limits={"llm-listwise": 10}).limit_for("llm-listwise") == 10
    assert EvalParams(cases=5).limit_for("llm-listwise") == 5


# ---------------------------------------------------------------- end to end on a small database

SMALL_CUTOFF = "2011-06-01"
PRODUCTS = {
    "71053": "WHITE METAL LANTERN",
    "22224": "WHITE LOVEBIRD LANTERN",
    "90001B": "COPPER AND BRASS BAG CHARM",
    "90001C": "IVORY GOLD METAL BAG CHARM",
    "85123A": "WHITE HANGING HEART T-LIGHT HOLDER",
    "21733": "RED HANGING HEART T-LIGHT HOLDER",
    "20725": "LUNCH BAG RED RETROSPOT",
    "23206": "LUNCH BAG APPLE DESIGN",
    "22728": "ALARM CLOCK BAKELIKE PINK",
    "22727": "ALARM CLOCK BAKELIKE RED",
    "21754": "HOME BUILDING BLOCK WORD",
    "84879": "ASSORTED COLOUR BIRD ORNAMENT",
}


@pytest.fixture
def split_db(db, tmp_path):
    """Nine customers with purchases on both sides of 2011-06-01 (light to heavy), ingested and embedded."""
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file

    codes = list(PRODUCTS)
    lines = ["InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"]
    invoice = 550000
    for customer in range(9):
        for month, count in ((3, 1 + customer % 3), (4, 1 + customer // 3), (7, 2), (8, 1 + customer % 2)):
            invoice += 1
            for j in range(count):
                code = codes[(customer * 3 + month + j * 5) % len(codes)]
                lines.append(f"{invoice},{code},{PRODUCTS[code]},6,2011-{month:02d}-{10 + customer:02d} 10:00:00,"
                             f"1.25,{17000 + customer},United Kingdom")
    path = tmp_path / "split.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ingest_file(path, db)
    embed_products(db)
    return db


def test_the_snapshot_holds_nothing_on_or_after_the_cutoff(split_db, tmp_path):
    from sqlalchemy import text

    from recsys.catalog.ingest import ingest_file
    from recsys.platform import migrations
    from recsys.platform.db import get_engine

    later = tmp_path / "later.csv"  # a product first sold on the cutoff day
    later.write_text("InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
                     "560001,99999,NEW SEASON BAG CHARM,2,2011-06-01 00:00:00,1.25,17000,United Kingdom\n")
    ingest_file(later, split_db)
    cutoff = datetime(2011, 6, 1)
    snapshot = snapshot_settings(split_db, cutoff)
    assert snapshot.db_name == snapshot_name(split_db, cutoff) != split_db.db_name
    with get_engine(split_db).connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM purchases WHERE invoiced_at < :c"), {"c": cutoff}).scalar()
        only_later = set(conn.execute(text(
            "SELECT stock_code FROM purchases GROUP BY stock_code HAVING min(invoiced_at) >= :c"), {"c": cutoff}
        ).scalars())
    with get_engine(snapshot).connect() as conn:
        row = conn.execute(text("SELECT count(*) AS n, max(invoiced_at) AS last FROM purchases")).one()
        assert row.n == before and row.last < cutoff
        assert conn.execute(text("SELECT max(last_purchase_at) FROM customers")).scalar() < cutoff
        products = set(conn.execute(text("SELECT stock_code FROM products")).scalars())
        assert not products & only_later
        assert conn.execute(text("SELECT count(*) FROM products WHERE embedding IS NULL")).scalar() == 0
        pairs = conn.execute(text("SELECT count(*) FROM copurchase")).scalar()
        runs = conn.execute(text("SELECT count(*) FROM ingest_runs")).scalar()
    assert only_later and pairs > 0
    migrations.downgrade(snapshot, "-1")  # as if built by the code before the newest migration
    again = snapshot_settings(split_db, cutoff)  # reused, not rebuilt, and brought to this code's schema
    with get_engine(again).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ingest_runs")).scalar() == runs
    assert migrations.current_revision(again) == migrations.head_revision()


def test_the_evaluation_and_the_worker_call_the_same_pipeline(split_db, flushed_broker, monkeypatch):
    from recsys import jobs
    from recsys.recommend import pipeline

    calls = []
    real = pipeline.recommend_batch

    def recording(requests, settings, *args, **kwargs):
        calls.append((settings.db_name, [r.customer_id for r in requests]))
        return real(requests, settings, *args, **kwargs)

    monkeypatch.setattr(pipeline, "recommend_batch", recording)
    results = run_evaluation(EvalParams(cutoff=SMALL_CUTOFF, cases=4, rankers=("retrieval",), tasks=("next",),
                                        batch_size=2), split_db)
    snapshot = snapshot_name(split_db, datetime(2011, 6, 1))
    assert [name for name, _ in calls] == [snapshot, snapshot]
    assert sorted(c for _, customers in calls for c in customers) == sorted(
        case["customer_id"] for case in results["per_case"])
    calls.clear()
    outcome = jobs.submit_recommendation({"customer_id": 17000, "k": 3, "ranker": "retrieval"}, settings=split_db)
    jobs.run_job(outcome.job_id, worker="test-worker", settings=split_db)
    assert calls == [(split_db.db_name, [17000])]


def _classical_numbers(results: dict) -> dict:
    return {
        task: {name: r["segments"] for name, r in entry["rankers"].items() if name in CLASSICAL_RANKER_NAMES}
        for task, entry in results["tasks"].items()
    }


def test_end_to_end_through_the_pipeline(split_db, tmp_path):
    params = EvalParams(cutoff=SMALL_CUTOFF, cases=6, rankers=CLASSICAL_RANKER_NAMES, batch_size=3,
                        max_candidates=5)
    results = run_evaluation(params, split_db)
    assert set(results["tasks"]) == set(TASKS)
    for task in results["tasks"].values():
        assert list(task["rankers"]) == list(CLASSICAL_RANKER_NAMES)
        assert task["cases"] == 6 and sum(task["strata"].values()) == 6
        recall = task["candidate_recall"]
        assert set(recall) == {"merged", "vector", "repeat", "copurchase", "popular"}
        assert all(0.0 <= row["@20"] <= row["@100"] <= 1.0 for row in recall.values())
        for name, entry in task["rankers"].items():
            assert 0.0 <= entry["segments"]["all"]["ndcg@10"] <= 1.0
            assert entry["latency_ms"]["p50"] >= 0
            if name != "retrieval":
                assert entry["vs_ndcg@10"]["retrieval"]["n"] == entry["cases"]
    assert results["data"]["train_purchases"] > 0 and results["data"]["test_purchases"] > 0
    assert results["data"]["snapshot"] == snapshot_name(split_db, datetime(2011, 6, 1))

    folder = write_report(results, tmp_path / "eval")
    assert {"metrics.json", "report.md", "ndcg_latency.png", "cases.jsonl"} <= {p.name for p in folder.iterdir()}
    assert (tmp_path / "eval" / "latest").resolve() == folder.resolve()
    latest = latest_report(tmp_path / "eval")
    assert latest["created_at"] == results["created_at"] and latest["params"]["seed"] == 42
    assert "| copurchase |" in latest["table_markdown"] and "answer in first 100" in latest["table_markdown"]
    assert latest_report(tmp_path / "nothing") is None

    again = run_evaluation(params, split_db)
    assert _classical_numbers(again) == _classical_numbers(results)


def test_cli_eval(split_db, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "--cutoff", "someday"])
    assert result.exit_code == 2 and "cutoff must be a date" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(cli, ["eval", "--limit", "llm-listwise"])
    assert result.exit_code == 2 and "RANKER=N" in result.output
    result = runner.invoke(cli, ["eval", "--cutoff", "2030-01-01", "--rankers", "retrieval"])
    assert result.exit_code == 2 and "no purchases on one side" in result.output
    result = runner.invoke(cli, ["eval", "--cutoff", SMALL_CUTOFF, "--rankers", "retrieval,popularity",
                                 "--tasks", "next", "--cases", "3", "--out", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload["tasks"]) == ["next"] and payload["params"]["cases"] == 3
    assert (tmp_path / "runs" / "latest" / "report.md").is_file()
