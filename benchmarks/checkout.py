"""Pool checkout + return, uncontended: microseconds per cycle, median of many batches.

    python benchmarks/checkout.py [--batches 200] [--size 2000] [--dsn DSN]

pgaccess's ``acquire``/``release`` (the facade's path) and ``with pool.connection()``
beside psycopg2's bare ``ThreadedConnectionPool.getconn``/``putconn`` and psycopg_pool's
``getconn``/``putconn``, on one server, interleaved batch by batch so that a busy
machine slows every client alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import psycopg2.pool

from pgaccess import ConnectionPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000, help="cycles per batch")
    parser.add_argument("--dsn", help="a server to use instead of an embedded one")
    args = parser.parse_args()

    server = None
    if args.dsn:
        dsn = args.dsn
    else:
        from pgaccess.embedded import EmbeddedServer, scratch_dir

        server = EmbeddedServer(
            scratch_dir("pgaccess-bench-") / "data", durable=False
        ).start()
        dsn = server.dsn()
    try:
        run(dsn, args.batches, args.size)
    finally:
        if server is not None:
            server.destroy()


def run(dsn: str, batches: int, size: int) -> None:
    ours = ConnectionPool(dsn, maxconn=4)
    bare = psycopg2.pool.ThreadedConnectionPool(4, 4, dsn)
    clients: Dict[str, Callable[[], None]] = {}

    def pgaccess_acquire_release() -> None:
        ours.release(ours.acquire())

    def pgaccess_context() -> None:
        with ours.connection():
            pass

    def psycopg2_getconn_putconn() -> None:
        bare.putconn(bare.getconn())

    clients["pgaccess acquire/release"] = pgaccess_acquire_release
    clients["pgaccess with connection()"] = pgaccess_context
    clients["psycopg2 getconn/putconn"] = psycopg2_getconn_putconn
    try:
        import psycopg_pool

        p3 = psycopg_pool.ConnectionPool(dsn, min_size=4, max_size=4, open=True)

        def psycopg_pool_getconn_putconn() -> None:
            p3.putconn(p3.getconn())

        clients["psycopg_pool getconn/putconn"] = psycopg_pool_getconn_putconn
    except ImportError:
        p3 = None

    for fn in clients.values():  # warm up: every pool has its connection open
        for _ in range(100):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in clients}
    for _ in range(batches):
        for name, fn in clients.items():
            t0 = time.perf_counter()
            for _ in range(size):
                fn()
            samples[name].append((time.perf_counter() - t0) / size * 1e6)

    base = statistics.median(samples["psycopg2 getconn/putconn"])
    print(f"checkout + return, uncontended, {batches} batches of {size} (median, us)")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"  {name:32s} {med:7.2f} us   {med / base:5.2f} x psycopg2")
    ours.close()
    bare.closeall()
    if p3 is not None:
        p3.close()


if __name__ == "__main__":
    main()
