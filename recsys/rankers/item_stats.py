"""Purchase statistics the classical rankers read from Postgres: popularity and co-purchase counts."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.rankers.base import copurchase_totals, history_candidate_pairs


class DatabaseItemStats:
    """Popularity and co-purchase counts for the classical rankers, read from Postgres."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def popularity(self, stock_codes: Sequence[str]) -> dict[str, float]:
        with get_engine(self.settings).connect() as conn:
            rows = conn.execute(
                text("SELECT stock_code, customer_count FROM products WHERE stock_code = ANY(:codes)"),
                {"codes": list(stock_codes)},
            ).all()
        return {r.stock_code: float(r.customer_count) for r in rows}

    def copurchase(self, history_codes: Sequence[str], candidate_codes: Sequence[str]) -> dict[str, float]:
        pairs = self.copurchase_pairs(history_candidate_pairs(history_codes, candidate_codes))
        return copurchase_totals(pairs, history_codes, candidate_codes)

    def copurchase_pairs(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Invoices together for exactly these pairs, one index probe each, in one statement."""
        if not pairs:
            return {}
        with get_engine(self.settings).connect() as conn:
            rows = conn.execute(
                text(
                    """
                    SELECT c.stock_code, c.other_stock_code, c.invoices
                    FROM unnest(CAST(:first AS text[]), CAST(:second AS text[])) AS p(stock_code, other_stock_code)
                    JOIN copurchase c USING (stock_code, other_stock_code)
                    """
                ),
                {"first": [a for a, _ in pairs], "second": [b for _, b in pairs]},
            ).all()
        return {(r.stock_code, r.other_stock_code): float(r.invoices) for r in rows}
