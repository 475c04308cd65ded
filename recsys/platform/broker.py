"""Sends work to the Celery worker by task name, exactly as any other backend would.

The core never imports `worker`: it only knows the task names and queues below, which
`worker.tasks` registers. A Celery app made from the settings' broker URL is kept per
process (a forked child builds its own), with short connection timeouts so that a broker
that is down makes a submit fail fast instead of hanging; the job row stays queued and the
sweeper sends it later.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery

from recsys.config import Settings

log = logging.getLogger(__name__)

RERANK_TASK = "recsys.rerank"
SUBMIT_TASK = "recsys.submit"
DISCOVER_TASK = "recsys.discover"
SWEEP_TASK = "recsys.sweep"
RERANK_QUEUE = "rerank"
DEFAULT_QUEUE = "celery"

_apps: dict[tuple[int, str], Celery] = {}
_lock = threading.Lock()


class BrokerUnavailable(RuntimeError):
    """The broker could not take the message; the job row is kept and re-sent later."""


def client_config(broker_url: str) -> dict:
    """Settings shared by the sending client and the worker app: JSON only, fail fast on a dead broker.

    The client has no result backend: it only sends (a backend would also retry for ~20 s on a dead broker).
    """
    return {
        "broker_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_timeout": 2.0,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"socket_connect_timeout": 1.0, "socket_timeout": 5.0},
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        "task_default_queue": DEFAULT_QUEUE,
    }


def client(settings: Settings) -> Celery:
    """This process's sending app for the settings' broker."""
    url = settings.celery_broker_url
    key = (os.getpid(), url)
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = Celery("recsys-client", set_as_current=False)
            app.conf.update(client_config(url))
            _apps[key] = app
        return app


def send_rerank(job_id: str, settings: Settings, *, countdown: float | None = None) -> None:
    """Queue `recsys.rerank(job_id)` on the rerank queue; the Celery task id is the job id."""
    try:
        client(settings).send_task(
            RERANK_TASK, args=[str(job_id)], queue=RERANK_QUEUE, task_id=str(job_id), countdown=countdown
        )
    except Exception as exc:
        raise BrokerUnavailable(f"broker {settings.celery_broker_url} did not take job {job_id}: {exc}") from exc


_redis_clients: dict[tuple[int, str], object] = {}


def redis_client(settings: Settings):
    """This process's plain Redis client on the broker, for small shared state (heartbeats, login counters)."""
    import redis

    key = (os.getpid(), settings.celery_broker_url)
    with _lock:
        client = _redis_clients.get(key)
        if client is None:
            client = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2, socket_connect_timeout=1)
            _redis_clients[key] = client
        return client


def reset_clients() -> None:
    """Close this process's broker connections (tests that stop a broker)."""
    with _lock:
        for app in _apps.values():
            app.close()
        _apps.clear()
        for redis in _redis_clients.values():
            redis.close()
        _redis_clients.clear()
