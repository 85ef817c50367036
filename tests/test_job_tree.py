"""Jobs in jobs against a real PostgreSQL: nested ``track()``, fan-out with
``job.spawn()``, fan-in through the ``waiting`` status, cancelling a tree, and the
schema upgrade that brings the columns.

Every assertion reads the database (statuses, numbers, counters) or what the server
sent (notifications).
"""

from __future__ import annotations

import io
import re
import select
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import psycopg2
import psycopg2.extensions
import pytest

from pgaccess import Database
from pgaccess.cli import main
from pgaccess.demo import print_summary, run_demo
from pgaccess.jobs import JobBusy, JobHandle, JobLost, VideoJobs, Worker
from pgaccess.jobs import queries as Q
from pgaccess.testing import TestServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def jobs(db: Database) -> VideoJobs:
    queue = VideoJobs(db)
    queue.BACKOFF_BASE = 0.01
    queue.BACKOFF_MAX = 0.01
    return queue


def row(db: Database, job_id: int) -> Dict[str, Any]:
    found = db.find_one("video_job", {"id": job_id})
    assert found is not None
    return found


def statuses(db: Database, ids: List[int]) -> List[str]:
    return [row(db, i)["status"] for i in ids]


# ------------------------------------------------------------------ track()
def test_track_creates_a_held_job_and_completes_it_with_what_the_block_added(
    db: Database, jobs: VideoJobs
) -> None:
    with jobs.track("script-1", "/in/a.mp4", worker_id="nb") as job:
        now = row(db, job.id)
        assert (now["status"], now["locked_by"], now["attempts"]) == (
            "processing",
            "nb",
            1,
        )
        assert job.job_number == str(job.id) and job.parent_id is None
        job.add_highlight(1.0, 2.0, 0.9, "goal")
        job.output_path = "/out/a.json"
        with job.timer("detect"):
            pass
    done = row(db, job.id)
    assert (done["status"], done["output_path"]) == ("completed", "/out/a.json")
    assert done["finished_at"] is not None
    assert db.count("highlight", {"job_id": job.id}) == 1
    assert db.count("processing_metrics", {"job_id": job.id, "stage": "detect"}) == 1


def test_track_fails_the_job_with_the_error_and_reraises(
    db: Database, jobs: VideoJobs
) -> None:
    with pytest.raises(ZeroDivisionError), jobs.track("script-2") as job:
        job.add_highlight(1.0, 2.0, 0.5)
        1 / 0  # noqa: B018
    failed = row(db, job.id)
    assert failed["status"] == "failed"  # one attempt: not queued for a retry
    assert "ZeroDivisionError" in failed["error"]
    assert db.count("highlight", {"job_id": job.id}) == 0


def test_a_rerun_takes_the_finished_job_over_and_a_running_one_is_busy(
    db: Database, jobs: VideoJobs
) -> None:
    with jobs.track("script-3") as first:
        elsewhere = VideoJobs(db)  # another script: no block open there
        busy = pytest.raises(JobBusy, match="processing")
        with busy, elsewhere.track("script-3", worker_id="someone-else"):
            pass  # pragma: no cover
    with jobs.track("script-3") as again:
        pass
    assert again.id == first.id
    assert row(db, first.id)["attempts"] == 2
    assert row(db, first.id)["status"] == "completed"


def test_nested_tracks_are_numbered_children_of_the_enclosing_block(
    db: Database, jobs: VideoJobs
) -> None:
    with jobs.track("root") as root:
        with jobs.track("root/a") as a:
            pass
        with jobs.track("root/b") as b, jobs.track("root/b/x") as bx:
            pass
    n = str(root.id)
    assert (a.job_number, b.job_number, bx.job_number) == (
        f"{n}.1",
        f"{n}.2",
        f"{n}.2.1",
    )
    assert row(db, a.id)["parent_id"] == root.id
    assert row(db, bx.id)["parent_id"] == b.id
    assert row(db, bx.id)["job_number"] == f"{n}.2.1"
    assert statuses(db, [root.id, a.id, b.id, bx.id]) == ["completed"] * 4
    assert [c["job_number"] for c in jobs.children(root.id)] == [f"{n}.1", f"{n}.2"]


def test_a_track_inside_processing_is_a_child_of_the_claimed_job(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("queued-parent", "/in/p")
    with jobs.processing("w1") as job:
        assert job is not None and job.id == parent_id
        with jobs.track("queued-parent/step") as step:
            assert step.worker_id == "w1"
    assert row(db, step.id)["parent_id"] == parent_id
    assert step.job_number == f"{parent_id}.1"
    assert statuses(db, [parent_id, step.id]) == ["completed", "completed"]


def test_children_created_from_many_threads_are_numbered_without_gaps(
    db: Database, jobs: VideoJobs
) -> None:
    threads, per_thread = 8, 10
    barrier = threading.Barrier(threads)
    errors: List[BaseException] = []
    with jobs.track("busy-parent") as parent:

        def make(t: int) -> None:
            try:
                barrier.wait(10)
                for i in range(per_thread):
                    with jobs.track(f"busy-parent/{t}/{i}", parent=parent):
                        pass
            except BaseException as exc:  # pragma: no cover (reported below)
                errors.append(exc)

        pool = [threading.Thread(target=make, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(60)
    assert not errors
    children = jobs.children(parent.id)
    numbers = [c["job_number"] for c in children]
    n = threads * per_thread
    assert sorted(int(x.split(".")[1]) for x in numbers) == list(range(1, n + 1))
    # Creation order: each thread's children, made one after the other, got
    # increasing indexes.
    index = {c["src_hash"]: int(c["job_number"].split(".")[1]) for c in children}
    for t in range(threads):
        mine = [index[f"busy-parent/{t}/{i}"] for i in range(per_thread)]
        assert mine == sorted(mine)
    assert row(db, parent.id)["children_count"] == n


def test_a_parent_that_ends_first_fails_its_open_child(
    db: Database, jobs: VideoJobs
) -> None:
    opened = threading.Event()
    parent_done = threading.Event()
    outcome: List[BaseException] = []

    with jobs.track("impatient") as parent:

        def child() -> None:
            try:
                with jobs.track("impatient/slow", parent=parent) as c:
                    outcome.append(RuntimeError(str(c.id)))  # its id, for below
                    opened.set()
                    parent_done.wait(10)
                    assert c.lost.is_set()
            except BaseException as exc:
                outcome.append(exc)

        th = threading.Thread(target=child)
        th.start()
        assert opened.wait(10)
    parent_done.set()
    th.join(10)
    child_id = int(str(outcome[0]))
    assert isinstance(outcome[1], JobLost)  # the child's own end was refused
    failed = row(db, child_id)
    assert (failed["status"], failed["error"]) == ("failed", "parent ended first")
    assert row(db, parent.id)["status"] == "completed"


# ----------------------------------------------------------- spawn / fan-in
def claim_all(jobs: VideoJobs, worker_id: str) -> List[int]:
    return [r["id"] for r in jobs.claim(worker_id, limit=100)]


def claim_one(jobs: VideoJobs, worker_id: str) -> int:
    (got,) = jobs.claim(worker_id)
    return int(got["id"])


def test_spawned_children_appear_only_when_the_parent_block_ends_cleanly(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("movie", "/in/movie.mp4")
    with jobs.processing("splitter") as job:
        assert job is not None
        kids = [job.spawn(f"movie/seg{i}", f"/in/movie.{i}.mp4") for i in range(3)]
        # Not visible to workers while the block runs.
        assert claim_all(jobs, "other") == []
        assert statuses(db, kids) == ["waiting"] * 3
        assert [row(db, k)["job_number"] for k in kids] == [
            f"{parent_id}.{i}" for i in (1, 2, 3)
        ]
    parent = row(db, parent_id)
    assert (parent["status"], parent["children_pending"]) == ("waiting", 3)
    assert parent["finished_at"] is None
    assert jobs.stats()["waiting"] == 1
    assert sorted(claim_all(jobs, "seg-worker")) == sorted(kids)
    for k in kids[:2]:
        jobs.complete(k, "seg-worker", f"/out/{k}")
    assert row(db, parent_id)["status"] == "waiting"
    jobs.complete(kids[2], "seg-worker", f"/out/{kids[2]}")
    parent = row(db, parent_id)
    assert (parent["status"], parent["children_pending"]) == ("queued", 0)

    with jobs.processing("merger") as job:
        assert job is not None and job.id == parent_id
        assert job.children_done
        children = jobs.children(job.id)
        assert [c["status"] for c in children] == ["completed"] * 3
        job.output_path = ",".join(c["output_path"] for c in children)
    done = row(db, parent_id)
    assert done["status"] == "completed"
    assert done["output_path"] == ",".join(f"/out/{k}" for k in kids)
    assert jobs.stats()["waiting"] == 0


def test_a_failed_parent_spawns_nothing_and_its_rerun_does_not_spawn_twice(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("flaky", "/in/flaky", max_attempts=2)
    jobs.BACKOFF_BASE = jobs.BACKOFF_MAX = 0.5  # the parent waits: claims see none
    with pytest.raises(RuntimeError), jobs.processing("w") as job:
        assert job is not None
        first = [job.spawn(f"flaky/{i}", None) for i in range(2)]
        raise RuntimeError("split failed")
    assert row(db, parent_id)["status"] == "queued"
    assert statuses(db, first) == ["waiting", "waiting"]  # not released
    assert claim_all(jobs, "other") == []
    time.sleep(0.6)  # the backoff
    with jobs.processing("w") as job:
        assert job is not None and job.id == parent_id
        again = [job.spawn(f"flaky/{i}", None) for i in range(3)]
    assert again[:2] == first  # the same rows, not new ones
    assert db.count("video_job", {"parent_id": parent_id}) == 3
    numbers = [c["job_number"] for c in jobs.children(parent_id)]
    assert numbers == [f"{parent_id}.{i}" for i in (1, 2, 3)]  # no gap
    assert row(db, parent_id)["children_pending"] == 3
    assert statuses(db, again) == ["queued"] * 3


def test_a_parent_failed_for_good_cancels_its_unreleased_children(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("doomed", "/in/d", max_attempts=1)
    with pytest.raises(ValueError), jobs.processing("w") as job:
        assert job is not None
        kid = job.spawn("doomed/0", None)
        raise ValueError("no")
    assert statuses(db, [parent_id, kid]) == ["failed", "cancelled"]


def test_then_complete_completes_the_parent_in_the_last_childs_statement(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("album", "/in/album")
    with jobs.processing("w") as job:
        assert job is not None
        kids = [job.spawn(f"album/{i}", None, then="complete") for i in range(2)]
    claim_all(jobs, "w2")
    jobs.complete(kids[0], "w2")
    assert row(db, parent_id)["status"] == "waiting"
    jobs.complete(kids[1], "w2")
    parent = row(db, parent_id)
    assert (parent["status"], parent["children_pending"]) == ("completed", 0)
    assert parent["finished_at"] is not None


def test_a_failed_or_cancelled_child_queues_the_parent_even_with_then_complete(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("mixed", "/in/mixed")
    with jobs.processing("w") as job:
        assert job is not None
        bad = job.spawn("mixed/bad", None, max_attempts=1, then="complete")
        gone = job.spawn("mixed/gone", None)
        ok = job.spawn("mixed/ok", None)
    assert jobs.cancel(gone)
    got = claim_all(jobs, "w2")
    assert sorted(got) == sorted([bad, ok])
    assert jobs.fail(bad, "w2", "broken") == "failed"
    jobs.complete(ok, "w2")
    parent = row(db, parent_id)
    assert (parent["status"], parent["children_failed"]) == ("queued", 2)
    with jobs.processing("merger") as job:
        assert job is not None and job.children_done
        by_id = {c["id"]: c for c in jobs.children(parent_id)}
        assert (by_id[bad]["status"], by_id[bad]["error"]) == ("failed", "broken")
        assert by_id[gone]["status"] == "cancelled"
    assert row(db, parent_id)["status"] == "completed"


def test_one_batch_finishing_several_children_counts_each_once(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("batch-parent", None)
    with jobs.processing("w") as job:
        assert job is not None
        kids = [job.spawn(f"batch-parent/{i}", None) for i in range(4)]
    rows = jobs.claim("batcher", limit=10)
    handles = [JobHandle(r, "batcher", jobs) for r in rows]
    done = jobs.complete_many(handles[:3])  # three children in one statement
    assert sorted(done.completed) == sorted(kids[:3])
    assert row(db, parent_id)["children_pending"] == 1
    assert row(db, parent_id)["status"] == "waiting"
    jobs.complete_many(handles[3:])
    parent = row(db, parent_id)
    assert (parent["status"], parent["children_pending"]) == ("queued", 0)


def test_a_child_reclaimed_out_of_attempts_finishes_for_its_parent(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("stale-parent", None)
    with jobs.processing("w") as job:
        assert job is not None
        kid = job.spawn("stale-parent/0", None, max_attempts=1)
    assert claim_all(jobs, "dies") == [kid]
    assert jobs.reclaim_stale(0) == 1
    parent = row(db, parent_id)
    assert (row(db, kid)["status"], parent["status"]) == ("failed", "queued")
    assert parent["children_failed"] == 1


def test_then_complete_on_a_nested_parent_queues_it_for_its_handler(
    db: Database, jobs: VideoJobs
) -> None:
    top = jobs.enqueue("nest", None)
    with jobs.processing("w1") as job:
        assert job is not None
        mid = job.spawn("nest/mid", None, then="complete")
    with jobs.processing("w2") as job:
        assert job is not None and job.id == mid
        leaf = job.spawn("nest/mid/leaf", None, then="complete")
    assert claim_all(jobs, "w3") == [leaf]
    jobs.complete(leaf, "w3")
    # mid has a parent of its own: its handler's completion must tell it.
    assert statuses(db, [top, mid]) == ["waiting", "queued"]
    with jobs.processing("w4") as job:
        assert job is not None and job.id == mid and job.children_done
    assert statuses(db, [top, mid]) == ["completed", "completed"]


def test_cancelling_a_failed_child_does_not_count_it_twice(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("given-up", None)
    with jobs.processing("w") as job:
        assert job is not None
        bad, good = (job.spawn(f"given-up/{i}", None, max_attempts=1) for i in (0, 1))
    claim_all(jobs, "w2")
    assert jobs.fail(bad, "w2", "broken") == "failed"
    assert jobs.cancel(bad, failed=True)
    parent = row(db, parent_id)
    assert (parent["status"], parent["children_pending"]) == ("waiting", 1)
    jobs.complete(good, "w2")
    assert row(db, parent_id)["status"] == "queued"


def test_cancelling_a_parent_cancels_its_queued_and_waiting_descendants(
    db: Database, jobs: VideoJobs
) -> None:
    top = jobs.enqueue("tree", "/in/tree")
    with jobs.processing("w1") as job:
        assert job is not None
        mid = job.spawn("tree/mid", None)
        leaf_q = job.spawn("tree/leaf", None, priority=-1)
    with jobs.processing("w2") as job:  # mid runs, spawns a grandchild, waits
        assert job is not None and job.id == mid
        grand = job.spawn("tree/mid/g", None)
    running = claim_all(jobs, "busy")  # leaf and grandchild now processing ...
    assert sorted(running) == sorted([leaf_q, grand])
    jobs.release(grand, "busy")  # ... the grandchild queued again
    assert statuses(db, [top, mid, leaf_q, grand]) == [
        "waiting",
        "waiting",
        "processing",
        "queued",
    ]
    assert jobs.cancel(top)
    assert statuses(db, [top, mid, leaf_q, grand]) == [
        "cancelled",
        "cancelled",
        "processing",  # runs to its end ...
        "cancelled",
    ]
    jobs.complete(leaf_q, "busy")  # ... and finishing it wakes no one
    assert row(db, top)["status"] == "cancelled"
    assert not jobs.cancel(top)


def work_until_completed(
    db: Database, jobs: VideoJobs, handler: Any, job_id: int, threads: int
) -> None:
    """Run a Worker until job ``job_id`` is completed (30 s at most)."""
    worker = Worker(
        db, handler, threads=threads, jobs=jobs, idle_min=0.01, idle_max=0.05
    )
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while row(db, job_id)["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        worker.stop()
        assert worker.join(10)


def test_a_worker_fans_out_through_its_handlers_result_and_merges(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("clip", "/in/clip")
    seen: List[Tuple[int, bool]] = []

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        seen.append((job["id"], bool(job["children_done"])))
        if job["id"] != parent_id:
            return {"output_path": f"/out/{job['src_hash']}"}
        if not job["children_done"]:
            return {
                "spawn": [
                    {"src_hash": f"clip/{i}", "input_path": f"/in/clip.{i}"}
                    for i in range(4)
                ]
            }
        kids = jobs.children(job["id"])
        return {"output_path": "+".join(c["output_path"] for c in kids)}

    work_until_completed(db, jobs, handler, parent_id, threads=2)
    assert [done for i, done in seen if i == parent_id] == [False, True]
    assert row(db, parent_id)["output_path"] == "+".join(
        f"/out/clip/{i}" for i in range(4)
    )


def test_a_track_in_a_worker_handler_is_a_child_of_its_job(
    db: Database, jobs: VideoJobs
) -> None:
    parent_id = jobs.enqueue("handled", "/in/h")
    made: List[int] = []

    def handler(job: Dict[str, Any]) -> None:
        for step in ("decode", "detect"):
            with jobs.track(f"{job['src_hash']}/{step}") as child:
                made.append(child.id)

    work_until_completed(db, jobs, handler, parent_id, threads=1)
    children = jobs.children(parent_id)
    assert [c["id"] for c in children] == made
    assert [c["job_number"] for c in children] == [
        f"{parent_id}.1",
        f"{parent_id}.2",
    ]
    assert {c["status"] for c in children} == {"completed"}


# ------------------------------------------------- the last two, at once
class Notifications:
    """LISTEN on the queue's channel on a connection of its own."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        self.conn.cursor().execute(f"LISTEN {Q.CHANNEL}")

    def drain(self, wait: float = 0.2) -> List[str]:
        got: List[str] = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if select.select([self.conn], [], [], left)[0]:
                self.conn.poll()
                got.extend(n.payload for n in self.conn.notifies)
                self.conn.notifies.clear()
        return got

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def notifications(pgaccess_dsn: str) -> Iterator[Notifications]:
    listener = Notifications(pgaccess_dsn)
    yield listener
    listener.close()


def finish_together(jobs: VideoJobs, held: Dict[str, int], batch: str) -> None:
    """Complete each worker's held job from a thread of its own, released together
    by a barrier; ``batch``'s through ``complete_many`` (the Worker's statement)."""
    barrier = threading.Barrier(len(held))
    errors: List[BaseException] = []

    def finish(worker_id: str) -> None:
        try:
            barrier.wait(10)
            if worker_id == batch:
                handle = JobHandle({"id": held[worker_id]}, worker_id, jobs)
                assert jobs.complete_many([handle]).completed
            else:
                jobs.complete(held[worker_id], worker_id)
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(w,)) for w in held]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors


def test_the_last_two_children_finishing_at_once_queue_the_parent_exactly_once(
    db: Database, jobs: VideoJobs, notifications: Notifications
) -> None:
    for r in range(30):
        parent_id = jobs.enqueue(f"race{r}", None)
        with jobs.processing("p") as job:
            assert job is not None and job.id == parent_id
            kids = [job.spawn(f"race{r}/{i}", None) for i in range(2)]
        # Each child held by its own worker; the two completions meet at a barrier.
        held = {w: claim_one(jobs, w) for w in ("a", "b")}
        assert sorted(held.values()) == sorted(kids)
        # The wake-ups so far (the parent's enqueue, its children's release: "2")
        # are out of the way before the race.
        deadline = time.monotonic() + 10
        while "2" not in notifications.drain(0.05):
            assert time.monotonic() < deadline
        finish_together(jobs, held, batch="a" if r % 2 else "none")
        parent = row(db, parent_id)
        assert (parent["status"], parent["children_pending"]) == ("queued", 0), r
        # Exactly one statement queued it again: one wake-up for it ("1"; an
        # enqueue's payload carries a time).
        assert [p for p in notifications.drain(0.3) if p == "1"] == ["1"], r
        # And one claim takes it, once.
        assert claim_all(jobs, "merger") == [parent_id]
        jobs.complete(parent_id, "merger")
        assert row(db, parent_id)["attempts"] == 2


# ------------------------------------------------------------ the upgrade
CATALOG = {
    "columns": """
        SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute AS a
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum""",
    "constraints": """
        SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = %s::regclass ORDER BY conname""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE tablename = %s ORDER BY indexname""",
    "options": "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
}


def catalog(dsn: str) -> Dict[str, Any]:
    """What the upgrade must match: columns, constraints, indexes, options, and the
    schema's functions."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            out: Dict[str, Any] = {}
            for table in ("video_job", "video_job_concurrency"):
                for what, query in CATALOG.items():
                    cur.execute(query, (table,))
                    out[f"{table} {what}"] = cur.fetchall()
            cur.execute(
                "SELECT proname, pg_get_functiondef(oid) FROM pg_proc "
                "WHERE proname LIKE 'pgaccess%%' ORDER BY proname"
            )
            out["functions"] = cur.fetchall()
            return out
    finally:
        conn.close()


def run_script(dsn: str, *paths: Path) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for path in paths:
                cur.execute(path.read_text(encoding="utf-8"))
    finally:
        conn.close()


def test_the_upgrade_from_the_previous_schema_makes_the_newest_one(
    pgaccess_server: TestServer, worker_id: str
) -> None:
    before = ROOT / "tests" / "fixtures" / "schema_0_1_0.sql"  # the schema before
    upgrade = ROOT / "src" / "pgaccess" / "migrations" / "0002_job_tree.sql"
    newest = ROOT / "sql" / "schema.sql"
    names = [f"pgaccess_jobtree_{kind}_{worker_id}" for kind in ("up", "new")]
    try:
        upgraded, fresh = (pgaccess_server.create_database(n) for n in names)
        run_script(upgraded, before)
        # The previous schema had neither the table nor the status: an upgrade to do.
        conn = psycopg2.connect(upgraded)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('video_job_concurrency')")
                assert cur.fetchone() == (None,)
                cur.execute(CATALOG["constraints"], ("video_job",))
                assert "waiting" not in str(cur.fetchall())
        finally:
            conn.close()
        run_script(upgraded, upgrade)
        run_script(fresh, newest)
        want, got = catalog(fresh), catalog(upgraded)
        assert any("waiting" in str(c) for c in want["video_job constraints"])
        assert [c[1] for c in want["video_job columns"]][-7:] == [
            "parent_id",
            "job_number",
            "children_count",
            "children_pending",
            "children_failed",
            "then_complete",
            "concurrency_key",
        ]
        assert got == want
        # And the newest schema applied again over the upgraded one changes nothing.
        run_script(upgraded, newest)
        assert catalog(upgraded) == want
    finally:
        for n in names:
            pgaccess_server.drop_database(n)


# ----------------------------------------------------------------- the demo
def test_the_demo_splits_each_video_into_segments_and_merges_them(
    db: Database, pgaccess_dsn: str
) -> None:
    out = io.StringIO()
    summary = run_demo(
        jobs=6, workers=3, segments=4, fail_rate=0.0, dsn=pgaccess_dsn, out=out
    )
    assert (summary["completed"], summary["unfinished"]) == (6, 0)
    assert summary["segments"] == {"completed": 24, "failed": 0, "total": 24}
    assert summary["retried"] == 0  # the merge is not a retry
    print_summary(summary, out)
    assert re.search(r"segments completed +24 ", out.getvalue())
    videos = db.execute(
        "SELECT id, status, output_path, attempts FROM video_job "
        "WHERE parent_id IS NULL ORDER BY id"
    )
    assert len(videos) == 6
    for video in videos:
        # Split on its first run, merged on its second.
        assert (video["status"], video["attempts"]) == ("completed", 2)
        parts = VideoJobs(db).children(video["id"])
        assert [p["job_number"] for p in parts] == [
            f"{video['id']}.{k}" for k in range(1, 5)
        ]
        assert {p["status"] for p in parts} == {"completed"}
    merged = db.count("processing_metrics", {"stage": "merge"})
    assert merged == 6


def test_pgaccess_stats_shows_the_waiting_parents(
    db: Database, jobs: VideoJobs, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs.enqueue("shown", None)
    with jobs.processing("w") as job:
        assert job is not None
        job.spawn("shown/0", None)
    capsys.readouterr()
    assert main(["stats"]) == 0
    assert re.search(r"^\s+waiting\s+1$", capsys.readouterr().out, re.MULTILINE)
