"""Set-up shared by the long-running processes that serve requests and jobs (gunicorn workers, Celery workers)."""

from __future__ import annotations

import gc


def freeze_loaded_objects() -> None:
    """Move the objects a process holds once it has loaded its app and models (modules, classes, caches,
    weights' wrappers) out of the garbage collector's reach, so its full collections walk only what
    requests and jobs left behind.

    Unfrozen, a full collection walked them all and stopped every thread of the process: 120-450 ms in a web
    process (~130k objects) several times a minute under load, the slowest requests of a run; 350-380 ms in a
    worker process holding the embedding model (545k objects), once every few batches.
    """
    gc.freeze()
