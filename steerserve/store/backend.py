"""The manifest's database engines: SQLite (one machine, the default) or PostgreSQL (replicas share it).

Both give ``write``, a transaction that holds the store's one write lock from its first statement, and
``read``, one that never waits for it. Every writer in every process that shares the manifest runs alone:
version allocation and orphan cleanup (``db.remove_orphans``) rely on that.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


def make_engine(target: Path | str, metadata: sa.MetaData) -> Engine:
    """An engine for the manifest that threads (and other processes) may share, with ``metadata``'s tables.

    ``target`` is a SQLite file (a ``Path``) or a PostgreSQL URL (``postgresql://user@host/db``), which
    several server replicas share; their artifact files then live on storage they share too.
    """
    if isinstance(target, str):
        if not target.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError("the store URL must be postgresql://... (or leave it unset for the SQLite file)")
        return _postgres_engine(target, metadata)
    return _sqlite_engine(target, metadata)


def _sqlite_engine(path: Path, metadata: sa.MetaData) -> Engine:
    """pysqlite's own transaction handling issues a deferred BEGIN lazily, which would let two writers both
    read the same "next version" and collide at commit. It is switched off here and the ``begin`` event
    emits the BEGIN itself, IMMEDIATE when the connection asks for it (see ``write``), so a writer holds
    SQLite's write lock from the moment it reads the counter until it commits, across processes too.
    """
    # timeout: how long a writer waits for another process's write lock before failing.
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # WAL lets readers (generation requests) proceed while an upload writes; FULL makes a committed
        # row survive power loss, matching the fsync of the file it points to.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("steerserve_immediate") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    _create(engine, metadata)
    return engine


# PostgreSQL has no database-wide write lock like SQLite's, so ``write`` takes this transaction-scoped
# advisory lock: writers in every replica run one at a time, exactly as on SQLite, which is what version
# allocation and ``remove_orphans`` rely on. Readers never take it. Postgres drops it when a writer's
# transaction ends or its connection dies, so a killed replica cannot leave it held.
WRITE_LOCK_KEY = 0x5751_5E55  # any fixed 64-bit number; only steerserve's tables live in its database


def _postgres_engine(url: str, metadata: sa.MetaData) -> Engine:
    """READ COMMITTED (PostgreSQL's default, pinned here): each statement after the lock sees every write
    committed before the lock was granted. Under REPEATABLE READ the snapshot would predate the wait, and
    two writers could allocate the same version. ``pool_pre_ping``: survive a database restart."""
    if importlib.util.find_spec("psycopg") is None:
        raise RuntimeError("a PostgreSQL store needs the postgres extra (psycopg): "
                           "STEERSERVE_EXTRAS=postgres ./deploy/install.sh")
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)  # psycopg 3, not SQLAlchemy's psycopg2
    engine = sa.create_engine(url, pool_pre_ping=True, isolation_level="READ COMMITTED")
    _create(engine, metadata)
    return engine


def _create(engine: Engine, metadata: sa.MetaData) -> None:
    """Create the missing tables, and add the nullable columns a store made by an older release lacks (its
    rows read them as NULL), under the write lock: processes and replicas opening one store together would
    otherwise race to CREATE TABLE or ALTER TABLE (both backends' DDL is transactional, so the second finds
    the work done and does nothing)."""
    with write(engine) as conn:
        metadata.create_all(conn)
        inspector = sa.inspect(conn)
        for table in metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(WRITE_LOCK_KEY)))


@contextlib.contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A transaction holding the store's write lock from its first statement; commits on normal exit.

    The lock is SQLite's (BEGIN IMMEDIATE) or PostgreSQL's advisory lock: one writer at a time, in every
    process and replica that shares the manifest."""
    with engine.connect() as conn:
        conn = conn.execution_options(steerserve_immediate=True)
        with conn.begin():
            _lock(conn)
            yield conn


@contextlib.contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: a consistent snapshot on SQLite (WAL: never blocks writers); on PostgreSQL
    each statement sees what was committed when it started, and never waits for the write lock."""
    with engine.connect() as conn, conn.begin():
        yield conn
