"""The checks behind /health and the dashboard: database, broker and worker liveness."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import text

from recsys import jobs
from recsys.config import Settings
from recsys.platform import broker
from recsys.platform.db import get_engine

log = logging.getLogger(__name__)

_warm_up_started = threading.Event()
_warm_up_done = threading.Event()


def start_warm_up(settings: Settings) -> None:
    """Load what this web process needs to answer at full speed (the search query encoder, a database
    connection), in the background.

    gunicorn calls it as each process starts; until it is done /health answers "warming" (503), and a search
    that arrives meanwhile waits for the same load instead of starting its own.
    """
    if _warm_up_started.is_set():
        return
    _warm_up_started.set()

    def warm() -> None:
        from recsys.catalog.embedding import prepare_query_encoder

        try:
            started = time.perf_counter()
            prepare_query_encoder(settings)
            check_database(settings)  # the first request also finds a pooled connection
            log.info("web process warm in %.2f s", time.perf_counter() - started)
        except Exception:
            log.exception("warm-up failed; the first search will load the encoder itself")
        finally:
            _warm_up_done.set()

    threading.Thread(target=warm, name="warm-up", daemon=True).start()


def warming() -> bool:
    """True while a started warm-up runs (never in a process that did not start one, such as the tests' app)."""
    return _warm_up_started.is_set() and not _warm_up_done.is_set()


def check_database(settings: Settings) -> dict:
    started = time.perf_counter()
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return {"ok": False, "error": str(exc).splitlines()[0][:200]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def check_broker(settings: Settings) -> dict:
    client = broker.redis_client(settings)
    started = time.perf_counter()
    try:
        client.ping()
    except Exception as exc:
        return {"ok": False, "error": str(exc).splitlines()[0][:200]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def check_workers(settings: Settings) -> dict:
    try:
        status = dict(jobs.worker_status(settings))
    except Exception as exc:
        log.warning("worker status unavailable: %s", exc)
        return {"ok": False, "error": str(exc).splitlines()[0][:200]}
    status["ok"] = bool(status.get("alive"))
    return status
