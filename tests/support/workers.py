"""A real `celery -A worker.app worker` subprocess pointed at a given database and broker.

Used by the tests (conftest's `start_worker`) and by bench/jobs.py, so both run the worker exactly
as `recsys worker` does, configured only through the environment.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

from recsys import jobs
from recsys.cli.jobs import worker_argv
from recsys.config import Settings
from recsys.platform import embedded

_names = itertools.count()


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """This process's environment without recsys settings, plus `settings`' database and broker as URLs."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RECSYS_", "DATABASE_URL", "CELERY_"))}
    env.update(embedded.service_env(settings))
    env.update({"RECSYS_HOME": str(settings.home), "RECSYS_MODEL_CACHE": str(settings.models_dir),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(overrides)
    return env


class WorkerProcess:
    """One worker (its pool children included), started at construction and stopped by `stop`."""

    def __init__(self, settings: Settings, env: dict[str, str], log_path: Path, *, beat: bool = False,
                 pool: str = "prefork", concurrency: int = 1, loglevel: str = "INFO", prefix: str = "test") -> None:
        self.settings = settings
        self.log_path = log_path
        self.concurrency = concurrency if pool == "prefork" else 1
        argv = worker_argv(settings, pool=pool, beat=beat, concurrency=concurrency, loglevel=loglevel,
                           name=f"{prefix}-{os.getpid()}-{next(_names)}@%h")
        self._log = open(log_path, "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Until the heartbeats of every process that runs tasks (each pool child) say its models are loaded; the
        first one's heartbeat. Returning at the first, a run timed from here had the other children still loading
        their models (seconds of CPU on the same cores) while they took no jobs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            pids = self.pids()
            ready = [beat for beat in jobs.worker_status(self.settings)["workers"]
                     if beat.get("ready") and beat["pid"] in pids]
            if len({beat["pid"] for beat in ready}) >= self.concurrency:
                return ready[0]
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()}")

    def pids(self) -> set[int]:
        """The worker's main process and its pool children."""
        pids = {self.proc.pid}
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return pids | {int(pid) for pid in children}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
