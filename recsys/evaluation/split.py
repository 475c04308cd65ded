"""The temporal split: what the rankers may know (before the cutoff) and what they are asked about (after).

All purchases are read once into pandas, to sample the cases: who bought what before the cutoff
(histories, how heavy a customer is, which answers are repeats) and after it (the answers). The
rankers never see this split: they run in the production pipeline against a snapshot database that
holds only the purchases before the cutoff (`recsys.evaluation.snapshot`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import numpy as np
import pandas as pd
from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import get_engine

log = logging.getLogger(__name__)

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
