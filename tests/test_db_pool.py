"""Concurrent writes through the pool, as the usage guide asks:
``pytest tests/test_db_pool.py -v -n 4``. Every xdist worker runs these against its own
database at the same time as the others, so the server sees 4 pools at once."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from typing import List

from pgaccess import Database


def _insert_metrics(job_id: int, thread_id: int, count: int, db: Database) -> None:
    for i in range(count):
        db.insert(
            "processing_metrics",
            {"job_id": job_id, "stage": f"thread_{thread_id}", "duration_ms": i * 100},
        )


def test_threads_insert_concurrently_and_nothing_is_lost(db: Database) -> None:
    job_id = db.insert("video_job", {"src_hash": "t", "input_path": "/t"})
    threads = [
        threading.Thread(target=_insert_metrics, args=(job_id, i, 100, db))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    rows = db.execute(
        "SELECT stage, count(*) AS n, count(DISTINCT duration_ms) AS d "
        "FROM processing_metrics WHERE job_id = %s GROUP BY stage",
        (job_id,),
    )
    assert {r["stage"]: (r["n"], r["d"]) for r in rows} == {
        f"thread_{i}": (100, 100) for i in range(16)
    }
    assert db.pool.stats()["in_use"] == 0


def test_concurrent_updates_of_one_row_are_all_applied(db: Database) -> None:
    job_id = db.insert("video_job", {"src_hash": "u", "input_path": "/u"})
    barrier = threading.Barrier(8)

    def bump() -> None:
        barrier.wait()
        for _ in range(50):
            db.execute(
                "UPDATE video_job SET priority = priority + 1 WHERE id = %s", (job_id,)
            )

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert db.find_one("video_job", {"id": job_id})["priority"] == 8 * 50


def test_concurrent_transactions_keep_their_writes_together(db: Database) -> None:
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(20):
            with db.transaction() as tx:
                job = tx.insert(
                    "video_job", {"src_hash": f"{n}-{i}", "input_path": "/v"}
                )
                for k in range(3):
                    tx.insert(
                        "highlight",
                        {"job_id": job, "start_time": k, "end_time": k + 1, "score": n},
                    )

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    per_job = db.execute("SELECT job_id, count(*) AS n FROM highlight GROUP BY job_id")
    assert len(per_job) == db.count("video_job") == 160
    assert Counter(r["n"] for r in per_job) == {3: 160}


def _process_worker(
    dsn: str, worker: int, out: multiprocessing.Queue[List[int]]
) -> None:
    db = Database(dsn=dsn, maxconn=2)
    ids = [
        db.insert("video_job", {"src_hash": f"p{worker}-{i}", "input_path": "/p"})
        for i in range(100)
    ]
    db.close()
    out.put(ids)


def test_processes_insert_concurrently(db: Database, pgaccess_dsn: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[List[int]] = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(pgaccess_dsn, w, out))
        for w in range(4)
    ]
    for p in procs:
        p.start()
    returned = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ids = sorted(i for batch in returned for i in batch)
    stored = [r["id"] for r in db.execute("SELECT id FROM video_job ORDER BY id")]
    assert ids == stored and len(set(ids)) == 400
