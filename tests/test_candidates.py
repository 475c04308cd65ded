"""The candidate stage on a small hand-made shop: each source, query filtering, exclusion, cold start, as_of.

Customer 100 bought the enamel mug in three invoices about 400 days before the newest purchase,
the lunch bag in two invoices ten days before it, and the metal lantern once, last. Other customers
buy the lantern with the hanging lantern (three invoices) and with the clock (two), the lunch bag
with the polka-dot bag (two); the bag charm is the best seller of the last 30 days.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import text

from recsys.catalog.embedding import embed_products, encode_queries
from recsys.catalog.ingest import ingest_file
from recsys.platform.db import get_engine
from recsys.recommend.candidates import (
    CandidateRequest,
    candidates_batch,
    copurchase_neighbours,
    forget_statistics,
    read_all_copurchase_neighbours,
    recent_purchases,
)
from recsys.recommend.pipeline import recommend
from recsys.recommend.request import RecommendationRequest

LANTERN, HANGING_LANTERN = "71053", "71054"
LUNCH_BAG, POLKADOT_BAG = "20725", "20726"
MUG, GREEN_MUG = "37370", "37371"
CHARM, CLOCK = "90001", "22728"
DESCRIPTIONS = {
    LANTERN: "WHITE METAL LANTERN",
    HANGING_LANTERN: "SILVER HANGING LANTERN",
    LUNCH_BAG: "RED RETROSPOT LUNCH BAG",
    POLKADOT_BAG: "BLUE POLKADOT LUNCH BAG",
    MUG: "PINK ENAMEL MUG",
    GREEN_MUG: "GREEN ENAMEL MUG",
    CHARM: "COPPER BAG CHARM",
    CLOCK: "ALARM CLOCK BAKELIKE RED",
}
SUBJECT = 100
INVOICES = [  # (customer, date, codes)
    (SUBJECT, "2010-10-01 10:00:00", [MUG]),
    (SUBJECT, "2010-10-15 10:00:00", [MUG]),
    (SUBJECT, "2010-11-01 10:00:00", [MUG]),
    (SUBJECT, "2011-11-20 10:00:00", [LUNCH_BAG]),
    (SUBJECT, "2011-11-22 10:00:00", [LUNCH_BAG]),
    (SUBJECT, "2011-12-01 10:00:00", [LANTERN]),
    (200, "2011-06-01 10:00:00", [LANTERN, HANGING_LANTERN]),
    (200, "2011-06-02 10:00:00", [LANTERN, HANGING_LANTERN]),
    (200, "2011-06-03 10:00:00", [LANTERN, HANGING_LANTERN]),
    (201, "2011-06-04 10:00:00", [LANTERN, CLOCK]),
    (201, "2011-06-05 10:00:00", [LANTERN, CLOCK]),
    (202, "2011-06-06 10:00:00", [LUNCH_BAG, POLKADOT_BAG]),
    (202, "2011-06-07 10:00:00", [LUNCH_BAG, POLKADOT_BAG]),
    *[(300 + i, "2011-11-25 10:00:00", [CHARM]) for i in range(5)],
    (310, "2011-11-26 10:00:00", [GREEN_MUG]),
    (311, "2011-11-26 11:00:00", [GREEN_MUG]),
]


@pytest.fixture
def shop(db, tmp_path):
    lines = ["InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"]
    for number, (customer, when, codes) in enumerate(INVOICES, 540000):
        lines += [f"{number},{code},{DESCRIPTIONS[code]},1,{when},2.50,{customer},United Kingdom" for code in codes]
    path = tmp_path / "shop.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ingest_file(path, db)
    embed_products(db)
    forget_statistics()
    yield db
    forget_statistics()


def one(settings, customer=SUBJECT, query=None, exclude=False, **options):
    vector = encode_queries([query], settings)[0] if query else None
    return candidates_batch([CandidateRequest(customer, vector, exclude, query)], settings, **options)[0]


def ranked(found, source):
    return [c.stock_code for c in sorted((c for c in found.candidates if source in c.sources),
                                         key=lambda c: c.sources[source])]


def test_repeat_orders_by_recency_weighted_frequency(shop):
    found = one(shop)
    # frequency alone would say mug (3), bag (2), lantern (1); recency alone lantern, bag, mug
    assert ranked(found, "repeat") == [LUNCH_BAG, LANTERN, MUG]
    bag = next(c for c in found.candidates if c.stock_code == LUNCH_BAG)
    assert bag.evidence["times_bought"] == 2 and bag.evidence["days_since_bought"] == pytest.approx(9)
    assert not found.cold_start and found.searched_by == "history"


def test_copurchase_neighbours_of_the_recent_purchases(shop):
    found = one(shop)
    assert ranked(found, "copurchase")[:3] == [HANGING_LANTERN, POLKADOT_BAG, CLOCK]
    hanging = next(c for c in found.candidates if c.stock_code == HANGING_LANTERN)
    assert hanging.evidence["copurchase_sum"] == 3 and hanging.evidence["copurchase_with"] == LANTERN


def test_partners_read_all_at_once_are_those_read_as_batches_need_them(shop):
    by_batches = one(shop)
    forget_statistics()
    preloaded = read_all_copurchase_neighbours(shop)

    with get_engine(shop).connect() as conn:
        codes = conn.execute(text("SELECT stock_code FROM products")).scalars().all()
    assert set(preloaded.partners) == set(codes)
    assert copurchase_neighbours(shop, codes) is preloaded  # nothing left to read
    assert one(shop) == by_batches


def test_popular_and_cold_start(shop):
    assert ranked(one(shop), "popular")[:2] == [CHARM, GREEN_MUG]
    found = one(shop, customer=999, query="bag charm")
    assert found.cold_start
    assert ranked(found, "popular")[0] == CHARM
    assert not ranked(found, "repeat") and not ranked(found, "copurchase")


def test_a_query_keeps_only_matching_products_in_the_other_sources(shop):
    found = one(shop, query="lantern")
    assert ranked(found, "repeat") == [LANTERN]
    assert ranked(found, "copurchase") == [HANGING_LANTERN]
    assert CHARM not in ranked(found, "popular")
    assert found.searched_by == "query"
    first = found.candidates[0]
    assert first.stock_code == LANTERN and first.evidence["query_similarity"] > 0.5


def test_exclude_purchased_drops_repeat_and_filters_the_rest(shop):
    found = one(shop, exclude=True)
    codes = {c.stock_code for c in found.candidates}
    assert not codes & {MUG, LUNCH_BAG, LANTERN}
    assert not ranked(found, "repeat")
    assert ranked(found, "copurchase")[0] == HANGING_LANTERN


def test_as_of_reads_only_earlier_purchases(shop):
    before = datetime(2011, 11, 21)
    assert recent_purchases([SUBJECT], shop, before)[SUBJECT] == [LUNCH_BAG, MUG]
    found = one(shop, as_of=before)
    assert ranked(found, "repeat") == [LUNCH_BAG, MUG]
    bag = next(c for c in found.candidates if c.stock_code == LUNCH_BAG)
    assert bag.evidence["times_bought"] == 1


def test_the_pipeline_tags_candidates_with_their_sources(shop):
    result = recommend(RecommendationRequest(SUBJECT, None, 5, "retrieval"), shop)
    sources = {c["stock_code"]: c["sources"] for c in result["candidates"]}
    assert sources[LUNCH_BAG]["repeat"] == 1 and sources[HANGING_LANTERN]["copurchase"] == 1
    cold = recommend(RecommendationRequest(999, "bag charm", 3, "retrieval"), shop)
    assert cold["cold_start"] and CHARM in {c["stock_code"] for c in cold["candidates"]}
