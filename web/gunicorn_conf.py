"""gunicorn settings for `recsys serve`: shared secret and metrics folder for all workers, tidy exits."""

import os
import secrets
import shutil
import tempfile
import warnings

from recsys.config import Settings
from recsys.platform import embedded, logs
from recsys.platform.process import freeze_loaded_objects

# Both must be in the environment before the workers fork and import the app.
os.environ.setdefault("RECSYS_SECRET_KEY", secrets.token_hex(32))
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="recsys-metrics-")

# Resolve the embedded services' URLs once here, instead of probing the Postgres data folder for its
# socket on every request in every worker.
for _name, _value in embedded.service_env(Settings.from_env()).items():
    os.environ.setdefault(_name, _value)

# The embedded-Postgres helper warns about XDG_RUNTIME_DIR on import; the workers inherit this filter.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

worker_class = "gthread"
# gunicorn's control socket is one fixed path per user; several servers (tests, benches) would fight over it.
control_socket_disable = True
timeout = 60
graceful_timeout = 20
keepalive = 5
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
loglevel = os.environ.get("RECSYS_LOG_LEVEL", "info").lower()
# RECSYS_LOG_FORMAT=json: gunicorn's error and access logs and the app's loggers, one JSON object a line
_json_logging = logs.gunicorn_logconfig(Settings.from_env())
if _json_logging:
    logconfig_dict = _json_logging


def on_starting(server):
    """Read the query encoder's weights once in the master, before it listens and forks: every worker shares
    them (copy-on-write) and starts with them loaded. Nothing runs in the master (no BLAS or tokenizer
    threads before the fork); each worker's warm-up below does the first encoding."""
    from recsys.catalog.embedding import resolve_model_path
    from recsys.catalog.query_encoder import light_encoder_for

    light_encoder_for(resolve_model_path(Settings.from_env().embedding_model))


def post_worker_init(worker):
    """Freeze what the process loaded (`freeze_loaded_objects`; bench/api.py's baseline server does the same,
    so both are measured alike), then warm it (web.health.start_warm_up); /health says "warming" until that
    is done."""
    from web import health

    freeze_loaded_objects()
    health.start_warm_up(worker.wsgi.config["RECSYS_SETTINGS"])


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
