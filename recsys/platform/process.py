"""Set-up shared by the long-running processes that serve requests and jobs (gunicorn workers, Celery workers)."""

from __future__ import annotations

import gc
import os
import threading
from concurrent.futures import ThreadPoolExecutor

_threads: dict[tuple[int, str], ThreadPoolExecutor] = {}
_threads_lock = threading.Lock()


def process_thread(name: str) -> ThreadPoolExecutor:
    """This process's one thread called `name` that runs a stage's side work (the batch's histories, the
    first half of its candidates) while the caller does its own; made after a fork, never inherited.

    One thread: a task given to it must not wait on another task given to the same one.
    """
    key = (os.getpid(), name)
    with _threads_lock:
        executor = _threads.get(key)
        if executor is None:
            executor = _threads[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        return executor


def freeze_loaded_objects() -> None:
    """Move the objects a process holds once it has loaded its app and models (modules, classes, caches,
    weights' wrappers) out of the garbage collector's reach, so its full collections walk only what
    requests and jobs left behind.

    Unfrozen, a full collection walked them all and stopped every thread of the process: 120-450 ms in a web
    process (~130k objects) several times a minute under load, the slowest requests of a run; 350-380 ms in a
    worker process holding the embedding model (545k objects), once every few batches.
    """
    gc.freeze()
