"""Shared fixtures: a real embedded Postgres + pgvector and a real Valkey for the whole session.

Each test that touches the database gets its own database, cloned from a migrated template
(`CREATE DATABASE … TEMPLATE`), so tests may commit, COPY and refresh freely and still never
see each other's rows.

External mode (`make test-external`): with RECSYS_TEST_EXTERNAL=1, DATABASE_URL (a server with
pgvector, any database on it) and CELERY_BROKER_URL (a Redis) name servers this session neither
starts nor stops; the template and per-test databases are created on that server and dropped
after. The two variables are taken out of the environment so that nothing else reads them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from support import workers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recsys.config import Settings, set_settings  # noqa: E402
from recsys.platform import (
    embedded,  # noqa: E402
    migrations,
)
from recsys.platform.db import dispose_engines, get_engine  # noqa: E402
from recsys.recommend.cache import flush_hits  # noqa: E402

TEMPLATE_DB = "recsys_template"
_database_ids = itertools.count()

EXTERNAL = os.environ.get("RECSYS_TEST_EXTERNAL", "") not in ("", "0")
EXTERNAL_DATABASE_URL = os.environ.pop("DATABASE_URL", None) if EXTERNAL else None
EXTERNAL_BROKER_URL = os.environ.pop("CELERY_BROKER_URL", None) if EXTERNAL else None
if EXTERNAL and not (EXTERNAL_DATABASE_URL and EXTERNAL_BROKER_URL):
    raise pytest.UsageError("RECSYS_TEST_EXTERNAL=1 needs DATABASE_URL and CELERY_BROKER_URL")


def on_database(settings: Settings, name: str) -> Settings:
    """The same settings pointed at database `name` on the same server (embedded or external)."""
    if settings.database_url is None:
        return settings.with_(db_name=name)
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url).set(database=name)
    return settings.with_(db_name=name, database_url=url.render_as_string(hide_password=False))


def pytest_collection_modifyitems(config, items):
    """gpu tests run only where CUDA is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def test_home():
    """A short path (unix socket names are limited to ~107 bytes)."""
    home = Path(tempfile.mkdtemp(prefix="recsys-test-", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def base_settings(test_home) -> Settings:
    settings = Settings(
        home=test_home,
        db_name=TEMPLATE_DB,
        broker_port=free_port(),
        # the built-in default (`learned`) needs a trained model; tests that want one train it themselves
        ranker="retrieval",
        model_cache=Path(os.environ.get("RECSYS_TEST_MODEL_CACHE", Path.home() / ".cache" / "recsys-test-models")),
    )
    if EXTERNAL:
        settings = on_database(settings.with_(database_url=EXTERNAL_DATABASE_URL, broker_url=EXTERNAL_BROKER_URL),
                               TEMPLATE_DB)
    return settings


@pytest.fixture(scope="session")
def postgres(base_settings):
    """The session's Postgres (embedded, or the external server), with a template database at the
    latest migration."""
    if EXTERNAL:
        _admin_execute(base_settings, f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        _admin_execute(base_settings, f'CREATE DATABASE "{TEMPLATE_DB}"')
    else:
        embedded.start_postgres(base_settings)
    migrations.upgrade(base_settings)
    dispose_engines()
    yield base_settings
    dispose_engines()
    if EXTERNAL:
        _admin_execute(base_settings, f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
    else:
        embedded.stop_postgres(base_settings)


def _admin_execute(settings: Settings, statement: str) -> None:
    from sqlalchemy import create_engine, text

    from recsys.platform.db import database_url

    engine = create_engine(database_url(on_database(settings, "postgres")), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


@pytest.fixture
def db(postgres) -> Settings:
    """Settings pointing at a fresh database of this test's own, at the latest migration."""
    name = f"recsys_test_{os.getpid()}_{next(_database_ids)}"
    _admin_execute(postgres, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    settings = on_database(postgres, name)
    set_settings(settings)
    yield settings
    set_settings(None)
    flush_hits()  # the test's cache hits reach its database and the broker now, not in a later test
    dispose_engines()
    _admin_execute(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db(postgres) -> Settings:
    """A fresh database with no schema at all, for migration tests."""
    name = f"recsys_empty_{os.getpid()}_{next(_database_ids)}"
    _admin_execute(postgres, f'CREATE DATABASE "{name}"')
    settings = on_database(postgres, name)
    yield settings
    dispose_engines()
    _admin_execute(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def broker(base_settings):
    """The session's Valkey on a free loopback port (or the external Redis, left running)."""
    if EXTERNAL:
        yield base_settings
        return
    embedded.start_broker(base_settings)
    yield base_settings
    embedded.stop_broker(base_settings)


@pytest.fixture
def engine(db):
    return get_engine(db)


SAMPLE_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
SAMPLE_ROWS = [
    "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850,United Kingdom",
    "536365,22224,WHITE LOVEBIRD LANTERN,2,2010-12-01 08:26:00,2.95,17850,United Kingdom",
    "536366,21669,BLUE STRIPE CERAMIC DRAWER KNOB,12,2010-12-02 09:00:00,1.25,17850,United Kingdom",
    "536367,15056N,EDWARDIAN PARASOL NATURAL,3,2010-12-03 10:00:00,5.95,15781,United Kingdom",
    "536367,21669,BLUE STRIPE CERAMIC DRAWER KNOB,12,2010-12-03 10:00:00,1.25,15781,United Kingdom",
    "536367,22224,WHITE LOVEBIRD LANTERN,12,2010-12-03 10:00:00,2.95,15781,United Kingdom",
    "536368,22340,NOEL GARLAND PAINTED ZINC,24,2010-12-04 11:00:00,0.65,15781,United Kingdom",
    "536369,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-05 12:00:00,2.55,12583,France",
    "536369,84879,ASSORTED COLOUR BIRD ORNAMENT,32,2010-12-05 12:00:00,1.69,12583,France",
    "536370,23084,RABBIT NIGHT LIGHT,24,2010-12-06 13:00:00,1.79,12583,France",
    "536370,POST,POSTAGE,1,2010-12-06 13:00:00,18.00,12583,France",
    "536371,20725,LUNCH BAG RED RETROSPOT,10,2010-12-07 14:00:00,1.65,13047,United Kingdom",
    "536371,23206,LUNCH BAG APPLE DESIGN,10,2010-12-07 14:00:00,1.65,13047,United Kingdom",
    "536372,21731,RED TOADSTOOL LED NIGHT LIGHT,24,2010-12-08 15:00:00,1.65,13047,United Kingdom",
    "536373,90001B,COPPER AND BRASS BAG CHARM,4,2010-12-09 16:00:00,2.10,14000,United Kingdom",
    "536373,90001C,IVORY GOLD METAL BAG CHARM,4,2010-12-09 16:00:00,2.10,14000,United Kingdom",
    "536373,90001D,WHITE WITH METAL BAG CHARM,4,2010-12-09 16:00:00,2.10,14000,United Kingdom",
    "536374,21754,HOME BUILDING BLOCK WORD,3,2010-12-10 09:00:00,5.95,14000,United Kingdom",
    "536374,82482,WOODEN PICTURE FRAME WHITE FINISH,6,2010-12-10 09:00:00,2.55,14000,United Kingdom",
    "536375,22728,ALARM CLOCK BAKELIKE PINK,4,2010-12-11 10:00:00,3.75,15781,United Kingdom",
]


@pytest.fixture
def sample_csv(tmp_path) -> Path:
    """A small, clean Online Retail file with known customers and products."""
    path = tmp_path / "sample.csv"
    path.write_text(SAMPLE_HEADER + "\n".join(SAMPLE_ROWS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def loaded_db(db, sample_csv) -> Settings:
    """A test database with the sample file ingested and embedded."""
    from recsys.catalog.embedding import embed_products
    from recsys.catalog.ingest import ingest_file

    ingest_file(sample_csv, db)
    embed_products(db)
    return db


@pytest.fixture(scope="session")
def tiny_llm(base_settings):
    """A two-layer random-weight Gemma 3 with the packaged model's real tokenizer (built in milliseconds).

    The tokenizer is extracted from the packaged GGUF once per machine into the test model cache.
    """
    from support.synthetic import packaged_tokenizer, random_model, tiny_gemma3_config

    tokenizer = packaged_tokenizer(base_settings.models_dir / "tokenizer-gemma-3-270m")
    return random_model(tiny_gemma3_config(len(tokenizer)), tokenizer, name="tiny-gemma3-random")


# ---------------------------------------------------------------- jobs and the worker (issue 5)

WORKER_TEST_ENV = {
    "RECSYS_RANKER": "retrieval",
    "RECSYS_JOB_STALE_SECONDS": "3",
    "RECSYS_BATCH_WAIT_MS": "20",
    "RECSYS_LOG_LEVEL": "INFO",
}


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for a test worker: the test database and broker as external URLs, fast test timings."""
    return workers.worker_env(settings, **{**WORKER_TEST_ENV, **overrides})


@pytest.fixture
def flushed_broker(broker):
    """The session broker with no messages or heartbeats left over from other tests (their API submissions' messages
    pushed by this process's relay first, so none lands after the flush)."""
    import redis

    from recsys.jobs import relay

    relay.flush()
    redis.Redis.from_url(broker.celery_broker_url).flushall()
    yield broker


@pytest.fixture
def start_worker(tmp_path, flushed_broker):
    """Start real worker processes: `start_worker(settings, beat=False, **env)`; all are stopped after the test."""
    started: list[workers.WorkerProcess] = []

    def start(settings: Settings, *, beat: bool = False, pool: str = "prefork", ready: bool = True,
              **env: str) -> workers.WorkerProcess:
        worker = workers.WorkerProcess(settings, worker_env(settings, **env), tmp_path / f"worker-{len(started)}.log",
                                       beat=beat, pool=pool)
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


from web_fixtures import admin_client, api_key, app, auth_headers, client, runner  # noqa: E402,F401
