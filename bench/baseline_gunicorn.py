"""gunicorn settings of `recsys serve` (web/gunicorn_conf.py) without its recsys hooks, for bench/baseline_app.py.

The server settings (worker class, timeouts, keep-alive, tmp dir) are imported from the real config so
the two servers stay alike; the hooks (query-encoder warm-up, metrics clean-up) are recsys's own work
and are left out: they need the recsys app and would count against the baseline. The garbage collector is set
up as in recsys's processes.
"""

from web.gunicorn_conf import (  # noqa: F401  (read by gunicorn)
    control_socket_disable,
    freeze_loaded_objects,
    graceful_timeout,
    keepalive,
    loglevel,
    timeout,
    worker_class,
    worker_tmp_dir,
)


def post_worker_init(worker):
    """Frozen once loaded, as recsys's workers are."""
    freeze_loaded_objects()
