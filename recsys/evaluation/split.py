"""The temporal split: what the rankers may know (before the cutoff) and what they are asked about (after).

All purchases are read once into pandas. Everything a ranker or its statistics sees —
histories, popularity, co-purchase counts — is built from the purchases *before* the cutoff
only; the purchases on or after it (up to `until`) only ever become answers. The catalog
(descriptions, embeddings, the non-product flag) is not a purchase and is used as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import numpy as np
import pandas as pd
from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.rankers.base import copurchase_totals, history_candidate_pairs

log = logging.getLogger(__name__)

COPURCHASE_MIN_INVOICES = 2


@dataclass(frozen=True)
class PurchaseLog:
    """Every purchase line (customer_id, invoice_no, stock_code, invoiced_at) and the catalog."""

    purchases: pd.DataFrame
    products: pd.DataFrame  # index stock_code; columns description, is_non_product
    embeddings: dict[str, np.ndarray]

    @cached_property
    def non_products(self) -> frozenset[str]:
        return frozenset(self.products.index[self.products["is_non_product"]])

    def description(self, stock_code: str) -> str:
        return str(self.products.at[stock_code, "description"]) if stock_code in self.products.index else stock_code


def load_purchase_log(settings: Settings) -> PurchaseLog:
    """One read of the purchases table and one of the catalog (with embeddings)."""
    started = time.perf_counter()
    with get_engine(settings).connect() as conn:
        purchases = pd.read_sql(
            text("SELECT customer_id, invoice_no, stock_code, invoiced_at FROM purchases"), conn
        )
        catalog = conn.execute(
            text(
                "SELECT stock_code, description, is_non_product, "
                "CASE WHEN embedding_model = :model THEN CAST(embedding AS real[]) END AS embedding FROM products"
            ),
            {"model": settings.embedding_model},
        ).all()
    products = pd.DataFrame(
        [(r.stock_code, r.description, bool(r.is_non_product)) for r in catalog],
        columns=["stock_code", "description", "is_non_product"],
    ).set_index("stock_code")
    embeddings = {r.stock_code: np.asarray(r.embedding, dtype=np.float32) for r in catalog if r.embedding}
    log.info("read %d purchases and %d products in %.1f s", len(purchases), len(products),
             time.perf_counter() - started)
    return PurchaseLog(purchases=purchases, products=products, embeddings=embeddings)


class InMemoryItemStats:
    """`ItemStats` from a set of purchases, with the same definitions as the SQL views.

    Popularity is the number of distinct customers; co-purchase is the number of invoices
    holding both products, counted only for pairs seen in at least two invoices and never
    for non-products (as the `copurchase` materialized view does).
    """

    def __init__(self, purchases: pd.DataFrame, non_products: frozenset[str] = frozenset()) -> None:
        self._popularity = purchases.groupby("stock_code")["customer_id"].nunique().astype(float).to_dict()
        products = purchases[~purchases["stock_code"].isin(non_products)]
        invoice_ids, _ = pd.factorize(products["invoice_no"])
        self._invoices: dict[str, frozenset[int]] = {
            code: frozenset(ids) for code, ids in pd.Series(invoice_ids).groupby(products["stock_code"].to_numpy())
        }
        self._pairs: dict[tuple[str, str], int] = {}

    def popularity(self, stock_codes: Sequence[str]) -> dict[str, float]:
        return {code: self._popularity.get(code, 0.0) for code in stock_codes}

    def together(self, a: str, b: str) -> int:
        """Invoices holding both products (0 below the two-invoice threshold, or for a == b)."""
        if a == b:
            return 0
        key = (a, b) if a < b else (b, a)
        count = self._pairs.get(key)
        if count is None:
            count = len(self._invoices.get(a, frozenset()) & self._invoices.get(b, frozenset()))
            count = count if count >= COPURCHASE_MIN_INVOICES else 0
            self._pairs[key] = count
        return count

    def copurchase(self, history_codes: Sequence[str], candidate_codes: Sequence[str]) -> dict[str, float]:
        pairs = self.copurchase_pairs(history_candidate_pairs(history_codes, candidate_codes))
        return copurchase_totals(pairs, history_codes, candidate_codes)

    def copurchase_pairs(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        counts = {(a, b): float(self.together(a, b)) for a, b in pairs}
        return {pair: count for pair, count in counts.items() if count}


def _as_timestamp(value: datetime | str | pd.Timestamp | None) -> pd.Timestamp | None:
    return None if value is None else pd.Timestamp(value)


class TemporalSplit:
    """Purchases before `cutoff` (known) and on/after it, before `until` (held out)."""

    def __init__(
        self,
        purchase_log: PurchaseLog,
        cutoff: datetime | str,
        until: datetime | str | None = None,
    ) -> None:
        self.log = purchase_log
        self.cutoff = _as_timestamp(cutoff)
        self.until = _as_timestamp(until)
        if self.until is not None and self.until <= self.cutoff:
            raise ValueError(f"until ({self.until.date()}) must be after the cutoff ({self.cutoff.date()})")
        purchases = purchase_log.purchases
        at = purchases["invoiced_at"]
        self.train = purchases[at < self.cutoff]
        held_out = at >= self.cutoff
        if self.until is not None:
            held_out &= at < self.until
        self.test = purchases[held_out]

    @cached_property
    def stats(self) -> InMemoryItemStats:
        return InMemoryItemStats(self.train, self.log.non_products)

    @cached_property
    def histories(self) -> dict[int, list[str]]:
        """Each customer's distinct products before the cutoff, most recently bought first (as SQL
        `customer_history` orders them: last purchase descending, then stock code)."""
        last = self.train.groupby(["customer_id", "stock_code"], as_index=False)["invoiced_at"].max()
        last = last.sort_values(["customer_id", "invoiced_at", "stock_code"], ascending=[True, False, True])
        return {int(customer): list(codes) for customer, codes in last.groupby("customer_id")["stock_code"]}

    @cached_property
    def purchase_counts(self) -> dict[int, int]:
        """Purchase lines before the cutoff per customer: how light or heavy a customer is."""
        return {int(c): int(n) for c, n in self.train.groupby("customer_id").size().items()}

    @cached_property
    def future(self) -> dict[int, list[str]]:
        """Each customer's distinct recommendable products in the held-out window, first bought first."""
        test = self.test[~self.test["stock_code"].isin(self.log.non_products)]
        first = test.groupby(["customer_id", "stock_code"], as_index=False)["invoiced_at"].min()
        first = first.sort_values(["customer_id", "invoiced_at", "stock_code"])
        return {int(customer): list(codes) for customer, codes in first.groupby("customer_id")["stock_code"]}

    def summary(self) -> dict:
        return {
            "cutoff": self.cutoff.isoformat(sep=" "),
            "until": self.until.isoformat(sep=" ") if self.until is not None else None,
            "train_purchases": len(self.train),
            "train_customers": int(self.train["customer_id"].nunique()),
            "test_purchases": len(self.test),
            "test_customers": int(self.test["customer_id"].nunique()),
            "first_purchase_at": str(self.log.purchases["invoiced_at"].min()),
            "last_purchase_at": str(self.log.purchases["invoiced_at"].max()),
        }
