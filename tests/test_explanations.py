"""Grounded explanations: every reason is a fact from the database, the first one is what drove the rank."""

from __future__ import annotations

from datetime import datetime

import pytest

from recsys.catalog.ingest import ingest_file
from recsys.rankers import get_ranker
from recsys.recommend.explanations import Evidence, choose_reasons, matches_query, ranking_note
from recsys.recommend.pipeline import recommend, recommend_batch
from recsys.recommend.request import RecommendationRequest

# Three other customers bought the white lovebird lantern with the copper bag charm (3 orders together);
# customer 15781 (who bought the lantern) buys the drawer knob a second time.
EXTRA_ROWS = [
    "540001,22224,WHITE LOVEBIRD LANTERN,2,2010-12-12 09:00:00,2.95,20001,United Kingdom",
    "540001,90001B,COPPER AND BRASS BAG CHARM,2,2010-12-12 09:00:00,2.10,20001,United Kingdom",
    "540002,22224,WHITE LOVEBIRD LANTERN,2,2010-12-12 10:00:00,2.95,20002,United Kingdom",
    "540002,90001B,COPPER AND BRASS BAG CHARM,2,2010-12-12 10:00:00,2.10,20002,United Kingdom",
    "540003,22224,WHITE LOVEBIRD LANTERN,2,2010-12-12 11:00:00,2.95,20003,United Kingdom",
    "540003,90001B,COPPER AND BRASS BAG CHARM,2,2010-12-12 11:00:00,2.10,20003,United Kingdom",
    "540004,21669,BLUE STRIPE CERAMIC DRAWER KNOB,12,2010-12-13 12:00:00,1.25,15781,United Kingdom",
]


@pytest.fixture
def shop(loaded_db, tmp_path):
    extra = tmp_path / "extra.csv"
    extra.write_text("InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
                     + "\n".join(EXTRA_ROWS) + "\n", encoding="utf-8")
    ingest_file(extra, loaded_db)
    return loaded_db


def item(result: dict, code: str) -> dict:
    return next(i for i in result["items"] if i["stock_code"] == code)


def test_copurchase_reason_comes_first_and_names_the_history_item(shop):
    result = recommend(RecommendationRequest(15781, "BAG CHARM", 3, "copurchase", explain=True), shop)
    top = result["items"][0]
    assert top["stock_code"] == "90001B"
    assert top["reasons"][0] == "bought together with WHITE LOVEBIRD LANTERN in 3 orders"
    assert "matches 'BAG CHARM'" in top["reasons"]
    assert top["explanation"].startswith("bought together with WHITE LOVEBIRD LANTERN")
    assert top["model_reason"] is None and result["ranking_note"] is None
    assert all(i["reasons"] for i in result["items"])


def test_repeat_purchase_and_query_match(shop):
    result = recommend(RecommendationRequest(15781, "drawer knob", 5, "retrieval", explain=True), shop)
    knob = item(result, "21669")
    assert knob["reasons"][0] == "matches 'drawer knob'"  # retrieval: the query decided the place
    assert "you bought this 2 times, last on 2010-12-13" in knob["reasons"]


def test_retrieval_without_query_is_explained_by_the_history(shop):
    result = recommend(RecommendationRequest(15781, None, 3, "retrieval", explain=True), shop)
    for entry in result["items"]:
        assert entry["reasons"][0].startswith(("like your ", "close to what you bought recently"))


def test_fallback_is_said_in_words_and_the_query_explains_the_order(shop):
    """12583 bought nothing that sells with a bag charm: co-purchase has nothing to go on."""
    result = recommend(RecommendationRequest(12583, "BAG CHARM", 3, "copurchase", explain=True), shop)
    assert result["flags"]["fallback"]
    assert "retrieval order" in result["ranking_note"] and result["ranking_note"] in result["notes"]
    assert all(i["reasons"][0] == "matches 'BAG CHARM'" for i in result["items"])


def test_no_explanations_unless_asked(shop):
    result = recommend(RecommendationRequest(15781, "BAG CHARM", 3, "copurchase"), shop)
    assert all("reasons" not in i and i["explanation"] is None for i in result["items"])


def test_one_statement_serves_a_whole_batch(shop):
    requests = [RecommendationRequest(15781, "BAG CHARM", 3, "popularity", explain=True),
                RecommendationRequest(12583, "night light", 2, "popularity", explain=True),
                RecommendationRequest(17850, "lantern", 2, "popularity")]
    results = recommend_batch(requests, shop)
    assert results[0]["items"][0]["reasons"][0].startswith("bought by ")
    assert all(i["reasons"] for r in results[:2] for i in r["items"])
    assert "reasons" not in results[2]["items"][0]
    assert results[0]["timings_ms"]["explain_ms"] >= 0 and "explain_ms" not in results[2]["timings_ms"]


def test_llm_words_are_kept_apart_and_repairs_are_told(shop, tiny_llm):
    settings = shop.with_(max_candidates=6)
    ranker = get_ranker("llm-listwise", settings=settings, model=tiny_llm)
    result = recommend(RecommendationRequest(15781, "BAG CHARM", 3, "llm-listwise", explain=True), settings,
                       ranker=ranker)
    for entry in result["items"]:
        assert entry["reasons"]  # grounded, whatever the random model wrote
        assert entry["model_reason"] is None or isinstance(entry["model_reason"], str)
    if result["flags"]["repaired"] or result["flags"]["fallback"]:
        assert "6 candidates" in result["ranking_note"] and "retrieval order" in result["ranking_note"]


def test_reasons_per_ranker_lead_with_what_drove_the_rank():
    evidence = Evidence(customers=812, popularity_rank=4, times_bought=3, last_bought=datetime(2011, 11, 29),
                        together_with="JUMBO BAG RED RETROSPOT", together_invoices=57, like="LUNCH BAG APPLE DESIGN",
                        like_similarity=0.71, month_customers=90, month_rank=12,
                        month_end=datetime(2011, 12, 9))
    item = {"description": "LUNCH BAG RED RETROSPOT", "retrieval_score": 0.64}
    copurchase = choose_reasons("copurchase", item, evidence, "lunch bag", fell_back=False)
    assert copurchase == ["bought together with JUMBO BAG RED RETROSPOT in 57 orders",
                          "you bought this 3 times, last on 2011-11-29", "like your LUNCH BAG APPLE DESIGN"]
    assert choose_reasons("popularity", item, evidence, None, False)[0] == "bought by 812 customers, #4 in the catalog"
    assert choose_reasons("retrieval", item, evidence, "lunch bag", False)[0] == "matches 'lunch bag'"
    assert choose_reasons("copurchase", item, evidence, "lunch bag", fell_back=True)[0] == "matches 'lunch bag'"
    llm = choose_reasons("llm-listwise", item, Evidence(month_rank=12, month_end=datetime(2011, 12, 9)), "tote",
                         False)
    assert llm == ["a best seller this month (#12 by customers in the 30 days to 2011-12-09)",
                   "close to 'tote' in meaning (similarity 0.64)"]
    assert choose_reasons("retrieval", item, Evidence(like="X", like_similarity=0.2), None, False) == [
        "close to what you bought recently"]


def test_ranking_notes_in_words():
    listwise = {"ranker": "llm-listwise", "flags": {"repaired": True, "fallback": False},
                "info": {"candidates_ranked": 20, "matched": 1, "unknown_items": 4, "duplicates": 1}}
    assert ranking_note(listwise) == ("The model placed 1 of 20 candidates; the other 19 follow in retrieval "
                                      "order. Dropped from its answer: 4 lines naming no candidate and one "
                                      "repeat.")
    pointwise = {"ranker": "llm-pointwise", "flags": {"repaired": True, "fallback": True},
                 "info": {"candidates_ranked": 20, "parse_failures": 20}}
    assert ranking_note(pointwise) == ("The model gave no usable probability for any of the 20 candidates, "
                                       "so they are in retrieval order.")
    assert ranking_note({"ranker": "retrieval", "flags": {"repaired": False, "fallback": False}}) is None


def test_query_matching_is_by_words():
    assert matches_query("bag charm", "COPPER AND BRASS BAG CHARM")
    assert matches_query("lanterns", "WHITE METAL LANTERN")
    assert not matches_query("bag charm", "LUNCH BAG RED RETROSPOT")
    assert not matches_query(None, "ANYTHING")


def test_the_cli_prints_the_reasons(shop, runner):
    from recsys.cli import cli

    done = runner.invoke(cli, ["recommend", "--customer", "15781", "--query", "BAG CHARM", "-k", "3",
                               "--ranker", "copurchase", "--explain"])
    assert done.exit_code == 0, done.output
    assert "      - bought together with WHITE LOVEBIRD LANTERN in 3 orders" in done.output
