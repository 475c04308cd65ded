"""Worker heartbeats in the broker's Redis: who is alive, what it holds, and lease renewal on a timer."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time

from recsys.config import Settings
from recsys.jobs.retry import heartbeat_interval
from recsys.jobs.runner import active_jobs, processed_jobs, renew_leases
from recsys.jobs.store import readable
from recsys.platform import broker

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "recsys:worker:"


def record_heartbeat(worker_name: str, settings: Settings, **details) -> None:
    """Say "alive" for this worker process in the broker's Redis, expiring after three missed beats."""
    interval = heartbeat_interval(settings)
    payload = {"worker": worker_name, "pid": os.getpid(), "host": socket.gethostname(), "seen_at": time.time(),
               "active_jobs": active_jobs(), "processed": processed_jobs(), **details}
    broker.redis_client(settings).set(
        HEARTBEAT_PREFIX + worker_name, json.dumps(payload, default=str), ex=math.ceil(3 * interval)
    )


def clear_heartbeat(worker_name: str, settings: Settings) -> None:
    broker.redis_client(settings).delete(HEARTBEAT_PREFIX + worker_name)


def worker_status(settings: Settings) -> dict:
    """Live workers from their heartbeats: {"workers": [...], "alive": bool, "last_seen_seconds": float | None}."""
    try:
        client = broker.redis_client(settings)
        keys = sorted(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=500))
        values = client.mget(keys) if keys else []
    except Exception as exc:
        return {"workers": [], "alive": False, "last_seen_seconds": None, "error": f"broker unreachable: {exc}"}
    now = time.time()
    workers = []
    for value in values:
        if value is None:
            continue
        try:
            beat = json.loads(value)
        except ValueError:
            continue
        beat["last_seen_seconds"] = round(max(now - float(beat.get("seen_at", now)), 0.0), 3)
        workers.append(beat)
    last_seen = min((w["last_seen_seconds"] for w in workers), default=None)
    return {"workers": workers, "alive": bool(workers), "last_seen_seconds": last_seen}


class Heartbeat:
    """A daemon thread in each worker process: renews its job leases and records its heartbeat."""

    def __init__(self, worker_name: str, settings: Settings, **details) -> None:
        self.worker_name = worker_name
        self.settings = settings
        self.details = details
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsys-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            renew_leases(self.worker_name, self.settings)
        except Exception as exc:
            log.warning("could not renew job leases: %s", readable(exc))
        try:
            record_heartbeat(self.worker_name, self.settings, **self.details)
        except Exception as exc:
            log.warning("could not record heartbeat: %s", readable(exc))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(heartbeat_interval(self.settings))

    def stop(self) -> None:
        self._stop.set()
        try:
            clear_heartbeat(self.worker_name, self.settings)
        except Exception as exc:
            log.debug("could not clear heartbeat: %s", exc)


