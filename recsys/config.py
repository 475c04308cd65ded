"""The one settings object, read from the environment.

Every knob of the system is a field here; the README and `.env.example` list them.
`DATABASE_URL` and `CELERY_BROKER_URL` point at external services; when they are unset
the embedded Postgres and Valkey under `RECSYS_HOME` are used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _env(name, default).strip().lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# Requests per pass for offline work, the evaluation and training a ranker, unless they are told otherwise: fixed
# rather than a worker's RECSYS_BATCH_SIZE, so their numbers and models do not follow a deployment's setting
# (float32 query vectors and an LLM's padded passes can differ in their last bits with the batch).
OFFLINE_BATCH_SIZE = 32


@dataclass(frozen=True)
class Settings:
    """All configuration. Build with `Settings.from_env()`; override with `.with_(...)`."""

    home: Path = field(default_factory=lambda: Path(".recsys").resolve())
    database_url: str | None = None
    broker_url: str | None = None
    db_name: str = "recsys"
    broker_port: int = 6390
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_batch_size: int = 128
    query_dtype: str = "auto"
    ef_search: int = 100
    retrieve_k: int = 100
    vector_candidates: int = 50
    repeat_candidates: int = 50
    copurchase_candidates: int = 50
    popular_candidates: int = 20
    query_pool: int = 100
    llm_model: str = "packaged:gemma-3-270m"
    model_cache: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    ranker: str = "learned"
    max_candidates: int = 20
    verbalizer_permutations: int = 3
    batch_size: int = 64
    batch_wait_ms: int = 50
    job_max_attempts: int = 3
    job_stale_seconds: int = 60
    job_time_limit: int = 600
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    secret_key: str | None = None
    secure_cookies: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    embedding_type: str = "vector"

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(_env("RECSYS_HOME", ".recsys")).expanduser().resolve()
        cache = _env("RECSYS_MODEL_CACHE")
        return cls(
            home=home,
            database_url=_env("DATABASE_URL"),
            broker_url=_env("CELERY_BROKER_URL"),
            db_name=_env("RECSYS_DB_NAME", cls.db_name),
            broker_port=_int("RECSYS_BROKER_PORT", cls.broker_port),
            embedding_model=_env("RECSYS_EMBEDDING_MODEL", cls.embedding_model),
            embedding_batch_size=_int("RECSYS_EMBEDDING_BATCH_SIZE", cls.embedding_batch_size),
            query_dtype=_env("RECSYS_QUERY_DTYPE", cls.query_dtype),
            ef_search=_int("RECSYS_EF_SEARCH", cls.ef_search),
            retrieve_k=_int("RECSYS_RETRIEVE_K", cls.retrieve_k),
            vector_candidates=_int("RECSYS_VECTOR_CANDIDATES", cls.vector_candidates),
            repeat_candidates=_int("RECSYS_REPEAT_CANDIDATES", cls.repeat_candidates),
            copurchase_candidates=_int("RECSYS_COPURCHASE_CANDIDATES", cls.copurchase_candidates),
            popular_candidates=_int("RECSYS_POPULAR_CANDIDATES", cls.popular_candidates),
            query_pool=_int("RECSYS_QUERY_POOL", cls.query_pool),
            llm_model=_env("RECSYS_LLM_MODEL", cls.llm_model),
            model_cache=Path(cache).expanduser().resolve() if cache else None,
            device=_env("RECSYS_DEVICE", cls.device),
            dtype=_env("RECSYS_DTYPE", cls.dtype),
            ranker=_env("RECSYS_RANKER", cls.ranker),
            max_candidates=_int("RECSYS_MAX_CANDIDATES", cls.max_candidates),
            verbalizer_permutations=_int("RECSYS_VERBALIZER_PERMUTATIONS", cls.verbalizer_permutations),
            batch_size=_int("RECSYS_BATCH_SIZE", cls.batch_size),
            batch_wait_ms=_int("RECSYS_BATCH_WAIT_MS", cls.batch_wait_ms),
            job_max_attempts=_int("RECSYS_JOB_MAX_ATTEMPTS", cls.job_max_attempts),
            job_stale_seconds=_int("RECSYS_JOB_STALE_SECONDS", cls.job_stale_seconds),
            job_time_limit=_int("RECSYS_JOB_TIME_LIMIT", cls.job_time_limit),
            web_host=_env("RECSYS_WEB_HOST", cls.web_host),
            web_port=_int("RECSYS_WEB_PORT", cls.web_port),
            secret_key=_env("RECSYS_SECRET_KEY"),
            secure_cookies=_bool("RECSYS_SECURE_COOKIES", cls.secure_cookies),
            log_level=_env("RECSYS_LOG_LEVEL", cls.log_level),
            log_format=_choice("RECSYS_LOG_FORMAT", cls.log_format, ("text", "json")),
            embedding_type=_choice("RECSYS_EMBEDDING_TYPE", cls.embedding_type, ("vector", "halfvec")),
        )

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def broker_dir(self) -> Path:
        return self.home / "valkey"

    @property
    def models_dir(self) -> Path:
        return self.model_cache or (self.home / "models")

    @property
    def uses_embedded_db(self) -> bool:
        """No DATABASE_URL, or the one `recsys services env` prints: this home's own server socket and database."""
        return self.database_url is None or _names_embedded_postgres(self.database_url, self.pgdata, self.db_name)

    @property
    def uses_embedded_broker(self) -> bool:
        """No CELERY_BROKER_URL, or one naming the embedded Valkey's own loopback port."""
        if self.broker_url is None:
            return True
        parts = urlsplit(self.broker_url)
        return (parts.scheme == "redis" and parts.hostname in ("127.0.0.1", "localhost")
                and parts.port == self.broker_port)

    @property
    def sqlalchemy_url(self) -> str:
        """The external database URL in SQLAlchemy form (psycopg 3 driver); see `recsys.platform.db.database_url`."""
        url = self.database_url or ""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"redis://127.0.0.1:{self.broker_port}/0"


def _names_embedded_postgres(url: str, pgdata: Path, db_name: str) -> bool:
    """The URL reaches `db_name` through the unix socket of the server whose data folder is `pgdata`.

    The socket is in pgdata, or where postmaster.pid says (line 5) when pgdata's path is too long for one.
    """
    parts = urlsplit(url)
    host = (parse_qs(parts.query).get("host") or [parts.hostname or ""])[0]
    if not host.startswith("/") or parts.path.lstrip("/") != db_name:
        return False
    sockets = {pgdata.resolve()}
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        lines = []
    if len(lines) > 4 and lines[4].strip():
        sockets.add(Path(lines[4].strip()).resolve())
    return Path(host).resolve() in sockets


# settings read from a variable other than RECSYS_<FIELD NAME>
_ENV_VAR_EXCEPTIONS = {"home": "RECSYS_HOME", "database_url": "DATABASE_URL", "broker_url": "CELERY_BROKER_URL"}


def setting_env_vars() -> dict[str, str]:
    """Each setting's environment variable (field name -> variable), the one list that `.env.example`,
    docker-compose.yml and the deployment checks are compared with (tests/test_deploy.py holds
    `from_env` to it)."""
    return {f.name: _ENV_VAR_EXCEPTIONS.get(f.name, f"RECSYS_{f.name.upper()}") for f in fields(Settings)}


def setting_names() -> list[str]:
    """Field names, for documentation checks."""
    return [f.name for f in fields(Settings)]


_settings: Settings | None = None


def get_settings() -> Settings:
    """Process-wide settings, read once."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def set_settings(settings: Settings | None) -> None:
    """Replace the process-wide settings (tests, CLI options)."""
    global _settings
    _settings = settings
