"""Retries: what is transient, the retry helpers, run_in_transaction, and the facade's
own retries under real faults (a TCP proxy that resets connections and loses replies).

Every error judged here comes from the server where that is cheap: real statements
for constraint, syntax and data errors, real SSI conflicts and deadlocks between two
threads, ``RAISE ... USING ERRCODE`` for the codes a test cannot provoke on demand
(a crash shutdown, a full server). Policy unit tests never sleep: they inject ``sleep``.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql
from support.faultproxy import FaultProxy
from support.retries import Counter, stats_delta

import pgaccess
from pgaccess import (
    CommitOutcomeUnknown,
    ConnectionFailed,
    ConnectionLost,
    ConnectionPool,
    Database,
    DataError,
    InvalidQuery,
    PoolTimeout,
    ProgrammingError,
    SerializationFailure,
    TransactionError,
    UniqueViolation,
    UnknownColumn,
    UnknownTable,
    WritePolicies,
    WritePolicy,
    is_transient,
    with_retry,
)
from pgaccess.errors import translate
from pgaccess.policies import PIPELINE
from pgaccess.retry import global_stats
from pgaccess.transaction import Transaction

JOIN_TIMEOUT = 30.0
BARRIER_TIMEOUT = 10.0


# ----------------------------------------------------------------- helpers
def run_threads(
    *targets: Callable[[], Any],
) -> List[Tuple[Any, Optional[BaseException]]]:
    """Run each target on a thread of its own; return (result, error) per target."""
    outcomes: List[Tuple[Any, Optional[BaseException]]] = [(None, None)] * len(targets)

    def run(i: int, target: Callable[[], Any]) -> None:
        try:
            outcomes[i] = (target(), None)
        except BaseException as exc:
            outcomes[i] = (None, exc)

    threads = [
        threading.Thread(target=run, args=(i, t), name=f"test-retry-{i}")
        for i, t in enumerate(targets)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return outcomes


def server_error(dsn: str, statement: str) -> psycopg2.Error:
    """The psycopg2 error the server answers ``statement`` with (autocommit)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            try:
                cur.execute(statement)
            except psycopg2.Error as exc:
                return exc
    finally:
        conn.close()
    raise AssertionError(f"the server accepted {statement!r}")


def raise_sqlstate(code: str) -> str:
    """A statement the server answers with an error of SQLSTATE ``code``."""
    return (
        "DO $$ BEGIN RAISE EXCEPTION 'raised %', "
        f"'{code}' USING ERRCODE = '{code}'; END $$"
    )


def terminate(dsn: str, pid: int) -> None:
    """End backend ``pid`` as an administrator would, and wait until it is gone."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
            assert cur.fetchone() == (True,)
    finally:
        conn.close()


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_superuser(db: Database) -> bool:
    return db.execute("SELECT current_setting('is_superuser') AS su")[0]["su"] == "on"


# ---------------------------------------------------- what is transient
TRANSIENT_STATEMENTS = [
    pytest.param(raise_sqlstate("40001"), "40001", id="40001-serialization_failure"),
    pytest.param(raise_sqlstate("40P01"), "40P01", id="40P01-deadlock_detected"),
    pytest.param(raise_sqlstate("08006"), "08006", id="08006-connection_failure"),
    pytest.param(raise_sqlstate("08001"), "08001", id="08001-cannot_establish"),
    pytest.param(raise_sqlstate("57P01"), "57P01", id="57P01-admin_shutdown"),
    pytest.param(raise_sqlstate("57P02"), "57P02", id="57P02-crash_shutdown"),
    pytest.param(raise_sqlstate("57P03"), "57P03", id="57P03-cannot_connect_now"),
    pytest.param(raise_sqlstate("53300"), "53300", id="53300-too_many_connections"),
]

PERMANENT_STATEMENTS = [
    pytest.param(
        "INSERT INTO video_job (src_hash) VALUES ('same'), ('same')",
        "23505",
        id="23505-unique",
    ),
    pytest.param(
        "INSERT INTO video_job (src_hash) VALUES (NULL)", "23502", id="23502-not-null"
    ),
    pytest.param(
        "INSERT INTO highlight (job_id, start_time, end_time, score) "
        "VALUES (-1, 0, 1, 0)",
        "23503",
        id="23503-foreign-key",
    ),
    pytest.param(
        "INSERT INTO video_job (src_hash, status) VALUES ('c', 'bogus')",
        "23514",
        id="23514-check",
    ),
    pytest.param("SELEC 1", "42601", id="42601-syntax"),
    pytest.param("SELECT * FROM no_such_table", "42P01", id="42P01-undefined-table"),
    pytest.param(
        "SELECT no_such_column FROM video_job", "42703", id="42703-undefined-column"
    ),
    pytest.param("SELECT 1 / 0", "22012", id="22012-division-by-zero"),
    pytest.param("SELECT 'x'::int", "22P02", id="22P02-invalid-text"),
    pytest.param("SELECT 2147483647::int + 1", "22003", id="22003-out-of-range"),
    pytest.param(raise_sqlstate("57014"), "57014", id="57014-query_canceled"),
]


@pytest.mark.parametrize(("statement", "code"), TRANSIENT_STATEMENTS)
def test_transient_sqlstates_from_the_server(
    pgaccess_dsn: str, statement: str, code: str
) -> None:
    raw = server_error(pgaccess_dsn, statement)
    assert raw.pgcode == code
    assert is_transient(raw)
    ours = translate(raw, statement)
    assert ours.sqlstate == code
    assert is_transient(ours)


@pytest.mark.parametrize(("statement", "code"), PERMANENT_STATEMENTS)
def test_permanent_sqlstates_from_the_server(
    db: Database, pgaccess_dsn: str, statement: str, code: str
) -> None:
    raw = server_error(pgaccess_dsn, statement)
    assert raw.pgcode == code
    assert not is_transient(raw)
    ours = translate(raw, statement)
    assert ours.sqlstate == code
    assert not is_transient(ours)
    # ... and the facade raises the same verdict for the same statement.
    with pytest.raises(pgaccess.DatabaseError) as info:
        db.execute(statement)
    assert info.value.sqlstate == code
    assert not is_transient(info.value)


@pytest.mark.faults
def test_a_lost_connection_is_transient(db: Database, pgaccess_dsn: str) -> None:
    with pytest.raises(ConnectionLost) as info, db.transaction() as tx:
        pid = tx.execute("SELECT pg_backend_pid() AS pid")[0]["pid"]
        terminate(pgaccess_dsn, pid)
        tx.execute("SELECT 1")
    assert type(info.value) is ConnectionLost
    assert is_transient(info.value)
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)


def test_pool_timeout_and_connection_failure_are_transient(pgaccess_dsn: str) -> None:
    with (
        ConnectionPool(pgaccess_dsn, maxconn=1, timeout=0.05, name="tiny") as pool,
        pool.connection(),
        pytest.raises(PoolTimeout) as timeout,
    ):
        pool.acquire()
    assert is_transient(timeout.value)

    nowhere = str(
        psycopg2.extensions.make_dsn(
            pgaccess_dsn, host="127.0.0.1", port=closed_port(), connect_timeout=2
        )
    )
    with (
        ConnectionPool(nowhere, maxconn=1, timeout=1, name="nowhere") as pool,
        pytest.raises(ConnectionFailed) as failed,
    ):
        pool.acquire()
    assert is_transient(failed.value)


# ------------------------------------------------------------- policies


# ---------------------------------------------- with_retry and retrying
def test_with_retry_as_in_the_usage_guide(db: Database) -> None:
    job_id = db.insert("video_job", {"src_hash": "guide", "input_path": "/v/guide"})
    calls = Counter()

    def update_with_external_check() -> int:
        if calls.bump() <= 2:  # the external service is not ready twice
            raise psycopg2.OperationalError("Service not ready")
        return db.update("video_job", {"status": "completed"}, {"id": job_id})

    result = with_retry(update_with_external_check, max_attempts=3, delay=0.01)
    assert result == 1
    assert calls.total == 3
    assert db.find_one("video_job", {"id": job_id})["status"] == "completed"  # type: ignore[index]


def test_with_retry_passes_arguments_and_returns_the_result(db: Database) -> None:
    def insert(src_hash: str, *, input_path: str) -> int:
        return int(
            db.insert("video_job", {"src_hash": src_hash, "input_path": input_path})
        )

    job_id = with_retry(insert, "args", input_path="/v/args", max_attempts=2, delay=0)
    assert db.find_one("video_job", {"id": job_id})["src_hash"] == "args"  # type: ignore[index]


NON_TRANSIENT_CALLS: List[Any] = [
    pytest.param(
        lambda db: db.insert("video_job", {"src_hash": "taken", "input_path": "/b"}),
        UniqueViolation,
        id="unique-violation",
    ),
    pytest.param(lambda db: db.execute("SELEC 1"), ProgrammingError, id="syntax"),
    pytest.param(lambda db: db.find_one("no_such_table"), UnknownTable, id="42P01"),
    pytest.param(
        lambda db: db.find_one("video_job", {"no_such_column": 1}),
        UnknownColumn,
        id="42703",
    ),
    pytest.param(lambda db: db.execute("SELECT 1 / 0"), DataError, id="22012"),
    pytest.param(lambda db: lost_commit(), CommitOutcomeUnknown, id="unknown-outcome"),
]


def lost_commit() -> None:
    raise CommitOutcomeUnknown("the connection was lost during COMMIT")


@pytest.mark.parametrize(("call", "error"), NON_TRANSIENT_CALLS)
def test_non_transient_errors_are_raised_at_once(
    db: Database, call: Callable[[Database], Any], error: type
) -> None:
    db.insert("video_job", {"src_hash": "taken", "input_path": "/a"})
    calls = Counter()

    def fn() -> Any:
        calls.bump()
        return call(db)

    before = global_stats.snapshot()
    with pytest.raises(error):
        with_retry(fn, max_attempts=5, delay=0.001)
    assert calls.total == 1
    delta = stats_delta(before)
    # One attempt, by with_retry; the facade retried nothing either.
    assert (delta["attempts"], delta["retries"], delta["give_ups"]) == (1, 0, 0)


# ----------------------------------------------- retries across threads
def test_retry_stats_count_every_thread(db: Database) -> None:
    """db.stats()["retries"] adds up the attempts, retries by SQLSTATE, give-ups and
    waits of several threads retrying at once (real server errors)."""
    workers = 4
    barrier = threading.Barrier(workers + 1, timeout=BARRIER_TIMEOUT)
    delay = 0.01

    def flaky(calls: Counter) -> str:
        n = calls.bump()
        if n == 1:
            barrier.wait()  # every thread fails its first attempt at the same time
            db.execute(raise_sqlstate("40001"))
        if n == 2:
            db.execute(raise_sqlstate("40P01"))
        return "done"

    def hopeless(calls: Counter) -> None:
        if calls.bump() == 1:
            barrier.wait()
        db.execute(raise_sqlstate("40001"))

    counters = [Counter() for _ in range(workers + 1)]
    before = db.stats()["retries"]
    outcomes = run_threads(
        *[
            lambda c=c: with_retry(flaky, c, max_attempts=3, delay=delay)
            for c in counters[:workers]
        ],
        lambda: with_retry(hopeless, counters[-1], max_attempts=3, delay=delay),
    )
    assert [o[0] for o in outcomes[:workers]] == ["done"] * workers
    assert isinstance(outcomes[-1][1], SerializationFailure)
    assert db.stats()["retries"] == global_stats.snapshot()
    delta = stats_delta(before)
    assert delta["attempts"] == 3 * workers + 3
    assert delta["retries"] == 2 * workers + 2
    assert delta["retries_by_sqlstate"] == {"40001": workers + 2, "40P01": workers}
    assert delta["give_ups"] == 1
    # Each thread waited delay then 2 * delay, plus up to delay of jitter each time.
    n = workers + 1
    assert 3 * delay * n <= delta["time_waited"] <= 5 * delay * n + 1e-9


# ---------------------------------------------- transactions, serializable
@pytest.fixture
def two_rows(db: Database, scratch_table: Callable[..., str]) -> str:
    """A scratch table (id, v) with rows (1, 10) and (2, 20)."""
    name = scratch_table("id int PRIMARY KEY, v int NOT NULL")
    db.insert(name, {"id": 1, "v": 10}, returning=None)
    db.insert(name, {"id": 2, "v": 20}, returning=None)
    return name


def values(db: Database, table: str) -> Tuple[int, int]:
    rows = db.find_many(table, order_by="id")
    return rows[0]["v"], rows[1]["v"]


def write_skew(table: str, barrier: threading.Barrier, attempts: Counter) -> Any:
    """Each transaction writes the sum of both rows into its own row (write skew)."""

    def fn(tx: Transaction, target: int) -> int:
        attempt = attempts.bump(target)
        total = sum(row["v"] for row in tx.find_many(table))
        if attempt == 1:
            barrier.wait()  # both have read before either writes
        tx.update(table, {"v": total}, {"id": target})
        return total

    return fn


def test_serializable_write_skew_is_retried_into_a_serial_result(
    db: Database, two_rows: str
) -> None:
    attempts = Counter()
    fn = write_skew(two_rows, threading.Barrier(2, timeout=BARRIER_TIMEOUT), attempts)
    before = global_stats.snapshot()
    outcomes = run_threads(
        lambda: db.run_in_transaction(fn, 1, isolation="serializable"),
        lambda: db.run_in_transaction(fn, 2, isolation="serializable"),
    )
    assert [error for _, error in outcomes] == [None, None]
    # Serial orders: 1 then 2 gives (30, 50); 2 then 1 gives (40, 30). Running both
    # on the same snapshot (read committed) would give (30, 30).
    assert values(db, two_rows) in [(30, 50), (40, 30)]
    assert attempts.total >= 3  # one of them was rolled back and ran again
    assert stats_delta(before)["retries_by_sqlstate"].get("40001", 0) >= 1


def test_serializable_write_skew_without_retry_raises_serialization_failure(
    db: Database, two_rows: str
) -> None:
    attempts = Counter()
    fn = write_skew(two_rows, threading.Barrier(2, timeout=BARRIER_TIMEOUT), attempts)

    def once(target: int) -> int:
        with db.transaction(isolation="serializable") as tx:
            return fn(tx, target)
        raise AssertionError("unreachable")

    outcomes = run_threads(lambda: once(1), lambda: once(2))
    errors = [error for _, error in outcomes]
    assert sorted(type(e).__name__ for e in errors) == [
        "NoneType",
        "SerializationFailure",
    ]
    failed = next(e for e in errors if e is not None)
    assert isinstance(failed, pgaccess.SerializationFailure)
    assert failed.sqlstate == "40001"
    winner = 1 if errors[0] is None else 2
    assert values(db, two_rows) == ((30, 20) if winner == 1 else (10, 30))
    assert attempts.total == 2


# ---------------------------------------------------------- deadlocks
def test_deadlock_is_retried_until_both_transactions_commit(
    db: Database, two_rows: str
) -> None:
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT)
    attempts = Counter()
    fast_detection = is_superuser(db)  # deadlock_timeout is a superuser setting
    bump = sql.SQL("UPDATE {} SET v = v + %s WHERE id = %s").format(
        sql.Identifier(two_rows)
    )

    def lock_both(tx: Transaction, first: int, second: int, add: int) -> None:
        attempt = attempts.bump(first)
        if fast_detection:
            tx.execute("SET LOCAL deadlock_timeout = '100ms'")
        tx.execute(bump, (add, first))
        if attempt == 1:
            barrier.wait()  # each holds its first row; now each wants the other's
        tx.execute(bump, (add, second))

    before = global_stats.snapshot()
    outcomes = run_threads(
        lambda: db.run_in_transaction(lock_both, 1, 2, 1),
        lambda: db.run_in_transaction(lock_both, 2, 1, 100),
    )
    assert [error for _, error in outcomes] == [None, None]
    assert attempts.total > 2
    # Both transactions applied once each: nothing lost, nothing doubled.
    assert values(db, two_rows) == (10 + 1 + 100, 20 + 1 + 100)
    assert stats_delta(before)["retries_by_sqlstate"].get("40P01", 0) >= 1


# ------------------------------------------------- run_in_transaction
def test_run_in_transaction_returns_what_fn_returns(db: Database) -> None:
    def enqueue(tx: Transaction, src_hash: str, *, input_path: str) -> Tuple[int, str]:
        job_id = tx.insert(
            "video_job", {"src_hash": src_hash, "input_path": input_path}
        )
        return job_id, tx.find_one("video_job", {"id": job_id})["status"]  # type: ignore[index]

    job_id, status = db.run_in_transaction(enqueue, "rit", input_path="/v/rit")
    assert status == "queued"
    assert db.find_one("video_job", {"id": job_id})["src_hash"] == "rit"  # type: ignore[index]


def test_run_in_transaction_refuses_inside_an_open_transaction(db: Database) -> None:
    calls = Counter()

    def fn(tx: Transaction) -> None:
        calls.bump()

    with db.transaction() as tx:
        tx.insert("video_job", {"src_hash": "outer", "input_path": "/v/outer"})
        with pytest.raises(TransactionError):
            db.run_in_transaction(fn)
    assert calls.total == 0
    assert db.count("video_job", {"src_hash": "outer"}) == 1  # the outer one committed


def test_run_in_transaction_does_not_retry_a_permanent_error(db: Database) -> None:
    db.insert("video_job", {"src_hash": "dup", "input_path": "/v/a"})
    calls = Counter()

    def fn(tx: Transaction) -> None:
        calls.bump()
        tx.insert("video_job", {"src_hash": "first", "input_path": "/v/first"})
        tx.insert("video_job", {"src_hash": "dup", "input_path": "/v/b"})

    with pytest.raises(UniqueViolation):
        db.run_in_transaction(fn)
    assert calls.total == 1
    assert db.count("video_job", {"src_hash": "first"}) == 0  # rolled back


def test_run_in_transaction_does_not_retry_an_unknown_commit(
    db: Database,
    proxy_db: Database,
    fault_proxy: FaultProxy,
    scratch_table: Callable[..., str],
) -> None:
    table = scratch_table("id serial PRIMARY KEY, v int")
    calls = Counter()

    def fn(tx: Transaction) -> None:
        calls.bump()
        tx.insert(table, {"v": 1}, returning=None)

    fault_proxy.drop_after("COMMIT")
    with pytest.raises(CommitOutcomeUnknown) as info:
        proxy_db.run_in_transaction(fn)
    assert fault_proxy.drops == 1
    assert calls.total == 1
    assert not is_transient(info.value)
    assert db.find_many(table) == [{"id": 1, "v": 1}]  # the COMMIT did land


# ------------------------------------------- the facade under real faults
def test_reads_survive_connection_resets(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    """1,000 reads from 8 threads through a proxy that resets every connection a few
    times: every read returns its own row, and no caller sees an error."""
    threads, reads, rows = 8, 1000, 200
    ids = db.insert_many(
        "video_job",
        [{"src_hash": f"burst-{i}", "input_path": f"/v/{i}"} for i in range(rows)],
        returning="id",
    )
    expected = {job_id: f"burst-{i}" for i, job_id in enumerate(ids)}
    # A little latency keeps every thread mostly in the middle of a round trip, so
    # a reset hits statements in flight, not only idle connections.
    fault_proxy.set_latency(0.002)
    reset_at = [150, 350, 550, 750]
    reached = [threading.Event() for _ in reset_at]
    done = Counter()
    wrong: List[Tuple[int, Any]] = []
    resets: List[int] = []

    def reader(t: int) -> int:
        for k in range(reads // threads):
            job_id = ids[(t * 37 + k * 11) % rows]
            row = proxy_db.find_one("video_job", {"id": job_id})
            if row is None or row["src_hash"] != expected[job_id]:
                wrong.append((job_id, row))
            n = done.bump()
            if n in reset_at:
                reached[reset_at.index(n)].set()
        return reads // threads

    def resetter() -> None:
        for event in reached:
            assert event.wait(JOIN_TIMEOUT)
            resets.append(fault_proxy.reset_all())

    before = global_stats.snapshot()
    lost_before = proxy_db.pool.stats()["connections_lost"]
    outcomes = run_threads(resetter, *[lambda t=t: reader(t) for t in range(threads)])
    assert [error for _, error in outcomes] == [None] * (threads + 1)
    assert done.total == reads
    assert wrong == []
    assert len(resets) == len(reset_at) and all(n > 0 for n in resets)
    # The faults were real: connections died and reads in flight were retried.
    assert proxy_db.pool.stats()["connections_lost"] > lost_before
    delta = stats_delta(before)
    assert delta["retries"] >= 1
    assert delta["give_ups"] == 0


def pipeline_row(table: str, job_id: int) -> Dict[str, Any]:
    return {
        "video_job": {"src_hash": "lost-reply", "input_path": "/v/lost"},
        "highlight": {
            "job_id": job_id,
            "start_time": 1.5,
            "end_time": 4.0,
            "score": 0.75,
            "label": "goal",
        },
        "processing_metrics": {
            "job_id": job_id,
            "stage": "decode",
            "duration_ms": 125.0,
        },
    }[table]


@pytest.mark.parametrize("table", sorted(PIPELINE))
def test_insert_whose_reply_is_lost_lands_exactly_once(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy, table: str
) -> None:
    parent = db.insert("video_job", {"src_hash": "parent", "input_path": "/v/p"})
    data = pipeline_row(table, parent)
    sent = dict(data)
    # The server runs the INSERT (autocommit: it is committed), then the reply is lost.
    fault_proxy.drop_after(f'INSERT INTO "{table}"')
    before = global_stats.snapshot()
    row_id = proxy_db.insert(table, data)
    assert fault_proxy.drops == 1
    assert stats_delta(before)["retries_by_sqlstate"] == {"CommitOutcomeUnknown": 1}
    rows = db.find_many(table, data)
    assert [r["id"] for r in rows] == [row_id]
    assert db.count(table) == (2 if table == "video_job" else 1)
    assert data == sent  # the caller's dict is left alone
    if table == "processing_metrics":
        # The client gave the metric its key before the first attempt; the retry
        # found the row by it.
        assert uuid.UUID(rows[0]["op_id"])


def test_plain_insert_whose_reply_is_lost_is_an_unknown_outcome(
    db: Database,
    proxy_db: Database,
    fault_proxy: FaultProxy,
    scratch_table: Callable[..., str],
) -> None:
    table = scratch_table("id serial, v int")
    fault_proxy.drop_after(f'INSERT INTO "{table}"')
    before = global_stats.snapshot()
    with pytest.raises(CommitOutcomeUnknown) as info:
        proxy_db.insert(table, {"v": 7})
    assert fault_proxy.drops == 1
    assert not is_transient(info.value)
    assert info.value.statement is not None
    assert info.value.statement.startswith(f'INSERT INTO "{table}"')
    assert stats_delta(before)["retries"] == 0  # not re-run blindly ...
    assert db.find_many(table) == [{"id": 1, "v": 7}]  # ... and it did land


def test_genuine_duplicate_still_raises_unique_violation(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    first = db.insert("video_job", {"src_hash": "dup", "input_path": "/v/a"})
    other = {"src_hash": "dup", "input_path": "/v/b"}
    with pytest.raises(UniqueViolation):  # no fault: the server says so
        proxy_db.insert("video_job", other)
    fault_proxy.drop_after('INSERT INTO "video_job"')
    with pytest.raises(UniqueViolation) as info:  # reply lost, then the idempotent form
        proxy_db.insert("video_job", other)
    assert fault_proxy.drops == 1
    assert info.value.sqlstate == "23505"
    rows = db.find_many("video_job", {"src_hash": "dup"})
    assert [(r["id"], r["input_path"]) for r in rows] == [(first, "/v/a")]


def test_lost_reply_insert_with_values_the_server_converts(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    """The re-run finds its own row although the values come back in another form:
    a naive datetime is stored as an aware timestamptz, an ISO string as a datetime.
    It must return the row's id, not call the caller's own row a conflict."""
    data = {
        "src_hash": "converted",
        "input_path": "/v/c",
        "run_after": datetime.datetime(2030, 1, 1, 12, 0),  # naive
        "locked_at": "2030-01-01T12:00:00+00:00",  # a string for a timestamptz
    }
    fault_proxy.drop_after('INSERT INTO "video_job"')
    job_id = proxy_db.insert("video_job", data)
    assert fault_proxy.drops == 1
    assert db.find_one("video_job", {"src_hash": "converted"})["id"] == job_id  # type: ignore[index]


def test_idempotent_reinsert_racing_a_concurrent_insert_returns_the_row(
    db: Database, pgaccess_dsn: str
) -> None:
    """The idempotent form of an insert (``upsert(..., update=())``, what an insert
    with an unknown outcome is re-run as) must return the row holding the key even
    when another transaction commits that key while the statement runs."""
    other = psycopg2.connect(pgaccess_dsn)
    try:
        with other.cursor() as cur:  # a transaction, left open: it holds the key
            cur.execute(
                "INSERT INTO video_job (src_hash, input_path) VALUES ('race', '/v/o')"
            )
        outcomes: List[Tuple[Any, Optional[BaseException]]] = []
        runner = threading.Thread(
            target=lambda: outcomes.extend(
                run_threads(
                    lambda: db.upsert(
                        "video_job",
                        {"src_hash": "race", "input_path": "/v/mine"},
                        conflict=("src_hash",),
                        update=(),
                    )
                )
            )
        )
        runner.start()
        # Commit the other insert only once the upsert waits on its key.
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not db.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'WITH ins AS%'"
        ):
            assert time.monotonic() < deadline, "the upsert never waited on the key"
            time.sleep(0.005)
        other.commit()
        runner.join(JOIN_TIMEOUT)
        assert not runner.is_alive()
    finally:
        other.close()
    [(row, error)] = outcomes
    assert error is None
    assert row is not None, "upsert(update=()) returned no row for an existing key"
    assert row["input_path"] == "/v/o"


def test_insert_whose_reply_is_lost_twice_still_lands_once(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    """The idempotent re-run is itself idempotent: losing its reply too must lead to
    one more re-run, not to CommitOutcomeUnknown."""
    # Both the INSERT and its idempotent form (WITH ins AS (INSERT INTO "video_job"
    # ... ON CONFLICT DO NOTHING ...) ...) run on the server and lose their replies.
    fault_proxy.drop_after('INSERT INTO "video_job"', times=2)
    job_id = proxy_db.insert("video_job", {"src_hash": "twice", "input_path": "/v/2"})
    assert fault_proxy.drops == 2
    rows = db.find_many("video_job", {"src_hash": "twice"})
    assert [r["id"] for r in rows] == [job_id]


def test_update_whose_reply_is_lost_is_rerun(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    job_id = db.insert("video_job", {"src_hash": "upd", "input_path": "/v/upd"})
    fault_proxy.drop_after('UPDATE "video_job"')
    before = global_stats.snapshot()
    changed = proxy_db.update("video_job", {"output_path": "/out/upd"}, {"id": job_id})
    assert fault_proxy.drops == 1
    assert stats_delta(before)["retries_by_sqlstate"] == {"CommitOutcomeUnknown": 1}
    assert changed == 1
    assert db.find_one("video_job", {"id": job_id})["output_path"] == "/out/upd"  # type: ignore[index]


def test_conditional_update_whose_reply_is_lost_reports_its_own_change(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    """A compare-and-set (claim a queued job) whose reply is lost: the first attempt
    changed the row, so the re-run matches nothing. Returning 0 would tell the
    caller another worker took the job, while it was this caller that took it (and
    nobody will process it). It must return 1 or raise CommitOutcomeUnknown."""
    job_id = db.insert("video_job", {"src_hash": "cas", "input_path": "/v/cas"})
    fault_proxy.drop_after('UPDATE "video_job"')
    try:
        changed = proxy_db.update(
            "video_job",
            {"status": "processing", "locked_by": "worker-1"},
            {"id": job_id, "status": "queued"},
        )
    except CommitOutcomeUnknown:
        changed = None
    assert fault_proxy.drops == 1
    row = db.find_one("video_job", {"id": job_id})
    assert row is not None and row["locked_by"] == "worker-1"
    assert changed != 0, "the caller was told it did not claim a job it claimed"


def test_delete_whose_reply_is_lost_reports_its_own_delete(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    job_id = db.insert("video_job", {"src_hash": "del", "input_path": "/v/del"})
    fault_proxy.drop_after('DELETE FROM "video_job"')
    try:
        deleted = proxy_db.delete("video_job", {"id": job_id})
    except CommitOutcomeUnknown:
        deleted = None
    assert fault_proxy.drops == 1
    assert db.count("video_job", {"id": job_id}) == 0
    assert deleted != 0, "the caller was told nothing was deleted; its call deleted it"


def test_update_whose_where_pins_no_unique_key_is_not_rerun(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy
) -> None:
    """A re-run evaluates its WHERE again: on a non-key WHERE it could change rows
    that came to match after the first attempt. So only a WHERE that pins one row
    by a unique key of the table's write policy is re-run; this one is raised."""
    job_id = db.insert("video_job", {"src_hash": "bulk", "input_path": "/v/bulk"})
    fault_proxy.drop_after('UPDATE "video_job"')
    before = global_stats.snapshot()
    with pytest.raises(CommitOutcomeUnknown):
        proxy_db.update("video_job", {"priority": 7}, {"input_path": "/v/bulk"})
    assert fault_proxy.drops == 1
    assert stats_delta(before)["retries"] == 0
    row = db.find_one("video_job", {"id": job_id})
    assert row is not None and row["priority"] == 7  # it did land, once


def test_write_policies_are_data_not_table_names(
    db: Database, scratch_table: Callable[..., str]
) -> None:
    """A table of one's own gets the pipeline's behaviour by declaring a policy;
    a pipeline table without its policy gets none of it."""
    table = scratch_table("id serial primary key, ref text unique, v int")
    mine = Database(
        pool=db.pool,
        write_policies=WritePolicies(WritePolicy(table, keys=[("ref",), ("id",)])),
    )
    # upsert's conflict key comes from the declared policy ...
    row = mine.upsert(table, {"ref": "a", "v": 1})
    assert mine.upsert(table, {"ref": "a", "v": 2})["id"] == row["id"]
    # ... and without one, upsert asks for it instead of guessing.
    bare = Database(pool=db.pool, write_policies=WritePolicies())
    with pytest.raises(InvalidQuery, match="conflict="):
        bare.upsert(table, {"ref": "b", "v": 1})
    # A pipeline table whose policy is not given is a table like any other.
    with pytest.raises(InvalidQuery, match="conflict="):
        bare.upsert("video_job", {"src_hash": "b", "input_path": "/v/b"})
