"""The plain-SQL functions, views and types in `sql/`, installed by migrations.

Definitions are frozen per migration: `sql/<revision>/<object>.sql` is the object as that revision
made it, and is never edited afterwards. A migration that changes an object adds a new file under
its own revision and calls `install_objects(names, revision)`; its downgrade calls
`install_objects(names, down_revision)`, which puts back the newest earlier file of each name (or
drops the object if no earlier revision had one). So replaying migrations to any revision gives
that revision's definitions, and upgrading an existing database replaces what changed.

Objects are dropped and created rather than `CREATE OR REPLACE`d: that is the only form that also
works for a changed signature, removed view columns or a materialized view's new query. A
materialized view that held rows is refreshed after it is created again.
See migrations/README.md for the steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from sqlalchemy import Connection, text

_RELATION_DROPS = {"v": "DROP VIEW", "m": "DROP MATERIALIZED VIEW", "c": "DROP TYPE"}


def execute_raw(conn: Connection, statements: Iterable[str]) -> None:
    """Run SQL text verbatim on the connection's own transaction (no bind-parameter parsing of % or :)."""
    raw = conn.connection.driver_connection
    for statement in statements:
        raw.execute(statement)


def definition_file(sql_dir: Path, name: str, revisions: Iterable[str]) -> Path | None:
    """The file that defines `name` as of the first of `revisions` (newest first): the newest one that has it."""
    for revision in revisions:
        path = sql_dir / revision / f"{name}.sql"
        if path.is_file():
            return path
    return None


def drop_object(conn: Connection, name: str) -> bool:
    """Drop the view, materialized view, composite type or functions called `name` in the current schema.

    Without CASCADE: an object that others depend on is an error, so a migration names every
    object it replaces. Tables are refused (they change through Alembic operations). Returns
    whether something was dropped.
    """
    relkind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE relname = :name AND relnamespace = current_schema()::regnamespace"),
        {"name": name},
    ).scalar_one_or_none()
    if relkind is not None and relkind not in _RELATION_DROPS:
        raise ValueError(f"{name} is not a view, materialized view or type (relkind {relkind!r}); "
                         "change it with Alembic operations")
    routines = conn.execute(
        text("SELECT oid::regprocedure::text FROM pg_proc "
             "WHERE proname = :name AND pronamespace = current_schema()::regnamespace ORDER BY oid"),
        {"name": name},
    ).scalars().all()
    statements = [f"DROP ROUTINE {signature}" for signature in routines]
    if relkind is not None:
        statements.append(f'{_RELATION_DROPS[relkind]} "{name}"')
    execute_raw(conn, statements)
    return bool(statements)


def _populated_materialized_views(conn: Connection, names: Sequence[str]) -> set[str]:
    return set(conn.execute(
        text("SELECT matviewname FROM pg_matviews "
             "WHERE schemaname = current_schema() AND ispopulated AND matviewname = ANY(:names)"),
        {"names": list(names)},
    ).scalars())


def install_definitions(conn: Connection, sql_dir: Path, names: Sequence[str], revisions: Sequence[str]) -> None:
    """Replace each named object by its definition as of `revisions[0]` (`revisions` newest first).

    All are dropped first, last name first, then created in the given order, so list an object
    after the ones it uses. A name with no definition that early stays dropped.
    """
    populated = _populated_materialized_views(conn, names)
    for name in reversed(names):
        drop_object(conn, name)
    for name in names:
        path = definition_file(sql_dir, name, revisions)
        if path is None:
            continue
        execute_raw(conn, [path.read_text(encoding="utf-8")])
        if name in populated:
            execute_raw(conn, [f'REFRESH MATERIALIZED VIEW "{name}"'])


def install_objects(names: Sequence[str], revision: str | None) -> None:
    """From a migration: make the named objects what they were at `revision` (None: before any migration).

    Reads `sql/` beside the running migrations directory and walks the revision chain from
    `revision` down to the first one, so revision ids need not sort.
    """
    from alembic import context, op

    script = context.script
    revisions = [rev.revision for rev in script.iterate_revisions(revision, "base")] if revision else []
    install_definitions(op.get_bind(), Path(script.dir).parent / "sql", names, revisions)
