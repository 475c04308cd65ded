"""Engine and sessions. One engine per database URL per process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from recsys.config import Settings

T = TypeVar("T")

_engines: dict[tuple[int, str, str], Engine] = {}
_lock = threading.Lock()


def database_url(settings: Settings) -> str:
    """SQLAlchemy URL: the external `DATABASE_URL`, else the embedded server's socket."""
    if settings.database_url:
        return settings.sqlalchemy_url
    from recsys.platform.embedded import embedded_database_url

    return embedded_database_url(settings)


def database_key(settings: Settings) -> str:
    """Which database the settings name, without touching the disk (the embedded socket is found once)."""
    if settings.database_url:
        return settings.sqlalchemy_url
    return f"embedded:{settings.pgdata}:{settings.db_name}"


def get_engine(settings: Settings) -> Engine:
    """The process's engine for these settings; a forked child gets its own pool.

    Called on every database access, so the lookup is a dict read: the URL (for the embedded
    server, found from its postmaster.pid) is worked out only when the engine is made.
    """
    return _process_engine(settings, "default", pool_pre_ping=True)


def _autocommit_engine(settings: Settings) -> Engine:
    """A pool of its own in autocommit mode and without the check-out ping, for `read_once` and `run_bare`.

    A pooled read otherwise makes four round trips: the check-out ping, BEGIN, the query and the
    ROLLBACK on return; here only the query is sent (py-spy put the other three at about 60% of an
    API job read's wall time on two loaded cores). Nothing is reset on return: no transaction is open.

    Its sessions keep generic plans for prepared statements (psycopg prepares a statement from its fifth
    run): left to choose, Postgres planned the result-cache probe afresh on every run, 360 µs of its CPU
    instead of 140. The pool serves only short statements by key, for which one plan fits every value.
    """
    return _process_engine(settings, "autocommit", pool_pre_ping=False, isolation_level="AUTOCOMMIT",
                           pool_reset_on_return=None,
                           connect_args={"options": "-c plan_cache_mode=force_generic_plan"})


def _process_engine(settings: Settings, kind: str, **options) -> Engine:
    """This process's engine of one kind for the database the settings name, made once."""
    key = (os.getpid(), database_key(settings), kind)
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_engine(database_url(settings), pool_size=5, max_overflow=10, **options)
            event.listen(engine, "checkout", _register_vector_types)
            _engines[key] = engine
        return engine


def read_once(settings: Settings, read: Callable[[Connection], T]) -> T:
    """`read(conn)` on an autocommit connection that is not pinged first; `read` must only read.

    A connection that turns out dead (the server restarted since it was last used) is dropped
    with the rest of the pool, and the read runs once more on a fresh one, which is what the ping
    would have done, paid only when it is needed.
    """
    engine = _autocommit_engine(settings)
    try:
        with engine.connect() as conn:
            return read(conn)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with engine.connect() as conn:
        return read(conn)


def run_bare(settings: Settings, work: Callable[[psycopg.Cursor], T]) -> T:
    """`work(cursor)` on a psycopg cursor of its own, on a connection of the autocommit, unpinged pool `read_once`
    uses: each statement is its own transaction, committed (durably, with the server's synchronous_commit) when
    it returns.

    For the API's busiest statements: SQLAlchemy's statement layer (compiled-statement lookup, result
    metadata) costs about 110 µs a statement here, more than a small query itself, and checking a connection
    out of the pool and back in, or making a cursor, is a few tens more; so run_bare keeps a few connections
    checked out for itself, each with its cursor (`_Kept`). Errors are raised as SQLAlchemy's (OperationalError,
    DataError, ...) so callers and error handlers see one kind; a dead connection is dropped with the rest of
    the pool and `work` runs once more, so it must be safe to repeat.
    """
    engine = _autocommit_engine(settings)
    try:
        return _on_kept_connection(engine, work)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return _on_kept_connection(engine, work)


class _Kept:
    """Connections of one engine's pool that stay checked out between `run_bare` calls, each with a cursor, at
    most `size` idle.

    Taking one is a list pop (a pool check-out and check-in cost ~7 µs alone, several times that inside a
    request; a new cursor ~13). Only a connection that ends idle, outside any transaction, is kept; a dead
    one is invalidated and the engine disposed, as before.
    """

    size = 5

    def __init__(self):
        self.idle: list = []

    def take(self, engine: Engine) -> tuple:
        try:
            return self.idle.pop()  # atomic: threads never get the same connection
        except IndexError:
            pooled = engine.raw_connection()
            return pooled, pooled.driver_connection.cursor()

    def give_back(self, kept: tuple) -> None:
        pooled = kept[0]
        status = pooled.driver_connection.info.transaction_status
        if status != psycopg.pq.TransactionStatus.IDLE:
            pooled.invalidate()
        elif len(self.idle) < self.size:
            self.idle.append(kept)
        else:
            pooled.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[0].invalidate()


_kept: dict[Engine, _Kept] = {}
os.register_at_fork(after_in_child=_kept.clear)  # a forked child never touches its parent's connections


def _on_kept_connection(engine: Engine, work: Callable[[psycopg.Cursor], T]) -> T:
    kept = _kept.get(engine) or _kept.setdefault(engine, _Kept())
    connection = kept.take(engine)
    pooled, cursor = connection
    try:
        result = work(cursor)
    except psycopg.Error as exc:
        dead = bool(pooled.driver_connection.broken or pooled.driver_connection.closed)
        if dead:
            pooled.invalidate(exc)
            kept.close()
            engine.dispose()
        else:
            kept.give_back(connection)
        raise DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=dead) from exc
    except BaseException:
        kept.give_back(connection)
        raise
    kept.give_back(connection)
    return result


def fetch_binary(conn: Connection, statement, params: dict) -> list[tuple]:
    """Every row of `statement` (a SQLAlchemy `text`), run on `conn` inside its transaction with the rows sent in
    binary: numbers travel as their bytes instead of text Postgres prints and Python parses back (for the
    candidate statement, 3,200 rows a half batch: ~1.5 ms less Postgres time and ~1.5 ms less of this process's
    CPU per half). The values are the same (float8 bits, text, numeric as Decimal); rows are plain tuples.
    Errors are raised as SQLAlchemy's, as `conn.execute` would."""
    driver_sql = _driver_sql.get(statement)
    if driver_sql is None:
        driver_sql = _driver_sql.setdefault(statement, str(statement.compile(dialect=conn.dialect)))
    cursor = conn.connection.driver_connection.cursor(binary=True)
    try:
        cursor.execute(driver_sql, params)
        return cursor.fetchall()
    except psycopg.Error as exc:
        dead = bool(conn.connection.driver_connection.broken)
        if dead:
            conn.invalidate(exc)
        raise DBAPIError.instance(driver_sql, params, exc, psycopg.Error, connection_invalidated=dead) from exc
    finally:
        cursor.close()


_driver_sql: dict = {}


class VectorArray(list):
    """Vectors (numpy arrays, or None) for one `vector[]` parameter, sent in binary: psycopg dumps a plain
    list's elements as text, ~0.4 ms of Python for each 384-float vector. The values are the same float32s."""


def _register_vector_types(dbapi_connection, connection_record, connection_proxy) -> None:
    """pgvector's psycopg types on each pooled connection: numpy arrays go to SQL as `vector` (binary),
    and vectors come back as `pgvector.Vector`.

    Done at checkout until it succeeds, not at connect: a database is connected to before its
    first migration creates the extension (then the type is missing and the next checkout tries again).
    """
    if connection_record.info.get("vector_types"):
        return
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        register_vector(dbapi_connection)
        dbapi_connection.adapters.register_dumper(VectorArray, ListBinaryDumper)
        connection_record.info["vector_types"] = True
    except psycopg.ProgrammingError:
        pass
    finally:
        dbapi_connection.autocommit = autocommit


def dispose_engines() -> None:
    with _lock:
        for kept in _kept.values():
            kept.close()
        _kept.clear()
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(bind=get_engine(settings), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
