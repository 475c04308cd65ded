"""Exact nearest products by one matrix product in the process, for catalogs small enough for it.

The HNSW index costs about as much per search at a few thousand products as at millions (1.5–3 ms
a query on this machine, most of the batch candidate statement's time), while a pass over every
vector of a 3,665-product catalog is one 32 × 3,665 × 384 matrix product for a whole batch
(about a millisecond). With `RECSYS_EXACT_SEARCH_MAX_PRODUCTS` set, catalogs of at most that many
recommendable products are searched exactly, here, and the index serves larger ones. It is off
(0) by default because it changes answers: on the bundled catalog the index's 100 nearest miss
one or two of the true 100 nearest in about 2% of requests, so exact search is the more accurate
and the faster, but not the same (README, Performance).

numpy only shortlists: the candidate statement measures each shortlisted product with pgvector's
own distance and keeps the nearest in the (distance, stock code) order the index scan gives, so a
request's vector candidates are those of an exact search in SQL. The shortlist carries
`SHORTLIST_MARGIN` products beyond what is kept because float32 rounding here and in pgvector
differ in the last bits. The matrix holds every embedded product that may be recommended and is
read again whenever the catalog version (a counter moved by any change to products, migration
0010) has moved.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import text

from recsys.config import Settings
from recsys.platform.db import get_engine

log = logging.getLogger(__name__)

SHORTLIST_MARGIN = 32

# The database's oid tells a database dropped and made again under the same name (its counter starts over).
_VERSION = text(
    "SELECT (SELECT oid FROM pg_database WHERE datname = current_database()) AS database, version FROM catalog_version"
)
_SEARCHABLE_COUNT = text("SELECT count(*) FROM products WHERE embedding IS NOT NULL AND NOT is_non_product")
_SEARCHABLE = text(
    "SELECT stock_code, CAST(embedding AS vector) AS embedding FROM products "
    "WHERE embedding IS NOT NULL AND NOT is_non_product ORDER BY stock_code"
)


@dataclass(frozen=True)
class ProductMatrix:
    """Unit-length embeddings of the searchable products, one row per code (stock-code order)."""

    version: tuple
    codes: tuple[str, ...]
    unit_rows: np.ndarray
    row_of: Mapping[str, int] = field(default_factory=dict)

    def history_vector(self, recent: Sequence[str]) -> np.ndarray | None:
        """The normalized mean of the recent purchases' rows, as the statement's history vector is made."""
        rows = sorted({self.row_of[code] for code in recent if code in self.row_of})
        if not rows:
            return None
        mean = self.unit_rows[rows].mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return mean / norm if norm > 0 else None

    def shortlists(self, vectors: Sequence[np.ndarray], wanted: Sequence[int]) -> list[list[str]]:
        """For each vector, the `wanted + SHORTLIST_MARGIN` products most similar to it (any order)."""
        if not vectors:
            return []
        queries = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        similarity = queries @ self.unit_rows.T
        found = []
        for row, want in zip(similarity, wanted, strict=True):
            size = min(want + SHORTLIST_MARGIN, len(self.codes))
            top = np.argpartition(-row, size - 1)[:size] if size < len(self.codes) else np.arange(len(self.codes))
            found.append([self.codes[i] for i in top])
        return found


_matrices: dict[tuple[str, int], tuple[tuple, ProductMatrix | None]] = {}
_lock = threading.Lock()


def product_matrix(settings: Settings) -> ProductMatrix | None:
    """This process's matrix for the settings' database, read again when the catalog version moved;
    None when exact search is off or the catalog has more than `RECSYS_EXACT_SEARCH_MAX_PRODUCTS`
    searchable products (or none): the index searches then."""
    if settings.exact_search_max_products <= 0:
        return None
    engine = get_engine(settings)
    key = (str(engine.url), settings.exact_search_max_products)
    with engine.connect() as conn:
        version = tuple(conn.execute(_VERSION).one())
        with _lock:
            cached = _matrices.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        count = conn.execute(_SEARCHABLE_COUNT).scalar_one()
        matrix = None
        if 0 < count <= settings.exact_search_max_products:
            rows = conn.execute(_SEARCHABLE).all()
            embeddings = np.stack([r.embedding.to_numpy() for r in rows]).astype(np.float32, copy=False)
            norms = np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
            codes = tuple(r.stock_code for r in rows)
            matrix = ProductMatrix(version, codes, embeddings / norms, {code: i for i, code in enumerate(codes)})
    with _lock:
        _matrices[key] = (version, matrix)
    log.info("exact product search: %s", f"on, {count} products" if matrix else f"off, {count} products")
    return matrix


def forget_matrices() -> None:
    """Drop the cached matrices (tests that change products in place)."""
    with _lock:
        _matrices.clear()
