"""Lazy access to optional parts of the core (jobs, evaluation) and the checks behind /health.

Jobs and evaluation are imported on first use so the web layer starts quickly and still serves
catalog reads when one of them cannot be imported.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from types import ModuleType

from sqlalchemy import text

from recsys.config import Settings
from recsys.db import get_engine

log = logging.getLogger(__name__)


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def jobs_module() -> ModuleType | None:
    return _optional("recsys.jobs")


def latest_evaluation(settings: Settings) -> dict | None:
    report = _optional("recsys.evaluation.report")
    if report is None:
        return None
    return report.latest_report(settings)


def check_database(settings: Settings) -> dict:
    started = time.perf_counter()
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return {"ok": False, "error": str(exc).splitlines()[0][:200]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


_redis_clients: dict[str, object] = {}
_redis_lock = threading.Lock()


def check_broker(settings: Settings) -> dict:
    import redis

    url = settings.celery_broker_url
    with _redis_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            _redis_clients[url] = client
    started = time.perf_counter()
    try:
        client.ping()
    except Exception as exc:
        return {"ok": False, "error": str(exc).splitlines()[0][:200]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def check_workers(settings: Settings) -> dict:
    jobs = jobs_module()
    if jobs is None:
        return {"ok": False, "error": "the jobs module is not installed"}
    try:
        status = dict(jobs.worker_status(settings))
    except Exception as exc:
        log.warning("worker status unavailable: %s", exc)
        return {"ok": False, "error": str(exc).splitlines()[0][:200]}
    status["ok"] = bool(status.get("alive"))
    return status
