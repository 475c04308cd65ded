"""The learned ranker: training on a small shop, the model file, and the errors a shop can meet.

The synthetic shop is built so that one feature decides the answer: every customer buys one
favourite product again and again, and what they buy next is that favourite. Vector search
cannot know which of their purchases is the favourite; a ranker that learned to use how often
the customer bought a candidate can.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import lightgbm
import numpy as np
import pytest
from click.testing import CliRunner

from recsys.cli import cli
from recsys.config import set_settings
from recsys.rankers import Candidate, HistoryItem, RankRequest
from recsys.rankers.features import FEATURES, feature_names, read_features
from recsys.rankers.learned import (
    LearnedRanker,
    ModelFileError,
    ModelNotTrainedError,
    model_path,
    model_version,
    read_model,
    write_model,
)
from recsys.rankers.training import TrainingError, train_ranker

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
TYPES = ("METAL LANTERN", "CERAMIC MUG", "LUNCH BAG", "SCENTED CANDLE", "PHOTO FRAME", "ALARM CLOCK")
COLOURS = ("RED", "BLUE", "GREEN", "PINK", "IVORY")
CUTOFF = datetime(2011, 6, 1)
INNER_CUTOFF = CUTOFF - timedelta(days=28)
TRAIN_CUSTOMERS = range(1000, 1090)
HELD_OUT_CUSTOMERS = range(5000, 5030)


def _products() -> list[tuple[str, str]]:
    return [(f"{20000 + 10 * t + c}", f"{colour} {kind}") for t, kind in enumerate(TYPES)
            for c, colour in enumerate(COLOURS)]


def _shop(seed: int = 7) -> tuple[list[str], dict[int, str]]:
    """CSV rows of the shop, and each held-out customer's favourite (their unseen next purchase)."""
    rng = random.Random(seed)
    products = _products()
    rows, favourites, invoice = [], {}, 600000

    def buy(customer: int, code: str, description: str, at: datetime) -> None:
        nonlocal invoice
        invoice += 1
        rows.append(f"{invoice},{code},{description},4,{at:%Y-%m-%d %H:%M:%S},{1.5 + int(code) % 7},{customer},UK")

    for customer in [*TRAIN_CUSTOMERS, *HELD_OUT_CUSTOMERS]:
        favourite, *others = rng.sample(products, 8)
        favourites[customer] = favourite[0]
        days = sorted(rng.sample(range(0, 110), 12))
        start = datetime(2011, 1, 3, 10)
        for day in days[:5]:
            buy(customer, *favourite, start + timedelta(days=day))
        for day, product in zip(days[5:], others, strict=False):
            buy(customer, *product, start + timedelta(days=day, hours=1))
        if customer in TRAIN_CUSTOMERS:
            buy(customer, *favourite, INNER_CUTOFF + timedelta(days=rng.randint(2, 20)))
    return rows, favourites


def _load(settings, rows: list[str], path: Path) -> None:
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file

    path.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    ingest_file(path, settings)
    embed_products(settings)


@pytest.fixture
def shop(db, tmp_path):
    rows, favourites = _shop()
    _load(db, rows, tmp_path / "shop.csv")
    settings = db.with_(model_cache=tmp_path / "models")
    set_settings(settings)
    return settings, rows, favourites


def _inner_snapshot(settings, rows, tmp_path):
    """A database holding the shop's purchases before the inner cutoff (what training reads features from)."""
    from conftest import _admin_execute

    name = f"{settings.db_name}_inner"
    _admin_execute(settings, f'CREATE DATABASE "{name}" TEMPLATE "recsys_template"')
    inner = settings.with_(db_name=name)
    early = [row for row in rows if datetime.fromisoformat(row.split(",")[4]) < INNER_CUTOFF]
    _load(inner, early, tmp_path / "inner.csv")
    return inner


def _first_place_rate(settings, ranker: str, favourites: dict[int, str]) -> float:
    from recsys.recommend.pipeline import recommend_batch
    from recsys.recommend.request import RecommendationRequest

    customers = list(HELD_OUT_CUSTOMERS)
    requests = [RecommendationRequest(customer_id=c, k=10, ranker=ranker) for c in customers]
    results = recommend_batch(requests, settings)
    return float(np.mean([r["items"][0]["stock_code"] == favourites[c] for c, r in zip(customers, results,
                                                                                            strict=True)]))


def test_training_learns_the_deciding_feature_and_beats_retrieval(shop, tmp_path):
    settings, rows, favourites = shop
    inner = _inner_snapshot(settings, rows, tmp_path)
    metadata = train_ranker(settings, cutoff=CUTOFF, feature_settings=inner.with_(model_cache=settings.model_cache))
    assert metadata["inner_cutoff"].startswith(INNER_CUTOFF.date().isoformat())
    assert metadata["data"]["label_customers"] == len(TRAIN_CUSTOMERS)
    # how often the customer bought the candidate, in whichever form: the candidate stage's repeat score or
    # rank, or the invoice count and recency
    assert max(metadata["importances"], key=metadata["importances"].get) in (
        "repeat_score", "repeat_rank", "times_bought", "days_since_bought")
    assert Path(metadata["path"]) == model_path(settings, "learned")

    learned = _first_place_rate(settings, "learned", favourites)
    retrieval = _first_place_rate(settings, "retrieval", favourites)
    assert learned >= 0.8 and learned > retrieval + 0.3, (learned, retrieval)


@pytest.mark.slow
def test_learned_llm_trains_with_the_llm_score_of_the_window_and_ranks(shop, tmp_path, tiny_llm):
    from recsys.rankers.features import LLM_FEATURE

    settings, rows, _ = shop
    settings = settings.with_(max_candidates=5)
    inner = _inner_snapshot(settings, rows, tmp_path).with_(max_candidates=5)
    metadata = train_ranker(settings, variant="learned-llm", cutoff=CUTOFF, feature_settings=inner,
                            max_examples=40, llm_model=tiny_llm)
    assert metadata["features"][-1] == LLM_FEATURE and metadata["llm"]["scorer"] == "llm-likelihood"
    assert metadata["data"]["examples"] == {"next": 40, "query": 40}
    ranker = LearnedRanker(settings, "learned-llm", llm_model=tiny_llm)
    candidates = [Candidate(code, description, 0.5) for code, description in _products()[:12]]
    [result] = ranker.rank([RankRequest(candidates=candidates, history=[HistoryItem(*_products()[0])],
                                        customer_id=TRAIN_CUSTOMERS[0])])
    assert sorted(result.order) == sorted(c.stock_code for c in candidates)
    assert result.info["model_version"] == read_model(model_path(settings, "learned-llm"), "learned-llm").version


def _tiny_booster(names, seed=0) -> lightgbm.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, len(names)))
    y = (x[:, 0] > 0).astype(float)
    data = lightgbm.Dataset(x, y, group=[20] * 10, feature_name=list(names))
    return lightgbm.train({"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 5}, data, num_boost_round=5)


def test_model_file_round_trips_and_is_replaced_atomically(tmp_path):
    path = tmp_path / "rankers" / "learned.json"
    booster = _tiny_booster(FEATURES)
    version = write_model(path, booster, {"variant": "learned", "features": list(FEATURES), "cutoff": "2011-11-01"})
    loaded = read_model(path, "learned")
    assert loaded.version == version and loaded.metadata["cutoff"] == "2011-11-01"
    x = np.random.default_rng(1).normal(size=(7, len(FEATURES)))
    assert np.allclose(loaded.booster.predict(x), booster.predict(x))
    assert set(loaded.importances()) == set(FEATURES)

    newer = write_model(path, _tiny_booster(FEATURES, seed=1), {"variant": "learned", "features": list(FEATURES)})
    assert newer != version and read_model(path, "learned").version == newer
    assert [p.name for p in path.parent.iterdir()] == ["learned.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01 not json", "corrupt"),
        (json.dumps({"format": 99, "metadata": {}, "model": ""}).encode(), "corrupt"),
        (json.dumps({"format": 1, "metadata": {"variant": "learned", "features": list(FEATURES)},
                     "model": "tree\nnonsense"}).encode(), "corrupt"),
    ],
)
def test_corrupt_model_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "learned.json"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as caught:
        read_model(path, "learned")
    assert "recsys train ranker" in str(caught.value)


def test_a_model_for_other_features_is_rejected(tmp_path):
    path = tmp_path / "learned.json"
    others = [name for name in FEATURES if name != "price"]
    write_model(path, _tiny_booster(others), {"variant": "learned", "features": others})
    with pytest.raises(ModelFileError, match="other features"):
        read_model(path, "learned")
    write_model(path, _tiny_booster(feature_names(with_llm=True)),
                {"variant": "learned-llm", "features": list(feature_names(with_llm=True))})
    with pytest.raises(ModelFileError, match="other features"):
        read_model(path, "learned")


def test_no_model_is_a_clear_error_never_a_fallback(loaded_db, tmp_path):
    from recsys.recommend.pipeline import recommend
    from recsys.recommend.request import RecommendationRequest, RequestError

    settings = loaded_db.with_(model_cache=tmp_path / "empty")
    with pytest.raises(ModelNotTrainedError, match="recsys train ranker"):
        LearnedRanker(settings)
    with pytest.raises(ModelNotTrainedError, match="recsys train ranker --variant learned-llm"):
        model_version(settings, "learned-llm")
    with pytest.raises(RequestError, match="recsys train ranker"):
        recommend(RecommendationRequest(15781, "lantern", 3, "learned"), settings)


def test_features_are_read_for_the_whole_batch(loaded_db):
    requests = [
        RankRequest(candidates=[Candidate("22224", "WHITE LOVEBIRD LANTERN", 0.9),
                                Candidate("71053", "WHITE METAL LANTERN", 0.8)],
                    history=[HistoryItem("22728", "ALARM CLOCK BAKELIKE PINK"), HistoryItem("22224", "x")],
                    query="lantern", customer_id=15781),
        RankRequest(candidates=[Candidate("22224", "WHITE LOVEBIRD LANTERN", 0.5)], customer_id=None),
        RankRequest(candidates=[]),
    ]
    features = read_features(requests, loaded_db)
    names = {name: i for i, name in enumerate(features.names)}
    first, second, third = features.matrices
    assert first.shape == (2, len(FEATURES)) and second.shape == (1, len(FEATURES)) and third.shape[0] == 0
    assert first[0, names["times_bought"]] == 1 and first[1, names["times_bought"]] == 0
    assert np.isnan(first[1, names["days_since_bought"]]) and first[0, names["days_since_bought"]] > 0
    assert first[0, names["query_similarity"]] > 0.3 and first[0, names["vector_rank"]] == 1
    assert first[1, names["popularity"]] == 1 and first[0, names["popularity"]] == 2
    assert np.isnan(second[0, names["query_similarity"]]) and second[0, names["has_query"]] == 0
    assert second[0, names["times_bought"]] == 0


def test_train_cli_on_an_empty_database_exits_2(db, tmp_path):
    set_settings(db.with_(model_cache=tmp_path))
    result = CliRunner().invoke(cli, ["train", "ranker"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no purchases" in result.output
    result = CliRunner().invoke(cli, ["train", "ranker", "--cutoff", "yesterday-ish"])
    assert result.exit_code == 2 and "cutoff must be a date" in result.output


def test_training_on_a_tiny_period_exits_with_one_line(shop):
    settings, _, _ = shop
    with pytest.raises(TrainingError, match="too little data"):
        train_ranker(settings, cutoff="2011-01-10")


def test_features_come_from_the_candidate_stage_evidence_when_it_is_there(loaded_db):
    tagged = Candidate("22224", "WHITE LOVEBIRD LANTERN", 0.9, sources={"repeat": 1, "popular": 4},
                       evidence={"times_bought": 7, "repeat_score": 2.5, "popularity_30d": 3,
                                 "copurchase_with": "71053"})
    request = RankRequest(candidates=[tagged], history=[HistoryItem("22728", "ALARM CLOCK BAKELIKE PINK")],
                          customer_id=15781)
    features = read_features([request], loaded_db)
    row = dict(zip(features.names, features.matrices[0][0], strict=True))
    assert row["times_bought"] == 7 and row["repeat_score"] == 2.5 and row["popularity_30d"] == 3
    assert row["copurchase_sum"] == 0 and np.isnan(row["query_similarity"])
    assert row["repeat_rank"] == 1 and row["popular_rank"] == 4 and np.isnan(row["vector_rank"])
    assert row["in_repeat"] == 1 and row["in_vector"] == 0 and row["source_count"] == 2
    assert row["price"] == pytest.approx(2.95) and row["customer_purchases"] == 5
    assert row["days_since_last_purchase"] == pytest.approx(0.0, abs=1e-6)


def test_the_model_version_is_part_of_the_result_cache_key(loaded_db, tmp_path):
    from recsys.platform.db import get_engine
    from recsys.recommend.cache import cache_key
    from recsys.recommend.request import RecommendationRequest

    settings = loaded_db.with_(model_cache=tmp_path)
    request = RecommendationRequest(15781, "lantern", 3, "learned")
    path = model_path(settings, "learned")
    write_model(path, _tiny_booster(FEATURES), {"variant": "learned", "features": list(FEATURES)})
    with get_engine(settings).connect() as conn:
        first = cache_key(conn, request, settings)
        assert cache_key(conn, request, settings) == first
        write_model(path, _tiny_booster(FEATURES, seed=3), {"variant": "learned", "features": list(FEATURES)})
        assert cache_key(conn, request, settings) != first


def test_the_api_answers_400_naming_the_command_when_no_model_is_trained(db, broker, tmp_path, api_key):
    from sqlalchemy import text

    from recsys.platform.db import get_engine
    from web import create_app

    app = create_app(db.with_(model_cache=tmp_path), {"TESTING": True, "API_KEY_CACHE_SECONDS": 0})
    response = app.test_client().post("/api/v1/recommendations", json={"query": "lantern", "k": 3, "ranker": "learned"},
                                      headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 400
    assert "recsys train ranker" in response.get_json()["error"]["message"]
    with get_engine(db).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 0


def test_the_default_ranker_is_learned_and_untrained_it_says_what_to_run(db, broker, tmp_path, api_key):
    """The evaluation's winner is the built-in default; a request naming no ranker on a shop without a
    trained model gets the same 400 as one naming `learned` (no silent fallback to another ranker)."""
    from recsys.config import Settings
    from web import create_app

    assert Settings().ranker == "learned"
    shop = db.with_(model_cache=tmp_path, ranker=Settings().ranker)
    app = create_app(shop, {"TESTING": True, "API_KEY_CACHE_SECONDS": 0})
    response = app.test_client().post("/api/v1/recommendations", json={"query": "lantern", "k": 3},
                                      headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 400
    assert "recsys train ranker" in response.get_json()["error"]["message"]
