"""The pipeline's schema: numbered migrations shipped in the package, and applying them.

``pgaccess/migrations/NNNN_name.sql`` are applied in the order of their numbers, each
in a transaction of its own under a transaction-scoped advisory lock, and recorded in
``pgaccess_schema_version`` (version, name, when, by which pgaccess). Concurrent
migrators (many hosts starting at once) queue on the lock; whoever comes second finds
the work done and does nothing. ``sql/schema.sql`` is the newest schema in one file,
for readers; a test keeps it equal to what the migrations build.

A database made by pgaccess 0.1.0 (``CREATE ... IF NOT EXISTS``, no version table) is
recognised as being at version 1 (a *baseline*): when the version table is missing and
every table ``0001_initial.sql`` creates exists, version 1 is recorded as found, not
run, and the later migrations follow. Some of those tables without the others is not a
schema pgaccess made, and ``MigrationError`` says so instead of guessing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Set, Union

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .errors import (
    ConnectionFailed,
    MigrationError,
    SchemaVersionError,
    translate,
)
from .pool import ConnectionPool

__all__ = [
    "VERSION_TABLE",
    "Applied",
    "Migration",
    "MigrationError",
    "SchemaStatus",
    "SchemaVersionError",
    "apply",
    "check_version",
    "dry_run_sql",
    "latest_version",
    "migrate",
    "migrations",
    "schema_sql",
    "status",
]

logger = logging.getLogger("pgaccess.schema")

Target = Union[ConnectionPool, str]
Directory = Union[str, "os.PathLike[str]", None]

# Concurrent migrators (xdist workers, worker processes on many hosts starting at
# once, and pgaccess 0.1.0's apply(), which took the same key) queue on this
# transaction-scoped lock instead of racing on the catalog.
_LOCK_KEY = 0x70676163  # "pgac"
_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_CREATED_TABLE = re.compile(
    r"^\s*CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE | re.MULTILINE
)

VERSION_TABLE = "pgaccess_schema_version"
_VERSION_DDL = f"""CREATE TABLE {VERSION_TABLE} (
    version           integer     PRIMARY KEY,
    name              text        NOT NULL,
    applied_at        timestamptz NOT NULL DEFAULT now(),
    pgaccess_version  text        NOT NULL,
    -- true: found in place (a database made before versioned migrations), not run
    baseline          boolean     NOT NULL DEFAULT false
)"""
_RECORD = (
    f"INSERT INTO {VERSION_TABLE} (version, name, pgaccess_version, baseline) "
    "VALUES (%s, %s, %s, %s)"
)


class _Labelled:
    version: int
    name: str

    @property
    def label(self) -> str:
        """``"0002_job_tree"``: how logs, errors and ``--status`` name it."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class Migration(_Labelled):
    """One numbered migration: ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Applied(_Labelled):
    """A row of ``pgaccess_schema_version``."""

    version: int
    name: str
    applied_at: Optional[datetime]
    pgaccess_version: str
    baseline: bool


@dataclass(frozen=True)
class SchemaStatus:
    """What a database has applied, and what this pgaccess would apply to it.

    ``versioned``: the version table exists. Without it, a database holding pgaccess
    0.1.0's tables lists version 1 in ``applied`` as a baseline with no
    ``applied_at`` (the next migration records it). ``unknown``: versions applied that
    this pgaccess does not ship (a newer pgaccess migrated the database).
    """

    applied: List[Applied]
    pending: List[Migration]
    unknown: List[Applied]
    versioned: bool

    @property
    def version(self) -> int:
        """The highest version applied (or found); 0 for none."""
        return max((a.version for a in self.applied + self.unknown), default=0)


# ------------------------------------------------------------ the files
def migrations(directory: Directory = None) -> List[Migration]:
    """The migrations shipped in the package (or in ``directory``), in order.

    Every ``NNNN_name.sql`` file is one; two files with one number raise
    ``MigrationError``.
    """
    root: Any = (
        resources.files("pgaccess").joinpath("migrations")
        if directory is None
        else Path(directory)
    )
    found: List[Migration] = []
    for entry in root.iterdir():
        m = _FILE.fullmatch(entry.name)
        if m is not None:
            text = entry.read_text(encoding="utf-8")
            found.append(Migration(int(m.group(1)), m.group(2), text))
    found.sort(key=lambda mig: mig.version)
    for a, b in zip(found, found[1:]):
        if a.version == b.version:
            raise MigrationError(
                f"two migrations share the number {a.version:04d}: "
                f"{a.label}.sql and {b.label}.sql"
            )
    return found


def latest_version(directory: Directory = None) -> int:
    """The version the newest shipped migration brings a database to."""
    return max((m.version for m in migrations(directory)), default=0)


def schema_sql() -> str:
    """The newest schema in one file (``sql/schema.sql``, installed as
    ``pgaccess/schema.sql``), for reading; databases are made by :func:`migrate`."""
    return (
        resources.files("pgaccess").joinpath("schema.sql").read_text(encoding="utf-8")
    )


def _baseline_tables(initial: Migration) -> List[str]:
    """The tables the first migration creates: a 0.1.0 database has all of them."""
    return _CREATED_TABLE.findall(initial.sql)


# ---------------------------------------------------------- connections
class _Session:
    """One connection to the target, in autocommit, for the runner's own BEGINs."""

    def __init__(self, target: Target) -> None:
        self._pool: Optional[ConnectionPool] = None
        if isinstance(target, ConnectionPool):
            self._pool = target
            self.conn: Any = target.acquire()
            return
        try:
            self.conn = psycopg2.connect(target)
        except psycopg2.OperationalError as exc:
            raise ConnectionFailed(f"could not connect: {exc}".strip()) from exc
        except psycopg2.Error as exc:
            raise translate(exc) from exc
        self.conn.autocommit = True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.release(self.conn)
        else:
            self.conn.close()

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _transaction(cur: Any, work: Any) -> Any:
    """``work()`` between BEGIN (with the migration lock) and COMMIT; ROLLBACK on
    any error, so a failure leaves nothing of it behind."""
    cur.execute("BEGIN")
    try:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        result = work()
        cur.execute("COMMIT")
    except BaseException:
        if not cur.connection.closed:
            try:
                cur.execute("ROLLBACK")
            except psycopg2.Error:
                logger.warning(
                    "ROLLBACK after a failed migration failed", exc_info=True
                )
        raise
    return result


def _exists(cur: Any, relation: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,))
    return bool(cur.fetchone()[0])


def _read_applied(cur: Any) -> List[Applied]:
    cur.execute(
        "SELECT version, name, applied_at, pgaccess_version, baseline "
        f"FROM {VERSION_TABLE} ORDER BY version"
    )
    return [Applied(*row) for row in cur.fetchall()]


def _baseline(cur: Any, known: Sequence[Migration]) -> bool:
    """Whether a database without the version table holds a 0.1.0 schema.

    False for an empty database; ``MigrationError`` for one holding only some of the
    first migration's tables (not a schema pgaccess made: nothing is guessed).
    """
    if not known or known[0].version != 1:
        return False
    tables = _baseline_tables(known[0])
    present = [t for t in tables if _exists(cur, t)]
    if not present:
        return False
    if len(present) < len(tables):
        missing = [t for t in tables if t not in present]
        raise MigrationError(
            f"the database has {', '.join(present)} but not {', '.join(missing)}, and "
            f"no {VERSION_TABLE} table: it is not a schema pgaccess made, so "
            "pgaccess will not guess its version; make those tables match "
            f"{known[0].label}.sql (or drop them) and run it again"
        )
    return True


def _pgaccess_version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------- migrating
def migrate(target: Target, *, directory: Directory = None) -> List[Migration]:
    """Apply the migrations a database has not had yet; return those applied.

    ``target``: a DSN or a ``ConnectionPool``. Each migration runs in a transaction
    of its own, under the migration lock, and is recorded in the same transaction,
    so a database is always at one version: a failing migration raises
    ``MigrationError`` naming it, and the database stays at the version before it.
    Concurrent callers queue on the lock; each migration is applied once. A database
    from pgaccess 0.1.0 is taken as being at version 1 (see the module docstring).
    Versions applied that this pgaccess does not know are logged, not an error.
    Blocks while another migrator holds the lock.
    """
    known = migrations(directory)
    applied: List[Migration] = []
    me = _pgaccess_version()
    with _Session(target) as session, session.conn.cursor() as cur:
        while True:
            try:
                mig = _transaction(cur, lambda: _apply_next(cur, known, me))
            except psycopg2.Error as exc:
                raise translate(exc, connection=cur.connection) from exc
            if mig is None:
                return applied
            logger.info("applied schema migration %s", mig.label)
            applied.append(mig)


def _apply_next(cur: Any, known: Sequence[Migration], me: str) -> Optional[Migration]:
    """Apply and record the first migration not applied yet (under the lock, in the
    caller's transaction); None when there is none."""
    done = _prepare(cur, known, me)
    todo = [m for m in known if m.version not in done]
    if not todo:
        newer = sorted(done - {m.version for m in known})
        if newer:
            logger.warning(
                "the database has schema versions %s, which this pgaccess (%s) does "
                "not know: a newer pgaccess migrated it",
                newer,
                me,
            )
        return None
    mig = todo[0]
    try:
        cur.execute(mig.sql)
        cur.execute(_RECORD, (mig.version, mig.name, me, False))
    except psycopg2.Error as exc:
        raise _failed(mig, exc, done, cur.connection) from exc
    return mig


def _prepare(cur: Any, known: Sequence[Migration], me: str) -> Set[int]:
    """The versions applied, after creating the version table (and recording a
    baseline) where it is missing. Runs under the lock."""
    if _exists(cur, VERSION_TABLE):
        return {a.version for a in _read_applied(cur)}
    baseline = _baseline(cur, known)
    cur.execute(_VERSION_DDL)
    if not baseline:
        return set()
    cur.execute(_RECORD, (known[0].version, known[0].name, me, True))
    logger.info(
        "recorded schema version %s as a baseline: its tables were there already",
        known[0].label,
    )
    return {known[0].version}


def _failed(
    mig: Migration, exc: psycopg2.Error, done: Set[int], conn: Any
) -> MigrationError:
    cause = translate(exc, connection=conn)
    at = max(done, default=0)
    return MigrationError(
        f"migration {mig.label} failed, rolled back; the database stays at schema "
        f"version {at}: {cause}",
        sqlstate=cause.sqlstate,
        statement=mig.label,
    )


def apply(target: Target) -> None:
    """:func:`migrate` the database to the newest schema (the name pgaccess 0.1.0
    gave it); twice is a no-op."""
    migrate(target)


# ---------------------------------------------------------------- reading
def status(target: Target, *, directory: Directory = None) -> SchemaStatus:
    """What ``target`` has applied and what :func:`migrate` would apply; changes
    nothing."""
    known = migrations(directory)
    with _Session(target) as session, session.conn.cursor() as cur:
        try:
            versioned = _exists(cur, VERSION_TABLE)
            if versioned:
                rows = _read_applied(cur)
            elif _baseline(cur, known):
                first = known[0]
                found = "found, pgaccess 0.1.0; recorded by the next migrate"
                rows = [Applied(first.version, first.name, None, found, True)]
            else:
                rows = []
        except psycopg2.Error as exc:
            raise translate(exc, connection=cur.connection) from exc
    versions = {m.version for m in known}
    done = {a.version for a in rows}
    return SchemaStatus(
        applied=[a for a in rows if a.version in versions],
        pending=[m for m in known if m.version not in done],
        unknown=[a for a in rows if a.version not in versions],
        versioned=versioned,
    )


def dry_run_sql(target: Target, *, directory: Directory = None) -> str:
    """The SQL :func:`migrate` would run on ``target`` now (empty when up to date),
    bookkeeping included; changes nothing."""
    state = status(target, directory=directory)
    return "".join(_script(state, _pgaccess_version()))


def _script(state: SchemaStatus, me: str) -> Iterator[str]:
    lock = f"SELECT pg_advisory_xact_lock({_LOCK_KEY});\n"
    if not state.versioned:
        yield f"-- pgaccess: the version table\nBEGIN;\n{lock}{_VERSION_DDL};\n"
        for a in state.applied:  # a baseline
            yield (
                f"-- {a.label}: its tables are there already (pgaccess 0.1.0): "
                "recorded, not run\n" + _literal_record(a.version, a.name, me, True)
            )
        yield "COMMIT;\n\n"
    for mig in state.pending:
        yield f"-- pgaccess: migration {mig.label}\nBEGIN;\n{lock}"
        yield mig.sql.rstrip() + "\n"
        yield _literal_record(mig.version, mig.name, me, False) + "COMMIT;\n\n"


def _literal_record(version: int, name: str, me: str, baseline: bool) -> str:
    values = ", ".join(
        psycopg2.extensions.adapt(v).getquoted().decode() for v in (name, me)
    )
    return (
        f"INSERT INTO {VERSION_TABLE} (version, name, pgaccess_version, baseline) "
        f"VALUES ({version}, {values}, {'true' if baseline else 'false'});\n"
    )


def check_version(pool: ConnectionPool, needed: Optional[int] = None) -> int:
    """The database's schema version, after checking it is at least ``needed``
    (default: the newest migration shipped). One statement.

    Raises ``SchemaVersionError`` (naming ``pgaccess migrate``) for an older or
    unversioned schema; one newer than this pgaccess knows is logged as a warning.
    """
    known = latest_version()
    if needed is None:
        needed = known
    with pool.connection() as conn, conn.cursor() as cur:
        try:
            cur.execute(f"SELECT max(version) FROM {VERSION_TABLE}")
            current: Optional[int] = cur.fetchone()[0]  # type: ignore[index]
        except psycopg2.errors.UndefinedTable:
            current = None
        except psycopg2.Error as exc:
            raise translate(exc, connection=conn) from exc
    if current is None or current < needed:
        what = (
            f"has no {VERSION_TABLE} table (a schema from pgaccess 0.1.0, or none)"
            if current is None
            else f"is at schema version {current}"
        )
        raise SchemaVersionError(
            f"the database {what}; this pgaccess needs version {needed}: "
            "run `pgaccess migrate` first"
        )
    if current > known:
        logger.warning(
            "the database is at schema version %d, newer than this pgaccess (%s) "
            "knows (%d): upgrade pgaccess if something is missing",
            current,
            _pgaccess_version(),
            known,
        )
    return current
