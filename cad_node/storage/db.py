"""Database access shared by the spool index and the job table (SQLAlchemy Core).

One place for: the engine and its connections, SQLite's pragmas, transactions,
schema versions and migrations.  A store names its database by URL:

``sqlite:////abs/path/file.sqlite``
    The embedded default: one file below ``storage_dir``, WAL mode.  Every
    process that opens it must run on the same host (WAL's shared memory).
``postgresql://user@host:port/db`` (or ``postgresql+psycopg://``)
    The scale-out choice: the receiver and workers on several hosts share
    one PostgreSQL server.  Plain ``postgresql://`` is read as psycopg 3.

Contract
--------
* :meth:`Database.write` is one transaction: committed when the block
  returns, rolled back when it raises.  On SQLite it starts with
  ``BEGIN IMMEDIATE`` (the write lock is taken up front, so two writers never
  deadlock upgrading a read lock); on PostgreSQL it is a ``READ COMMITTED``
  transaction in which ``SELECT ... FOR UPDATE [SKIP LOCKED]`` row locks
  serialise claims.
* :meth:`Database.read` is a consistent snapshot on SQLite (a deferred
  transaction, WAL readers never block the writer) and READ COMMITTED
  statements on PostgreSQL.
* SQLite connections get ``journal_mode=WAL`` (writable databases),
  ``synchronous`` as asked (``FULL``: every commit fsyncs the WAL;
  ``NORMAL``: only checkpoints do, see :mod:`cad_node.storage.spool` for why
  the index may use it), ``foreign_keys=ON`` and a busy timeout.
* Schema versions are rows of ``schema_version (component, version)``; each
  store calls :meth:`Database.migrate` at open with its ordered list of
  :class:`Migration` steps.  A fresh database gets the current schema and
  the latest version; an older one runs the missing steps, in order, each
  in its own transaction; a newer one (written by a later release) is refused.
* Hot paths (the index write of every C-STORE) may bypass SQLAlchemy's
  per-statement execution machinery, about 40 us a statement: a statement
  compiled once for the engine's dialect (:meth:`Database.prepare`) runs on
  the driver's cursor inside :meth:`Database.raw_write`, with the same
  pragmas, the same ``BEGIN IMMEDIATE`` and the same pool.
* Connection loss (a PostgreSQL restart) is detected when a connection is
  taken from the pool (``pool_pre_ping``); :func:`retry_on_disconnect`
  retries a whole transaction that lost its connection.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

__all__ = [
    "SCHEMA_VERSION_TABLE",
    "Database",
    "DatabaseError",
    "Migration",
    "PreparedStatement",
    "normalise_url",
    "retry_on_disconnect",
    "sqlite_url",
]

LOG = logging.getLogger(__name__)

#: Name of the table holding one schema version per component.
SCHEMA_VERSION_TABLE = "schema_version"
#: How long a SQLite connection waits for a lock held by another one (seconds).
SQLITE_BUSY_TIMEOUT_S = 30.0
#: How long :func:`retry_on_disconnect` keeps retrying a lost server (seconds).
RECONNECT_HORIZON_S = 60.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


class DatabaseError(RuntimeError):
    """A database that cannot be used as is (unknown URL, newer schema)."""


@dataclass(frozen=True)
class Migration:
    """One schema step: from ``version - 1`` to ``version``.

    Attributes
    ----------
    version : int
        Version after the step (the first migration of a store is 2: version 1
        is the first released schema).
    description : str
        What the step changes (logged).
    apply : callable
        ``apply(conn, dialect_name)``; runs inside the step's transaction.
    """

    version: int
    description: str
    apply: Callable[[Connection, str], None]


@dataclass(frozen=True)
class PreparedStatement:
    """A statement compiled once for one dialect, run on a driver cursor.

    Attributes
    ----------
    sql : str
        The SQL in the driver's parameter style.
    names : tuple of str or None
        Parameter names in placeholder order (positional styles such as
        SQLite's ``?``), or None for named styles (psycopg's ``%(name)s``).
    """

    sql: str
    names: tuple[str, ...] | None

    def params(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        """The driver's parameters for ``values``."""
        if self.names is None:
            return values
        return [values[n] for n in self.names]


def sqlite_url(path: str | Path, *, readonly: bool = False) -> str:
    """The URL of a SQLite file (absolute), optionally opened read-only."""
    resolved = Path(path).resolve()
    if readonly:
        return f"sqlite:///file:{resolved}?mode=ro&uri=true"
    return f"sqlite:///{resolved}"


def normalise_url(url: str | URL) -> URL:
    """Parse a database URL; ``postgresql://`` means the psycopg 3 driver.

    Raises
    ------
    DatabaseError
        Neither SQLite nor PostgreSQL.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(f"unsupported database URL {parsed.render_as_string()!r}: "
                            "use sqlite:/// or postgresql://")
    return parsed


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else ""
        return any(s in text for s in (
            "server closed the connection", "connection refused", "terminating connection",
            "could not connect", "connection is closed", "the database system is",
            "consuming input failed", "connection timed out", "no connection to the server",
        ))
    return False


def retry_on_disconnect(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Decorator: run ``fn`` again while the database server is unreachable.

    For methods that are one transaction each: a transaction that lost its
    connection was rolled back (or, when the loss hit the COMMIT's reply,
    committed: callers are written so that running them twice is harmless).
    Gives up after :data:`RECONNECT_HORIZON_S` and re-raises.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        deadline = time.monotonic() + RECONNECT_HORIZON_S
        delay = 0.1
        while True:
            try:
                return fn(*args, **kwargs)
            except (DBAPIError, OperationalError) as exc:
                if not _is_disconnect(exc) or time.monotonic() > deadline:
                    raise
                LOG.warning("database unreachable (%s): retrying %s in %.1f s",
                            type(exc.orig).__name__ if exc.orig else exc, fn.__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    return wrapper


class Database:
    """An engine plus the transaction and migration rules of the module docstring.

    Parameters
    ----------
    url : str or URL
        ``sqlite:///...`` or ``postgresql://...`` (see :func:`normalise_url`).
    synchronous : {"FULL", "NORMAL"}
        SQLite ``synchronous`` pragma (ignored on PostgreSQL, which always
        fsyncs its WAL at commit unless the server is configured otherwise).
    readonly : bool
        SQLite: open the file read-only (it must exist); no pragma that writes.
    pool_size : int
        PostgreSQL connection pool size per process.
    """

    def __init__(self, url: str | URL, *, synchronous: str = "FULL", readonly: bool = False,
                 pool_size: int = 5) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.url = normalise_url(url)
        self.synchronous = synchronous
        self.readonly = readonly
        self.dialect = self.url.get_backend_name()
        self.engine: Engine
        if self.dialect == "sqlite":
            database = self.url.database or ""
            if not database or database == ":memory:":
                raise DatabaseError("SQLite databases must be files")
            if not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            elif not Path(database[5:].split("?")[0]).exists():
                raise FileNotFoundError(f"database {database[5:].split('?')[0]} does not exist")
            self.engine = sa.create_engine(
                self.url, poolclass=sa.pool.QueuePool, pool_size=4, max_overflow=16,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False,
                              "isolation_level": None},
            )
            event.listen(self.engine, "connect", self._sqlite_connect)
            event.listen(self.engine, "begin", self._sqlite_begin)
        else:
            self.engine = sa.create_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size * 2,
                pool_pre_ping=True, pool_recycle=3600,
            )

    @classmethod
    def unpooled(cls, url: str | URL) -> Database:
        """A database without a connection pool (one-shot tools, ``db migrate``)."""
        db = cls(url)
        if db.dialect != "sqlite":
            db.engine.dispose()
            db.engine = sa.create_engine(db.url, poolclass=NullPool)
        return db

    # -- SQLite connection set-up ---------------------------------------------
    def _sqlite_connect(self, dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if not self.readonly:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={self.synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cur.close()

    @staticmethod
    def _sqlite_begin(conn: Connection) -> None:
        # pysqlite runs in autocommit mode (isolation_level=None); the
        # transaction is ours, IMMEDIATE for writes (SQLAlchemy's documented
        # recipe for SQLite transactions).
        if conn.get_execution_options().get("cad_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    # -- transactions -----------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (see the module contract)."""
        if self.readonly:
            raise PermissionError(f"database {self.url.render_as_string()} opened read-only")
        with self.engine.connect() as conn:
            conn = conn.execution_options(cad_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (a snapshot on SQLite); rolled back at the end."""
        with self.engine.connect() as conn:
            yield conn

    def prepare(self, statement: sa.ClauseElement) -> PreparedStatement:
        """Compile ``statement`` once for this database's dialect (see :meth:`raw_write`)."""
        compiled = statement.compile(dialect=self.engine.dialect)
        names = getattr(compiled, "positiontup", None)
        return PreparedStatement(str(compiled), tuple(names) if names is not None else None)

    @contextmanager
    def raw_write(self) -> Iterator[Any]:
        """One write transaction on a pooled driver connection; yields its cursor.

        The same transaction rules as :meth:`write` (``BEGIN IMMEDIATE`` on
        SQLite; psycopg opens the transaction at the first statement).
        Run :meth:`prepare`-d statements: ``cur.execute(p.sql, p.params(v))``.
        """
        if self.readonly:
            raise PermissionError(f"database {self.url.render_as_string()} opened read-only")
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            if self.dialect == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        finally:
            conn.close()

    @contextmanager
    def raw_read(self) -> Iterator[Any]:
        """A pooled driver connection's cursor for reads (autocommit statements)."""
        conn = self.engine.raw_connection()
        try:
            yield conn.cursor()
        finally:
            conn.rollback()
            conn.close()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- schema versions ----------------------------------------------------------
    def _version_table(self) -> sa.Table:
        md = sa.MetaData()
        return sa.Table(
            SCHEMA_VERSION_TABLE, md,
            sa.Column("component", sa.Text, primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
        )

    def schema_version(self, component: str) -> int | None:
        """The recorded schema version of ``component``, or None when there is none."""
        table = self._version_table()
        with self.read() as conn:
            if not sa.inspect(conn).has_table(SCHEMA_VERSION_TABLE):
                return None
            value = conn.execute(
                sa.select(table.c.version).where(table.c.component == component)
            ).scalar()
        return None if value is None else int(value)

    def migrate(
        self,
        component: str,
        metadata: sa.MetaData,
        migrations: Sequence[Migration],
        *,
        legacy_version: Callable[[Connection], int | None] | None = None,
    ) -> int:
        """Bring ``component``'s tables to the latest version; return it.

        Parameters
        ----------
        component : str
            Name of the store (``index``, ``jobs``).
        metadata : MetaData
            The current schema (created as is on a fresh database).
        migrations : sequence of Migration
            Steps in increasing ``version``; the latest version is the last
            step's (1 when there are none).
        legacy_version : callable, optional
            For a database written before ``schema_version`` existed: returns
            its version (e.g. SQLite's ``PRAGMA user_version``), or None when
            the component's tables do not exist.

        Raises
        ------
        DatabaseError
            The database holds a newer version than this code knows.
        """
        latest = migrations[-1].version if migrations else 1
        versions = self._version_table()
        if self.readonly:
            found = self.schema_version(component)
            if found is not None and found > latest:
                raise DatabaseError(f"{component} schema {found} is newer than {latest}")
            return found or latest
        with self.write() as conn:
            versions.create(conn, checkfirst=True)
            current = conn.execute(
                sa.select(versions.c.version).where(versions.c.component == component)
            ).scalar()
            if current is None and legacy_version is not None:
                current = legacy_version(conn)
            if current is None:  # fresh: the current schema, at the latest version
                metadata.create_all(conn)
                self._set_version(conn, versions, component, latest, insert=True)
                return latest
            current = int(current)
            if current > latest:
                raise DatabaseError(
                    f"{component} schema is version {current}; this cad-node knows {latest}")
            known = conn.execute(
                sa.select(versions.c.version).where(versions.c.component == component)
            ).scalar()
            if known is None:
                self._set_version(conn, versions, component, current, insert=True)
        for step in migrations:
            if step.version <= current:
                continue
            with self.write() as conn:
                LOG.info("%s schema %d -> %d: %s", component, step.version - 1, step.version,
                         step.description)
                step.apply(conn, self.dialect)
                self._set_version(conn, versions, component, step.version, insert=False)
        with self.write() as conn:  # tables/indexes added since (idempotent)
            metadata.create_all(conn, checkfirst=True)
        return latest

    @staticmethod
    def _set_version(conn: Connection, versions: sa.Table, component: str, version: int,
                     *, insert: bool) -> None:
        if insert:
            conn.execute(versions.insert().values(component=component, version=version,
                                                  updated_at=time.time()))
        else:
            conn.execute(versions.update().where(versions.c.component == component)
                         .values(version=version, updated_at=time.time()))
