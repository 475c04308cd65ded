"""The checks behind /health and the dashboard: database, broker and worker liveness."""

from __future__ import annotations

import logging
import time

from sqlalchemy import text

from recsys import jobs
from recsys.config import Settings
from recsys.platform import broker
from recsys.platform.db import get_engine

log = logging.getLogger(__name__)


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
