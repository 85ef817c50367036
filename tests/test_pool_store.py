"""psycopg2's ThreadedConnectionPool internals that pgaccess's pool relies on.

``pgaccess.pool._Store`` keeps psycopg2's pool as the store of connections but moves
them in and out itself (see its docstring for why). These tests pin each private
attribute and behaviour it uses, so that a psycopg2 release that changes one fails
here, by name, instead of breaking the pool at run time.
"""

from __future__ import annotations

import threading
from typing import Iterator

import psycopg2
import psycopg2.pool
import pytest


@pytest.fixture
def store() -> Iterator[psycopg2.pool.ThreadedConnectionPool]:
    pool = psycopg2.pool.ThreadedConnectionPool(0, 2)  # minconn 0: no connection
    yield pool


def test_private_state_has_the_shape_relied_on(
    store: psycopg2.pool.ThreadedConnectionPool,
) -> None:
    assert store._pool == []  # type: ignore[attr-defined]  # idle, lent LIFO by pop()
    assert store._used == {}  # type: ignore[attr-defined]  # key -> lent connection
    assert store._rused == {}  # type: ignore[attr-defined]  # id(conn) -> key
    assert store._keys == 0  # type: ignore[attr-defined]
    lock = store._lock  # type: ignore[attr-defined]
    assert isinstance(lock, type(threading.Lock()))
    assert store.minconn == 0 and store.maxconn == 2
    # _getkey() hands out 1, 2, ... and counts in _keys.
    assert store._getkey() == 1 and store._getkey() == 2  # type: ignore[attr-defined]
    assert store._keys == 2  # type: ignore[attr-defined]


def test_putconn_keeps_a_connection_only_below_minconn(pgaccess_dsn: str) -> None:
    # Why the pool sets minconn = maxconn after construction: psycopg2's _putconn
    # closes a returned connection when len(_pool) >= minconn.
    store = psycopg2.pool.ThreadedConnectionPool(0, 2, pgaccess_dsn)
    try:
        conn = store.getconn()
        assert store._rused[id(conn)] in store._used  # type: ignore[attr-defined]
        store.putconn(conn)
        assert conn.closed and store._pool == []  # type: ignore[attr-defined]
        store.minconn = 2
        conn = store.getconn()
        store.putconn(conn)
        assert not conn.closed and store._pool == [conn]  # type: ignore[attr-defined]
        assert store._used == {} and store._rused == {}  # type: ignore[attr-defined]
    finally:
        store.closeall()
