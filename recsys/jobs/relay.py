"""Sends the messages of jobs the API has just queued, from one thread per process and broker, several per push.

A submission commits its job row (durably, with `sent_at`) and hands the job id to this relay instead of
pushing the message itself, so the request answers without touching the broker. The relay pushes a job handed
over after a quiet spell at once, then waits `PUSH_INTERVAL_SECONDS` before its next push, which carries every
message handed over meanwhile in one LPUSH (about 5 at 250 submissions/s into one process): under load it wakes
and pushes ~50 times a second whatever the rate, and a request's hand-over rarely has to wake it. The push does
not wait for the broker's reply either; the next push or a moment of quiet reads it (`broker.send_reranks`,
`broker.settle_pushes`). Messages the broker did not take clear their jobs' `sent_at`
and are left to the sweeper, as a refused push on the request thread always was; a process that ends
flushes its relay first (atexit), and one killed before its relay ran leaves committed rows with `sent_at`
set, which the sweeper re-sends once they are stale. Nothing accepted is lost.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time

from sqlalchemy import text

from recsys.config import Settings
from recsys.jobs.store import quick_commit, readable
from recsys.platform import broker
from recsys.platform.db import database_key

log = logging.getLogger(__name__)

# The least time between two pushes of a relay: what a message waits at most under load. A push costs the relay
# thread ~0.4 ms of CPU whatever it carries (its wake-ups, on 2 shared cores), so fewer, fuller pushes are cheaper
# (`bench/relay.py`: 5.1 messages a push at 250 submissions/s into one process).
PUSH_INTERVAL_SECONDS = 0.02
# With a push's reply still unread, how long the relay waits for more work before reading it anyway.
SETTLE_AFTER_SECONDS = 0.05
FLUSH_SECONDS = 10.0


class _Flush:
    """A marker put on a relay's queue: set once everything handed over before it was pushed and settled."""

    def __init__(self):
        self.done = threading.Event()


class Relay:
    """A relay for one broker and database in this process: a queue of job ids and the thread that pushes them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="recsys-relay", daemon=True)
        self.thread.start()

    def hand_over(self, job_id) -> None:
        self.queue.put(job_id)

    def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Push what was handed over so far and read the broker's replies; False if that took longer than `timeout`."""
        marker = _Flush()
        self.queue.put(marker)
        return marker.done.wait(timeout)

    def _run(self) -> None:
        unread = False
        while True:
            try:
                first = self.queue.get(timeout=SETTLE_AFTER_SECONDS if unread else None)
            except queue.Empty:
                broker.settle_pushes(self.settings)
                unread = False
                continue
            job_ids, markers = [], []
            for item in [first, *_drain(self.queue)]:
                (markers if isinstance(item, _Flush) else job_ids).append(item)
            try:
                if job_ids:
                    unread = self._push(job_ids)
                if markers:
                    broker.settle_pushes(self.settings)
                    unread = False
            finally:
                for marker in markers:
                    marker.done.set()
            if job_ids:
                time.sleep(PUSH_INTERVAL_SECONDS)  # what arrives meanwhile queues without waking this thread

    def _push(self, job_ids: list) -> bool:
        """Push these jobs' messages without waiting for the reply; whether a reply is left unread."""
        try:
            broker.send_reranks(job_ids, self.settings, wait=False,
                                on_lost=lambda error: leave_to_sweeper(job_ids, error, self.settings))
        except broker.BrokerUnavailable as exc:
            leave_to_sweeper(job_ids, exc, self.settings)
            return False
        return True


def _drain(items: queue.SimpleQueue) -> list:
    drained = []
    while True:
        try:
            drained.append(items.get_nowait())
        except queue.Empty:
            return drained


def leave_to_sweeper(job_ids, error: Exception, settings: Settings) -> None:
    """The broker did not take these jobs' messages: clear `sent_at` of those still queued, so the sweeper sends them
    at its next run (a job no longer queued was sent by another message meanwhile)."""
    ids = [str(job_id) for job_id in job_ids]
    if len(ids) == 1:
        log.warning("job %s stays queued until the sweeper re-sends it: %s", ids[0], readable(error))
    else:
        log.warning("jobs %s and %d more stay queued until the sweeper re-sends them: %s", ids[0], len(ids) - 1,
                    readable(error))
    try:
        with quick_commit(settings) as conn:
            conn.execute(text("UPDATE jobs SET sent_at = NULL "
                              "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'"), {"ids": ids})
    except Exception as exc:
        log.warning("%d jobs: their sent_at was not cleared (the sweeper sends them once stale): %s", len(ids),
                    readable(exc))


# One per process, broker and database: a relay clears sent_at in the database its jobs were committed to.
_relays: dict[tuple[int, str, str], Relay] = {}
_lock = threading.Lock()


def hand_over(job_id, settings: Settings) -> None:
    """Have this process's relay for the settings' broker and database send the job's message (started on first
    use)."""
    key = (os.getpid(), settings.celery_broker_url, database_key(settings))
    relay = _relays.get(key)
    if relay is None:
        with _lock:
            relay = _relays.get(key)
            if relay is None:
                relay = _relays[key] = Relay(settings)
    relay.hand_over(job_id)


def flush(timeout: float = FLUSH_SECONDS) -> bool:
    """Push everything this process's relays were handed and read the replies; False if one took too long."""
    pid = os.getpid()
    return all([relay.flush(timeout) for (owner, *_where), relay in list(_relays.items()) if owner == pid])


atexit.register(flush)
os.register_at_fork(after_in_child=_relays.clear)  # a forked child starts its own relays (threads do not fork)
