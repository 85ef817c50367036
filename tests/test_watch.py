"""The monitor of a pool: leak reports and the stall cut-off, decided per lease."""

from __future__ import annotations

import threading
import time
from typing import Iterator, List

import pytest

from pgaccess import ConnectionLost, ConnectionPool, Database
from pgaccess.watch import Stalled, cut_stalled, report_leaks


@pytest.fixture
def pools() -> Iterator[List[ConnectionPool]]:
    made: List[ConnectionPool] = []
    yield made
    for pool in made:
        pool.close()


def test_a_leak_is_judged_on_the_lease_still_out(
    pgaccess_dsn: str, pools: List[ConnectionPool]
) -> None:
    pool = ConnectionPool(pgaccess_dsn, maxconn=1, leak_threshold=30)
    pools.append(pool)
    with pool.connection():
        pass
    later = time.monotonic() + 60  # as the monitor would see it, a minute on
    assert report_leaks(pool, later) == 0  # returned: nothing out to report
    conn = pool.acquire()
    assert report_leaks(pool, later) == 1
    assert report_leaks(pool, later) == 0  # once per lease
    pool.release(conn)
    conn = pool.acquire()  # the same connection, a new lease: reported anew
    assert report_leaks(pool, later) == 1
    pool.release(conn)
    assert pool.stats()["leaks_reported"] == 2


def test_a_stall_is_cut_only_on_the_lease_it_was_measured_on(
    proxy_dsn: str, pools: List[ConnectionPool]
) -> None:
    # The monitor measures silence outside the lock. If the connection was returned
    # and lent again meanwhile, the new borrower's command may have just been sent:
    # the cut must check the lease it measured, under the lock.
    pool = ConnectionPool(proxy_dsn, maxconn=1, stall_timeout=30)  # monitor idle
    pools.append(pool)
    conn = pool.acquire()
    ident = conn.tcp_ident
    assert ident is not None  # TCP through the proxy
    measured = Stalled(conn, conn.lease, ident, silent=31.0)
    pool.release(conn)

    outcome: List[BaseException] = []

    def borrower() -> None:
        try:
            Database(pool=pool, retry_reads=False).execute(
                "SELECT pg_sleep(1.5)"
            )  # ACTIVE on the new lease meanwhile
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=borrower)
    t.start()
    deadline = time.monotonic() + 5
    while not (pool.stats()["in_use"] == 1 and conn.lease != measured.lease):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)  # the statement is on its way
    assert cut_stalled(pool, [measured]) == 0  # an old lease: left alone
    now = Stalled(conn, conn.lease, ident, silent=31.0)
    assert cut_stalled(pool, [now]) == 1  # the control: the current lease is cut
    t.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost)
    assert pool.stats()["stalls_detected"] == 1
