"""Versioned schema migrations: numbered files, the version table, the lock, the CLI.

Each test makes databases of its own (fresh, or made by pgaccess 0.1.0's schema) and
checks the result from the catalog, through a connection of its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import psycopg2
import pytest
from support.raw import PIPELINE_TABLES, Raw

import pgaccess
from pgaccess import (
    ConnectionFailed,
    ConnectionPool,
    Database,
    DatabaseError,
    Worker,
    schema,
)
from pgaccess.cli import main
from pgaccess.testing import TestServer

REPO = Path(__file__).resolve().parents[1]
FIXTURE_0_1_0 = Path(__file__).resolve().parent / "fixtures" / "schema_0_1_0.sql"
SCHEMA_SQL = REPO / "sql" / "schema.sql"
MIGRATIONS = REPO / "src" / "pgaccess" / "migrations"

Fresh = Callable[[], str]


@pytest.fixture
def fresh(pgaccess_server: TestServer) -> Iterator[Fresh]:
    """Make empty databases for this test: ``fresh()`` returns a DSN."""
    made: List[str] = []

    def make() -> str:
        name = f"pgaccess_mig_{uuid.uuid4().hex[:10]}"
        made.append(name)
        return pgaccess_server.create_database(name)

    yield make
    for name in made:
        pgaccess_server.drop_database(name)


def run_sql(dsn: str, text: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(text)
    finally:
        conn.close()


def versions(dsn: str) -> List[Tuple[Any, ...]]:
    r = Raw(dsn)
    try:
        return r.rows(
            "SELECT version, name, pgaccess_version, baseline "
            f"FROM {schema.VERSION_TABLE} ORDER BY version"
        )
    finally:
        r.conn.close()


def migrations_copy(tmp_path: Path, extra: Dict[str, str]) -> Path:
    """The shipped migrations, plus ``extra`` files, in a directory of the test's."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, target)
    for name, text in extra.items():
        (target / name).write_text(text)
    return target


# ----------------------------------------------------------------- catalog
# Everything a migration can make, read from pg_catalog, minus the runner's own
# bookkeeping table. Columns keep their order (ALTER TABLE ADD COLUMN appends, so
# sql/schema.sql must list added columns last); lists, not attnums, so a dropped
# column's gap does not count.
_CATALOG = {
    "relations": """
        SELECT c.relname, c.relkind, coalesce(c.reloptions, '{}')
        FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace
          AND c.relname NOT LIKE 'pgaccess\\_schema\\_version%'
        ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity,
               a.attgenerated
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = current_schema()::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND c.relname <> 'pgaccess_schema_version'
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE connamespace = current_schema()::regnamespace
          AND conrelid <> 'pgaccess_schema_version'::regclass
        ORDER BY 1, 2""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE schemaname = current_schema()
          AND tablename <> 'pgaccess_schema_version'
        ORDER BY 1""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid),
               pg_get_functiondef(oid)
        FROM pg_proc WHERE pronamespace = current_schema()::regnamespace
        ORDER BY 1, 2""",
    "types": """
        SELECT t.typname, t.typtype, format_type(t.typbasetype, t.typtypmod),
               array(SELECT enumlabel FROM pg_enum e
                     WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder)
        FROM pg_type t
        WHERE t.typnamespace = current_schema()::regnamespace
          AND t.typtype IN ('e', 'd')
        ORDER BY 1""",
    "views": """
        SELECT viewname, definition FROM pg_views
        WHERE schemaname = current_schema() ORDER BY 1""",
    "sequences": """
        SELECT sequencename, data_type, start_value, increment_by
        FROM pg_sequences WHERE schemaname = current_schema() ORDER BY 1""",
}


def catalog(dsn: str) -> Dict[str, List[Tuple[Any, ...]]]:
    r = Raw(dsn)
    try:
        # The version table exists in every database compared here: a migrated one
        # has it, and the others get an empty one so the regclass casts resolve.
        r.rows(
            "CREATE TABLE IF NOT EXISTS pgaccess_schema_version "
            "(version int PRIMARY KEY)"
        )
        return {what: r.rows(query) for what, query in _CATALOG.items()}
    finally:
        r.conn.close()


def assert_same_catalog(
    got: Dict[str, List[Tuple[Any, ...]]], want: Dict[str, List[Tuple[Any, ...]]]
) -> None:
    for what in _CATALOG:
        assert got[what] == want[what], f"{what} differ"


# ------------------------------------------------------------------ files
def test_the_first_migration_is_the_schema_of_pgaccess_0_1_0() -> None:
    shipped = schema.migrations()
    assert shipped[0].label == "0001_initial"
    assert shipped[0].sql == FIXTURE_0_1_0.read_text()
    assert [m.version for m in shipped] == sorted({m.version for m in shipped})
    assert schema.latest_version() == shipped[-1].version
    # Exactly the NNNN_*.sql files of the package's folder, all of them.
    assert [f"{m.label}.sql" for m in shipped] == sorted(
        p.name for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")
    )


def test_two_files_with_one_number_are_refused(tmp_path: Path) -> None:
    folder = migrations_copy(tmp_path, {"0001_again.sql": "SELECT 1;"})
    with pytest.raises(schema.MigrationError, match="0001"):
        schema.migrations(folder)


# ------------------------------------------------------------- migrating
def test_migrating_from_nothing_builds_what_schema_sql_describes(fresh: Fresh) -> None:
    migrated, from_file = fresh(), fresh()
    applied = schema.migrate(migrated)
    assert [m.label for m in applied] == [m.label for m in schema.migrations()]
    run_sql(from_file, SCHEMA_SQL.read_text())
    got, want = catalog(migrated), catalog(from_file)
    # Not two empty catalogs: the pipeline's tables are in both.
    tables = {row[0] for row in want["columns"]}
    assert set(PIPELINE_TABLES) <= tables
    assert want["triggers"] and want["functions"] and want["indexes"]
    assert_same_catalog(got, want)


def test_migrating_twice_applies_nothing_the_second_time(fresh: Fresh) -> None:
    dsn = fresh()
    first = schema.migrate(dsn)
    before = versions(dsn)
    assert schema.migrate(dsn) == []
    assert versions(dsn) == before
    assert [v[0] for v in before] == [m.version for m in first]
    assert {v[2] for v in before} == {pgaccess.__version__}
    assert not any(v[3] for v in before)  # run, not found


def test_migrate_through_a_pool_and_apply_keeps_its_name(fresh: Fresh) -> None:
    dsn = fresh()
    with ConnectionPool(dsn, maxconn=1, name="migrate") as pool:
        schema.apply(pool)
        assert pool.stats()["in_use"] == 0  # the connection went back
        assert schema.status(pool).pending == []
    assert len(versions(dsn)) == len(schema.migrations())


def test_a_0_1_0_database_with_rows_is_upgraded_keeping_every_row(
    fresh: Fresh,
) -> None:
    old, new = fresh(), fresh()
    run_sql(old, FIXTURE_0_1_0.read_text())
    run_sql(
        old,
        """
        INSERT INTO video_job (src_hash, input_path, status, priority, attempts,
                               locked_by, error, output_path, finished_at)
        VALUES ('a', '/in/a', 'queued', 0, 0, NULL, NULL, NULL, NULL),
               ('b', '/in/b', 'processing', 5, 1, 'host:1-1', NULL, NULL, NULL),
               ('c', '/in/c', 'completed', 0, 1, NULL, NULL, '/out/c', now()),
               ('d', '/in/d', 'failed', 0, 3, NULL, 'boom', NULL, now()),
               ('e', NULL, 'cancelled', 0, 0, NULL, NULL, NULL, now());
        INSERT INTO highlight (job_id, start_time, end_time, score, label)
        VALUES (3, 0, 1.5, 0.9, 'goal'), (3, 2, 3, 0.1, NULL);
        INSERT INTO processing_metrics (job_id, stage, duration_ms)
        VALUES (3, 'decode', 12.5), (4, 'decode', 3), (NULL, 'idle', 0);
        """,
    )
    r = Raw(old)
    tables = r.column(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
    )
    assert tables == sorted(PIPELINE_TABLES)

    def rows_of_0_1_0() -> Dict[str, Any]:
        # Only the columns 0.1.0 had: later migrations may add columns.
        out = {}
        for table in tables:
            cols = old_columns[table]
            out[table] = r.rows(
                f"SELECT {', '.join(cols)} FROM {table} ORDER BY id"  # fixed names
            )
        return out

    old_columns = {
        t: r.column(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (t,),
        )
        for t in tables
    }
    before = rows_of_0_1_0()
    assert [
        len(before[t]) for t in ("video_job", "highlight", "processing_metrics")
    ] == [
        5,
        2,
        3,
    ]

    state = schema.status(old)
    assert not state.versioned
    assert [(a.label, a.baseline) for a in state.applied] == [("0001_initial", True)]
    assert [m.label for m in state.pending] == [
        m.label for m in schema.migrations()[1:]
    ]

    applied = schema.migrate(old)
    assert [m.label for m in applied] == [m.label for m in state.pending]
    assert rows_of_0_1_0() == before
    recorded = versions(old)
    assert recorded[0] == (1, "initial", pgaccess.__version__, True)
    assert [v[0] for v in recorded] == [m.version for m in schema.migrations()]
    r.conn.close()
    # The upgraded database is the one a fresh migration makes.
    schema.migrate(new)
    assert_same_catalog(catalog(old), catalog(new))


def test_the_baseline_is_recorded_not_run(fresh: Fresh, tmp_path: Path) -> None:
    dsn = fresh()
    run_sql(dsn, FIXTURE_0_1_0.read_text())
    # 0001 sets fillfactor 90: had it run again, this would be undone.
    run_sql(dsn, "ALTER TABLE video_job SET (fillfactor = 80)")
    only_first = tmp_path / "first"
    only_first.mkdir()
    shutil.copy(MIGRATIONS / "0001_initial.sql", only_first)
    assert schema.migrate(dsn, directory=only_first) == []
    r = Raw(dsn)
    assert "fillfactor=80" in r.one(
        "SELECT reloptions FROM pg_class WHERE relname = 'video_job'"
    )
    r.conn.close()
    assert versions(dsn) == [(1, "initial", pgaccess.__version__, True)]


def test_some_of_the_tables_without_the_others_is_refused(fresh: Fresh) -> None:
    dsn = fresh()
    run_sql(dsn, "CREATE TABLE video_job (id bigint PRIMARY KEY)")
    with pytest.raises(schema.MigrationError, match="not a schema pgaccess made"):
        schema.migrate(dsn)
    r = Raw(dsn)
    assert r.column(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    ) == ["video_job"]
    r.conn.close()


def test_a_failing_migration_is_named_and_the_database_stays_before_it(
    fresh: Fresh, tmp_path: Path
) -> None:
    folder = migrations_copy(
        tmp_path,
        {
            "0900_extra.sql": "ALTER TABLE video_job ADD COLUMN extra int;",
            "0901_broken.sql": (
                "ALTER TABLE highlight ADD COLUMN other int;\nSELECT 1 / 0;"
            ),
        },
    )
    dsn = fresh()
    with pytest.raises(schema.MigrationError) as failed:
        schema.migrate(dsn, directory=folder)
    message = str(failed.value)
    assert "0901_broken" in message and "version 900" in message
    assert "division by zero" in message
    assert failed.value.sqlstate == "22012"
    assert isinstance(failed.value, DatabaseError)
    assert [v[0] for v in versions(dsn)][-1] == 900
    r = Raw(dsn)
    column = "SELECT count(*) FROM information_schema.columns WHERE column_name = %s"
    assert r.one(column, ("extra",)) == 1
    assert r.one(column, ("other",)) == 0  # rolled back with its migration
    r.conn.close()
    # Fixed, it applies alone.
    (folder / "0901_broken.sql").write_text(
        "ALTER TABLE highlight ADD COLUMN other int;"
    )
    assert [m.label for m in schema.migrate(dsn, directory=folder)] == ["0901_broken"]


_MIGRATOR = """
import json, sys
from pgaccess import schema
applied = schema.migrate(sys.argv[1], directory=sys.argv[2])
print(json.dumps([m.label for m in applied]))
"""


def test_concurrent_migrators_queue_and_each_migration_runs_once(
    fresh: Fresh, tmp_path: Path
) -> None:
    # A slow migration in the middle keeps the others waiting while it runs.
    folder = migrations_copy(
        tmp_path,
        {
            "0900_slow.sql": "SELECT pg_sleep(0.3);\n"
            "ALTER TABLE video_job ADD COLUMN slow int;",
            "0901_after.sql": "ALTER TABLE video_job ADD COLUMN after int;",
        },
    )
    dsn = fresh()
    hold = psycopg2.connect(dsn)
    hold.autocommit = True
    cur = hold.cursor()
    watch = Raw(dsn)  # pg_stat_activity is read once per transaction: not hold's
    # The test holds the migration lock, so every process is sure to be queued on
    # it before the first one can start.
    cur.execute("BEGIN")
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (schema._LOCK_KEY,))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATOR, dsn, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        deadline = time.monotonic() + 60
        while (
            watch.one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                "current_database() AND wait_event_type = 'Lock' "
                "AND wait_event = 'advisory'"
            )
            < 4
        ):
            assert time.monotonic() < deadline, "the migrators never queued"
            assert all(p.poll() is None for p in procs)  # none passed the lock
            time.sleep(0.05)
        cur.execute("COMMIT")
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        hold.close()
        watch.conn.close()
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    applied = [json.loads(out) for out, _ in results]
    labels = [label for each in applied for label in each]
    expected = [m.label for m in schema.migrations(folder)]
    assert sorted(labels) == sorted(expected)  # each once, by someone
    for each in applied:
        assert each == sorted(each)  # in order
    assert [v[0] for v in versions(dsn)] == [
        m.version for m in schema.migrations(folder)
    ]


# ----------------------------------------------------- status and dry run
def test_status_and_dry_run_change_nothing_and_the_dry_run_is_the_real_sql(
    fresh: Fresh,
) -> None:
    dsn, reference = fresh(), fresh()
    state = schema.status(dsn)
    assert not state.versioned and state.applied == [] and state.version == 0
    assert state.pending == schema.migrations()
    script = schema.dry_run_sql(dsn)
    r = Raw(dsn)
    assert r.one("SELECT count(*) FROM pg_class WHERE relnamespace = "
                 "current_schema()::regnamespace") == 0  # fmt: skip
    r.conn.close()
    for mig in schema.migrations():
        assert f"-- pgaccess: migration {mig.label}" in script
    # Run by hand (psql would do the same), it makes what migrate() makes.
    run_sql(dsn, script)
    schema.migrate(reference)
    assert versions(dsn) == versions(reference)
    assert_same_catalog(catalog(dsn), catalog(reference))
    assert schema.dry_run_sql(dsn) == ""
    after = schema.status(dsn)
    assert after.versioned and after.pending == []
    assert after.version == schema.latest_version()


# ----------------------------------------------------------------- worker
def test_a_worker_refuses_an_unversioned_schema(fresh: Fresh) -> None:
    dsn = fresh()
    run_sql(dsn, FIXTURE_0_1_0.read_text())
    with Database(dsn=dsn, maxconn=2) as db:
        worker = Worker(db, lambda job: None, threads=1, listen=False)
        with pytest.raises(schema.SchemaVersionError, match="pgaccess migrate"):
            worker.start()
        assert not worker.alive
        schema.migrate(db.pool)
        worker.start()
        worker.stop()
        assert worker.join(30)


def test_a_schema_older_than_needed_is_refused_a_newer_one_warned(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    latest = schema.latest_version()
    with pytest.raises(schema.SchemaVersionError) as old:
        schema.check_version(db.pool, needed=latest + 1)
    assert f"is at schema version {latest}" in str(old.value)
    assert "pgaccess migrate" in str(old.value)
    db.insert(
        schema.VERSION_TABLE,
        {"version": 9999, "name": "from_the_future", "pgaccess_version": "9.0"},
        returning=None,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="pgaccess.schema"):
            worker = Worker(db, lambda job: None, threads=1, listen=False)
            worker.start()  # a warning, not a crash
            worker.stop()
            assert worker.join(30)
        assert "newer than this pgaccess" in caplog.text
        assert schema.check_version(db.pool) == 9999
    finally:
        db.delete(schema.VERSION_TABLE, {"version": 9999})


# -------------------------------------------------------------------- CLI
def test_cli_migrate_status_dry_run_and_init_db(
    fresh: Fresh, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = fresh()
    run_sql(dsn, FIXTURE_0_1_0.read_text())
    assert main(["--dsn", dsn, "migrate", "--status"]) == 0
    out = capsys.readouterr().out
    assert "0001_initial" in out and "baseline" in out
    for mig in schema.migrations()[1:]:
        assert mig.label in out and "pending" in out
    assert main(["--dsn", dsn, "migrate", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"CREATE TABLE {schema.VERSION_TABLE}" in out
    assert versions_missing(dsn)  # the dry run applied nothing
    assert main(["--dsn", dsn, "migrate"]) == 0
    out = capsys.readouterr().out
    assert f"schema version {schema.latest_version()}" in out
    assert main(["--dsn", dsn, "migrate"]) == 0
    assert "nothing to apply" in capsys.readouterr().out
    assert main(["--dsn", dsn, "migrate", "--status"]) == 0
    out = capsys.readouterr().out
    assert "pending" not in out and pgaccess.__version__ in out
    other = fresh()
    assert main(["--dsn", other, "init-db"]) == 0
    assert len(versions(other)) == len(schema.migrations())


def versions_missing(dsn: str) -> bool:
    r = Raw(dsn)
    try:
        return r.one("SELECT to_regclass(%s) IS NULL", (schema.VERSION_TABLE,))
    finally:
        r.conn.close()


def test_cli_migrate_with_a_bad_dsn_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = "host=127.0.0.1 port=1 connect_timeout=2"
    assert main(["--dsn", bad, "migrate"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgaccess migrate: error:") and "\n" not in err
    assert main(["--dsn", "this is not a dsn", "migrate", "--status"]) == 1
    assert "pgaccess migrate: error:" in capsys.readouterr().err


def test_migrate_with_a_bad_dsn_raises_a_pgaccess_error() -> None:
    with pytest.raises(DatabaseError):
        schema.migrate("this is not a dsn")
    with pytest.raises(ConnectionFailed, match="could not connect"):
        schema.migrate("host=127.0.0.1 port=1 connect_timeout=2")


def test_the_test_plugin_migrates_its_database(pgaccess_dsn: str) -> None:
    assert versions(pgaccess_dsn)[-1][0] == schema.latest_version()
