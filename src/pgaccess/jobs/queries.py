"""The SQL of the job queue and the pipeline's writers, in one place.

Each statement is one round trip and does its whole job atomically. The conflict
targets come from the write policies (``policies.py``), which mirror the unique
constraints of ``sql/schema.sql``: the queue, the retry policy and the schema name
each key once.
"""

from __future__ import annotations

from ..policies import HIGHLIGHT, PROCESSING_METRICS, VIDEO_JOB, conflict_target

_JOB_KEY = conflict_target(VIDEO_JOB)
_HIGHLIGHT_KEY = conflict_target(HIGHLIGHT)
_METRIC_KEY = conflict_target(PROCESSING_METRICS)

#: Every status a job can have, in its life's order (sql/schema.sql's CHECK).
STATUSES = ("queued", "processing", "waiting", "completed", "failed", "cancelled")

#: The channel the schema's insert trigger notifies (payload: how many jobs are due
#: now) and the workers LISTEN on. sql/schema.sql spells it too.
CHANNEL = "pgaccess_video_job"

#: The columns a claim returns: what a handler and a JobHandle read. Not the lease's
#: own columns (status, locked_by, locked_at, heartbeat_at: the worker knows them),
#: nor those of a finished job; each timestamp costs the client a parse per job.
CLAIMED_COLUMNS = (
    "id",
    "src_hash",
    "input_path",
    "priority",
    "attempts",
    "max_attempts",
    "created_at",
    "error",
    "parent_id",
    "job_number",
)
# children_done: the job's spawned children have all finished (it was queued again
# by the last one); NULL (no children ever waited for) reads as false.
_RETURNING = ", ".join(f"v.{c}" for c in CLAIMED_COLUMNS) + (
    ", v.children_pending = 0 AS children_done"
)


def fan_in(finished: str) -> str:
    """The fan-in CTEs (``fan_lock``, ``fan``) for the children a statement finished.

    ``finished`` is a SELECT of ``(parent_id, status)`` rows of jobs the statement
    took to an end state (completed, failed for good, cancelled). Each waiting parent
    among their parents loses that many pending children; the last one queues the
    parent again (due now), or completes it when it said ``then_complete``, all its
    children completed, and it has no parent of its own (whose fan-in its handler's
    completion then does). Exactly once: the UPDATE of the parent row re-reads the
    newest ``children_pending`` (a concurrent finisher's decrement committed first),
    so only one statement sees it reach 0. The parents are locked in id order first,
    so two batches finishing children of the same parents do not deadlock (the
    parent of a tracked child is processing, not waiting: left alone).
    With no parent among ``finished`` (the common case), both find nothing.
    """
    return f"""
fan_lock AS MATERIALIZED (
    SELECT p.id FROM video_job AS p
    WHERE p.id IN (SELECT f.parent_id FROM ({finished}) AS f
                   WHERE f.parent_id IS NOT NULL)
      AND p.status = 'waiting'
    ORDER BY p.id
    FOR NO KEY UPDATE OF p
), fan AS (
    UPDATE video_job AS p
    SET children_pending = p.children_pending - f.n,
        children_failed = coalesce(p.children_failed, 0) + f.bad,
        status = CASE
            WHEN p.children_pending > f.n THEN 'waiting'
            WHEN p.then_complete AND p.parent_id IS NULL
                 AND coalesce(p.children_failed, 0) + f.bad = 0 THEN 'completed'
            ELSE 'queued' END,
        run_after = CASE WHEN p.children_pending > f.n THEN p.run_after ELSE now() END,
        finished_at = CASE
            WHEN p.children_pending <= f.n AND p.then_complete AND p.parent_id IS NULL
                 AND coalesce(p.children_failed, 0) + f.bad = 0 THEN now() END,
        updated_at = now()
    FROM (
        SELECT f.parent_id, count(*) AS n,
               count(*) FILTER (WHERE f.status <> 'completed') AS bad
        FROM ({finished}) AS f
        WHERE f.parent_id IS NOT NULL
        GROUP BY f.parent_id
    ) AS f
    WHERE p.id = f.parent_id AND p.status = 'waiting' AND p.children_pending > 0
      AND (SELECT count(*) FROM fan_lock) >= 0
    -- A parent queued again is due now: wake an idle worker for it (RETURNING is
    -- computed for every row, read or not).
    RETURNING p.id, p.status,
        CASE WHEN p.status = 'queued' THEN pg_notify('{CHANNEL}', '1') END IS NULL
            AS quiet
)"""


ENQUEUE = f"""
WITH input AS (
    SELECT * FROM unnest(
        %(hashes)s::text[], %(paths)s::text[], %(priorities)s::int[],
        %(at)s::timestamptz[], %(delays)s::float8[], %(max_attempts)s::int[],
        %(keys)s::text[]
    ) WITH ORDINALITY
        AS t(src_hash, input_path, priority, at, delay, max_attempts, key, ord)
), ins AS (
    INSERT INTO video_job
        (src_hash, input_path, priority, run_after, max_attempts, concurrency_key)
    SELECT src_hash, input_path, priority,
           COALESCE(at, now() + make_interval(secs => delay), now()), max_attempts,
           key
    FROM input
    ORDER BY ord
    ON CONFLICT ({_JOB_KEY}) DO NOTHING
    RETURNING id, src_hash
)
SELECT input.ord, COALESCE(ins.id, v.id) AS id
FROM input
LEFT JOIN ins ON ins.src_hash = input.src_hash
LEFT JOIN video_job AS v ON v.src_hash = input.src_hash
ORDER BY input.ord
"""


def _claimed_from(source: str) -> str:
    """The end of both claims: the jobs whose ids the CTE ``source`` chose become
    processing by ``%(worker)s`` (one attempt more), returned best first."""
    return f"""), claimed AS (
    UPDATE video_job AS v
    SET status = 'processing', locked_by = %(worker)s, locked_at = now(),
        heartbeat_at = now(), attempts = v.attempts + 1, updated_at = now()
    FROM {source}
    WHERE v.id = {source}.id
    RETURNING {_RETURNING}
)
SELECT * FROM claimed ORDER BY priority DESC, created_at, id
"""


# MATERIALIZED: the locking SELECT runs once, on its own, and feeds the UPDATE; inlined,
# the planner could evaluate it in a way that locks rows it then does not update.
# SKIP LOCKED: concurrent claimers pass over each other's rows instead of queueing.
# The order is that of video_job_queued_idx (priority DESC, created_at, id); the
# server sorts what RETURNING gives back in no particular order.
# A job whose concurrency key has a limit is left to CLAIM_LIMITED: the test costs a
# job without a key one NULL check (OR stops there).
CLAIM = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM video_job AS j
    WHERE status = 'queued' AND run_after <= now() AND attempts < max_attempts
      AND (concurrency_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM video_job_concurrency AS c
          WHERE c.concurrency_key = j.concurrency_key))
    ORDER BY priority DESC, created_at, id
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
{_claimed_from("picked")}"""

# CLAIM when some key has a limit. One statement; a limited key's claims are
# serialized on its video_job_concurrency row:
# - hint: the limited keys already full as this statement's snapshot counts them;
# - cand: the best due jobs, skipping those keys, locked SKIP LOCKED;
# - gate: the rows of the limited keys among them, locked in key order (a claim of
#   the same key waits for this one to commit; the order rules out deadlocks);
# - open: each gated key's free slots, counted by pgaccess_processing(), a VOLATILE
#   PL/pgSQL function, so with a snapshot taken after the lock: every claim of the key
#   committed before it is counted (the statement's own snapshot may predate them),
#   and none can be in flight;
# - take: the jobs without a limit, and per gated key no more than its free slots.
CLAIM_LIMITED = f"""
WITH hint AS MATERIALIZED (
    SELECT c.concurrency_key AS key FROM video_job_concurrency AS c
    WHERE c.max_running <= (
        SELECT count(*) FROM video_job AS r
        WHERE r.status = 'processing' AND r.concurrency_key = c.concurrency_key)
), cand AS MATERIALIZED (
    SELECT v.id, v.concurrency_key AS key, v.priority, v.created_at
    FROM video_job AS v
    WHERE v.status = 'queued' AND v.run_after <= now() AND v.attempts < v.max_attempts
      AND (v.concurrency_key IS NULL
           OR NOT EXISTS (SELECT 1 FROM hint WHERE hint.key = v.concurrency_key))
    ORDER BY v.priority DESC, v.created_at, v.id
    LIMIT %(limit)s
    FOR NO KEY UPDATE OF v SKIP LOCKED
), gate AS MATERIALIZED (
    SELECT c.concurrency_key AS key, c.max_running
    FROM video_job_concurrency AS c
    WHERE c.concurrency_key IN (SELECT key FROM cand WHERE key IS NOT NULL)
    ORDER BY c.concurrency_key
    FOR UPDATE OF c
), open AS MATERIALIZED (
    SELECT key, max_running - pgaccess_processing(key) AS free FROM gate
), take AS MATERIALIZED (
    SELECT x.id FROM (
        SELECT cand.id, cand.key, row_number() OVER (
            PARTITION BY cand.key ORDER BY cand.priority DESC, cand.created_at, cand.id
        ) AS nth
        FROM cand
    ) AS x
    LEFT JOIN open ON open.key = x.key
    WHERE x.key IS NULL OR open.key IS NULL OR x.nth <= open.free
{_claimed_from("take")}"""

LIMITS_EXIST = "SELECT EXISTS (SELECT 1 FROM video_job_concurrency) AS limited"

SET_CONCURRENCY = """
INSERT INTO video_job_concurrency (concurrency_key, max_running)
VALUES (%(key)s, %(max)s)
ON CONFLICT (concurrency_key) DO UPDATE
SET max_running = EXCLUDED.max_running, updated_at = now()
"""

DROP_CONCURRENCY = """
DELETE FROM video_job_concurrency WHERE concurrency_key = %(key)s
"""

CONCURRENCY_LIMITS = """
SELECT c.concurrency_key, c.max_running,
       (SELECT count(*) FROM video_job AS r
        WHERE r.status = 'processing' AND r.concurrency_key = c.concurrency_key)
           AS processing
FROM video_job_concurrency AS c
ORDER BY c.concurrency_key
"""

HEARTBEAT = """
UPDATE video_job SET heartbeat_at = now(), updated_at = now()
WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
RETURNING id
"""

HEARTBEAT_MANY = """
UPDATE video_job AS v SET heartbeat_at = now(), updated_at = now()
FROM unnest(%(ids)s::bigint[], %(workers)s::text[]) AS h(id, worker)
WHERE v.id = h.id AND v.status = 'processing' AND v.locked_by = h.worker
RETURNING v.id
"""

# What a completion writes with the job: its highlights and stage timings. The
# inserts read ``done``, so they write nothing when the job is no longer held (or a
# retry finds it already completed): that, not the metrics' op_id, is what keeps a
# retried completion from writing them twice, so the server makes the op_id
# (gen_random_uuid) when the client sends NULL.
_COMPLETION_WRITES = f"""
hl AS (
    INSERT INTO highlight (job_id, start_time, end_time, score, label)
    SELECT done.id, h.start_time, h.end_time, h.score, h.label
    FROM done, unnest(
        %(starts)s::float8[], %(ends)s::float8[], %(scores)s::float8[],
        %(labels)s::text[]
    ) AS h(start_time, end_time, score, label)
    ON CONFLICT ({_HIGHLIGHT_KEY}) DO NOTHING
    RETURNING 1
), m AS (
    INSERT INTO processing_metrics (op_id, job_id, stage, duration_ms)
    SELECT COALESCE(m.op_id, gen_random_uuid()), done.id, m.stage, m.duration_ms
    FROM done, unnest(%(op_ids)s::uuid[], %(stages)s::text[], %(durations)s::float8[])
        AS m(op_id, stage, duration_ms)
    ON CONFLICT ({_METRIC_KEY}) DO NOTHING
    RETURNING 1
)"""

# One statement, so one transaction: the job is completed together with its highlights
# and metrics, or not at all. COMPLETE is for a job without a parent (the usual one):
# a child matches nothing here and is completed by COMPLETE_CHILD, which also does its
# parent's fan-in. Two statements rather than one, because the fan-in's CTEs cost
# every completion more planning time than the completion itself.
COMPLETE = f"""
WITH done AS (
    UPDATE video_job
    SET status = 'completed', output_path = %(output_path)s, error = NULL,
        finished_at = now(), heartbeat_at = now(), updated_at = now()
    WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
      AND parent_id IS NULL
    RETURNING id
), {_COMPLETION_WRITES}
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT count(*) FROM hl) AS highlights,
       (SELECT count(*) FROM m) AS metrics
"""

COMPLETE_CHILD = f"""
WITH done AS (
    UPDATE video_job
    SET status = 'completed', output_path = %(output_path)s, error = NULL,
        finished_at = now(), heartbeat_at = now(), updated_at = now()
    WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
    RETURNING id, parent_id, status
), {_COMPLETION_WRITES}, {fan_in("SELECT parent_id, status FROM done")}
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT count(*) FROM hl) AS highlights,
       (SELECT count(*) FROM m) AS metrics
"""

# The end of a block that spawned children (their ids in %(children)s): they become
# queued (visible to workers) and the job 'waiting' for them, in one statement; or,
# when none is left to release (a re-run whose children already finished), the job
# is completed as COMPLETE does it. The job's row is locked first, so its children
# are released only with its own change. A spawned child not yet released is
# 'waiting' with attempts = 0 (it was never claimed); a waiting parent was.
COMPLETE_PARENT = f"""
WITH held AS MATERIALIZED (
    SELECT id FROM video_job
    WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
    FOR NO KEY UPDATE
), released AS (
    UPDATE video_job AS c SET status = 'queued', updated_at = now()
    WHERE c.id = ANY(%(children)s::bigint[]) AND c.parent_id = %(id)s
      AND c.status = 'waiting' AND c.attempts = 0 AND EXISTS (SELECT 1 FROM held)
    RETURNING c.id, c.run_after
), done AS (
    UPDATE video_job AS v
    SET status = CASE WHEN r.n > 0 THEN 'waiting' ELSE 'completed' END,
        children_pending = CASE WHEN r.n > 0 THEN r.n ELSE v.children_pending END,
        children_failed = CASE WHEN r.n > 0 THEN 0 ELSE v.children_failed END,
        then_complete = %(then_complete)s,
        output_path = %(output_path)s, error = NULL,
        finished_at = CASE WHEN r.n > 0 THEN NULL ELSE now() END,
        heartbeat_at = now(), updated_at = now()
    FROM (SELECT count(*) AS n FROM released) AS r
    WHERE v.id = %(id)s AND v.status = 'processing' AND v.locked_by = %(worker)s
    RETURNING v.id, v.parent_id, v.status
), woke AS (
    SELECT pg_notify('{CHANNEL}', count(*)::text) FROM released
    WHERE run_after <= now() HAVING count(*) > 0
), {_COMPLETION_WRITES},
{fan_in("SELECT parent_id, status FROM done WHERE status = 'completed'")}
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT count(*) FROM released) AS released,
       (SELECT count(*) FROM woke) AS woke,
       (SELECT status FROM done) AS status
"""

# COMPLETE for a batch of jobs held by one worker, in one statement (one transaction):
# each job is completed with its own highlights and timings or not at all, as COMPLETE
# does it; a job no longer held (or, here, a child) is left alone and missing from the
# result. Returns the ids completed. COMPLETE_MANY_CHILD: the same for a batch with
# children, with their parents' fan-in.
_COMPLETE_MANY = f"""
WITH done AS (
    UPDATE video_job AS v
    SET status = 'completed', output_path = c.output_path, error = NULL,
        finished_at = now(), heartbeat_at = now(), updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(output_paths)s::text[]) AS c(id, output_path)
    WHERE v.id = c.id AND v.status = 'processing' AND v.locked_by = %(worker)s
    RETURNING v.id, v.parent_id, v.status
), hl AS (
    INSERT INTO highlight (job_id, start_time, end_time, score, label)
    SELECT h.job_id, h.start_time, h.end_time, h.score, h.label
    FROM unnest(
        %(hl_jobs)s::bigint[], %(starts)s::float8[], %(ends)s::float8[],
        %(scores)s::float8[], %(labels)s::text[]
    ) AS h(job_id, start_time, end_time, score, label)
    JOIN done ON done.id = h.job_id
    ON CONFLICT ({_HIGHLIGHT_KEY}) DO NOTHING
), m AS (
    INSERT INTO processing_metrics (op_id, job_id, stage, duration_ms)
    SELECT gen_random_uuid(), m.job_id, m.stage, m.duration_ms
    FROM unnest(%(m_jobs)s::bigint[], %(stages)s::text[], %(durations)s::float8[])
        AS m(job_id, stage, duration_ms)
    JOIN done ON done.id = m.job_id
    ON CONFLICT ({_METRIC_KEY}) DO NOTHING
){{fan_in}}
SELECT id FROM done
"""
COMPLETE_MANY = _COMPLETE_MANY.format(fan_in="").replace(
    "AND v.locked_by = %(worker)s\n",
    "AND v.locked_by = %(worker)s\n      AND v.parent_id IS NULL\n",
)
COMPLETE_MANY_CHILD = _COMPLETE_MANY.format(
    fan_in=", " + fan_in("SELECT parent_id, status FROM done")
)

# attempts was counted at claim time: after the first failure the wait is BACKOFF_BASE,
# then doubles, capped at BACKOFF_MAX.
# FAIL for a job without a parent; FAIL_CHILD (a child, when FAIL matched nothing)
# also does the parent's fan-in when the child failed for good.
_FAIL = """
WITH failed AS (
UPDATE video_job
SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    error = %(error)s,
    run_after = CASE WHEN attempts < max_attempts
        THEN now() + make_interval(
            secs => least(%(max)s::float8, %(base)s::float8 * power(2, attempts - 1)))
        ELSE run_after END,
    finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END,
    updated_at = now()
WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s{guard}
RETURNING status, parent_id
){fan_in}
SELECT status FROM failed
"""
FAIL = _FAIL.format(guard="\n  AND parent_id IS NULL", fan_in="")
FAIL_CHILD = _FAIL.format(
    guard="",
    fan_in=", "
    + fan_in("SELECT parent_id, status FROM failed WHERE status = 'failed'"),
)

# A released job is due at once: wake an idle worker for it (the insert trigger only
# sees new jobs). The notification goes out when the statement commits. The final
# WHERE reads ``woke`` so that it runs: a plain SELECT in WITH runs only if read.
RELEASE_MANY = f"""
WITH released AS (
    UPDATE video_job
    SET status = 'queued', attempts = greatest(attempts - 1, 0), run_after = now(),
        updated_at = now()
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'processing'
      AND locked_by = %(worker)s
    RETURNING id
), woke AS (
    SELECT pg_notify('{CHANNEL}', count(*)::text) FROM released HAVING count(*) > 0
)
SELECT id FROM released WHERE (SELECT count(*) FROM woke) >= 0
"""

RELEASE = RELEASE_MANY.replace("ANY(%(ids)s::bigint[])", "%(id)s")

RECLAIM = f"""
WITH back AS (
    UPDATE video_job
    SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
        error = format('reclaimed: no heartbeat from %%s since %%s', locked_by,
                       heartbeat_at),
        locked_by = NULL,
        run_after = now(),
        finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END,
        updated_at = now()
    WHERE status = 'processing'
      AND heartbeat_at < now() - make_interval(secs => %(older)s::float8)
    RETURNING id, status, parent_id
), woke AS (
    SELECT pg_notify('{CHANNEL}', count(*)::text) FROM back
    WHERE status = 'queued' HAVING count(*) > 0
), {fan_in("SELECT parent_id, status FROM back WHERE status = 'failed'")}
SELECT id, status FROM back WHERE (SELECT count(*) FROM woke) >= 0
"""

RETRY_FAILED = """
UPDATE video_job
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL,
    locked_by = NULL, updated_at = now()
WHERE id = %(id)s AND status = 'failed'
RETURNING id
"""

# The job, then its queued and waiting descendants (a processing one finishes; its
# parent, cancelled, no longer waits for it); the job's own parent's fan-in.
# A failed job (%(failed)s) is cancelled by ``given_up``: its parent counted it when
# it failed, so no fan-in for it.
CANCEL = f"""
WITH RECURSIVE top AS (
    UPDATE video_job SET status = 'cancelled', finished_at = now(), updated_at = now()
    WHERE id = %(id)s AND status IN ('queued', 'processing', 'waiting')
    RETURNING id, parent_id, status
), given_up AS (
    UPDATE video_job SET status = 'cancelled', finished_at = now(), updated_at = now()
    WHERE id = %(id)s AND %(failed)s AND status = 'failed'
    RETURNING id
), tree(id) AS (
    SELECT c.id FROM video_job AS c WHERE c.parent_id = %(id)s
    UNION ALL
    SELECT c.id FROM video_job AS c JOIN tree ON c.parent_id = tree.id
), below AS (
    UPDATE video_job AS v
    SET status = 'cancelled', finished_at = now(), updated_at = now()
    FROM tree
    WHERE v.id = tree.id AND v.status IN ('queued', 'waiting')
      AND (EXISTS (SELECT 1 FROM top) OR EXISTS (SELECT 1 FROM given_up))
    RETURNING v.id
), {fan_in("SELECT parent_id, status FROM top")}
SELECT id, (SELECT count(*) FROM below) AS descendants FROM top
UNION ALL
SELECT id, (SELECT count(*) FROM below) FROM given_up
"""

# A block's spawned children not released (the block failed for good): cancelled,
# so a parent that failed spawns nothing.
CANCEL_UNRELEASED = """
UPDATE video_job SET status = 'cancelled', finished_at = now(), updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND parent_id = %(parent)s
  AND status = 'waiting' AND attempts = 0
RETURNING id
"""

# A child job: numbered by its parent's children_count (the parent row's lock orders
# concurrent creators, so indexes come without gaps), unless its src_hash already has a
# job (a re-run): then no number is taken and that job is the child.
_CHILD_NUMBER = """
existing AS MATERIALIZED (
    SELECT id FROM video_job WHERE src_hash = %(src_hash)s
), num AS (
    UPDATE video_job AS p SET children_count = coalesce(p.children_count, 0) + 1
    WHERE p.id = {parent} AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING coalesce(p.job_number, p.id::text) || '.' || p.children_count
        AS job_number
)"""

# track(): the job row, created processing and held by the worker (a re-run of the
# same src_hash takes the finished or queued job over, one attempt more; a job
# processing or waiting elsewhere is left alone and no row comes back).
TRACK = f"""
WITH {_CHILD_NUMBER.format(parent="%(parent)s")}, ins AS (
    INSERT INTO video_job AS v
        (src_hash, input_path, status, parent_id, job_number, locked_by, locked_at,
         heartbeat_at, attempts, max_attempts)
    VALUES (%(src_hash)s, %(input_path)s, 'processing', %(parent)s,
            (SELECT job_number FROM num), %(worker)s, now(), now(), 1, 1)
    ON CONFLICT ({_JOB_KEY}) DO UPDATE
    SET status = 'processing', input_path = coalesce(EXCLUDED.input_path, v.input_path),
        locked_by = EXCLUDED.locked_by, locked_at = now(), heartbeat_at = now(),
        attempts = v.attempts + 1, max_attempts = v.attempts + 1, run_after = now(),
        finished_at = NULL, updated_at = now()
    WHERE v.status NOT IN ('processing', 'waiting')
    RETURNING {_RETURNING}
)
SELECT * FROM ins
"""

# job.spawn(): the child, 'waiting' until its parent's block ends (COMPLETE_PARENT),
# if the parent is still held. Returns the child's id (an existing job's for a
# src_hash that has one), and whether the parent is held.
SPAWN = f"""
WITH held AS MATERIALIZED (
    SELECT id FROM video_job
    WHERE id = %(parent)s AND status = 'processing' AND locked_by = %(worker)s
), {_CHILD_NUMBER.format(parent="(SELECT id FROM held)")},
ins AS (
    INSERT INTO video_job
        (src_hash, input_path, status, priority, run_after, max_attempts,
         concurrency_key, parent_id, job_number)
    SELECT %(src_hash)s, %(input_path)s, 'waiting', %(priority)s,
           COALESCE(%(at)s::timestamptz,
                    now() + make_interval(secs => %(delay)s::float8), now()),
           %(max_attempts)s, %(key)s, %(parent)s, num.job_number
    FROM num
    ON CONFLICT ({_JOB_KEY}) DO NOTHING
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM held) AS held,
       COALESCE((SELECT id FROM ins), (SELECT id FROM existing)) AS id
"""

# A parent that ends first fails its tracked children still open.
FAIL_ORPHANS = """
UPDATE video_job
SET status = 'failed', error = %(error)s, finished_at = now(), updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND parent_id = %(parent)s AND status = 'processing'
RETURNING id
"""

CHILDREN = """
SELECT id, src_hash, coalesce(job_number, id::text) AS job_number, status, error,
       output_path, attempts, created_at, finished_at
FROM video_job
WHERE parent_id = %(id)s
ORDER BY length(job_number), job_number, id
"""

PURGE = """
WITH gone AS (
    DELETE FROM video_job
    WHERE status IN ('completed', 'failed', 'cancelled')
      AND finished_at < now() - make_interval(secs => %(older)s::float8)
    RETURNING 1
)
SELECT count(*) AS purged FROM gone
"""

JOB_STATE = "SELECT status, locked_by FROM video_job WHERE id = %(id)s"

JOB_STATES = """
SELECT id, status, locked_by FROM video_job WHERE id = ANY(%(ids)s::bigint[])
"""

STATS = """
SELECT
    count(*) FILTER (WHERE status = 'queued') AS queued,
    count(*) FILTER (WHERE status = 'processing') AS processing,
    count(*) FILTER (WHERE status = 'completed') AS completed,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
    count(*) FILTER (WHERE status = 'waiting') AS waiting,
    count(*) AS total,
    count(*) FILTER (WHERE attempts > 1) AS retried,
    extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'queued'))::float8
        AS oldest_queued_s,
    (count(*) FILTER (WHERE finished_at > now() - interval '5 minutes'))::float8 / 5
        AS finished_per_minute,
    (count(*) FILTER (WHERE status = 'completed'))::float8
        / NULLIF(count(*) FILTER (WHERE status IN ('completed', 'failed')), 0)
        AS success_rate,
    avg(extract(epoch FROM finished_at - locked_at)::float8)
        FILTER (WHERE status = 'completed') AS mean_processing_s,
    percentile_cont(0.95) WITHIN GROUP (
        ORDER BY extract(epoch FROM finished_at - locked_at)::float8)
        FILTER (WHERE status = 'completed') AS p95_processing_s
FROM video_job
WHERE %(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[])
"""

ADD_HIGHLIGHTS = f"""
INSERT INTO highlight (job_id, start_time, end_time, score, label)
SELECT %(job_id)s, h.start_time, h.end_time, h.score, h.label
FROM unnest(
    %(starts)s::float8[], %(ends)s::float8[], %(scores)s::float8[], %(labels)s::text[]
) AS h(start_time, end_time, score, label)
ON CONFLICT ({_HIGHLIGHT_KEY}) DO NOTHING
RETURNING id
"""

HIGHLIGHTS_FOR_JOB = """
SELECT id, job_id, start_time, end_time, score, label, created_at
FROM highlight
WHERE job_id = %(job_id)s AND (%(min)s::float8 IS NULL OR score >= %(min)s::float8)
ORDER BY start_time, end_time
"""

TOP_HIGHLIGHTS = """
SELECT id, job_id, start_time, end_time, score, label, created_at
FROM highlight
ORDER BY score DESC, id
LIMIT %(n)s
"""

RECORD_METRIC = f"""
INSERT INTO processing_metrics (op_id, job_id, stage, duration_ms)
VALUES (%(op_id)s::uuid, %(job_id)s, %(stage)s, %(duration_ms)s)
ON CONFLICT ({_METRIC_KEY}) DO NOTHING
"""

METRICS_SUMMARY = """
SELECT stage,
       count(*) AS count,
       avg(duration_ms) AS mean_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(duration_ms) AS max_ms
FROM processing_metrics
WHERE (%(ids)s::bigint[] IS NULL OR job_id = ANY(%(ids)s::bigint[]))
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
GROUP BY stage
ORDER BY stage
"""

# The demo's progress (``pgaccess demo``): its run's jobs by state, and whether the
# database holds work that is not the demo's. A video split into segments runs once
# more to merge them (children_pending = 0): that run is not a retry.
DEMO_PROGRESS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('queued', 'processing', 'waiting'))
           AS unfinished,
       count(*) FILTER (WHERE attempts > 1 + coalesce((children_pending = 0)::int, 0))
           AS retried
FROM video_job WHERE id = ANY(%(ids)s::bigint[])
"""

DEMO_RUN_TOTALS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status IN ('queued', 'processing', 'waiting'))
           AS unfinished,
       count(*) FILTER (WHERE attempts > 1 + coalesce((children_pending = 0)::int, 0))
           AS retried,
       coalesce(sum(attempts - coalesce((children_pending = 0)::int, 0)), 0)
           AS attempts,
       (SELECT count(*) FROM highlight WHERE job_id = ANY(%(ids)s::bigint[]))
           AS highlights,
       extract(epoch FROM max(finished_at) - %(started)s::timestamptz)::float8
           AS elapsed_s
FROM video_job WHERE id = ANY(%(ids)s::bigint[])
"""

# The segments of the demo's videos split into children (``pgaccess demo --segments``).
DEMO_SEGMENTS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) AS total
FROM video_job WHERE parent_id = ANY(%(ids)s::bigint[])
"""

DEMO_FOREIGN_WORK = """
SELECT count(*) AS n FROM video_job
WHERE status IN ('queued', 'processing') AND NOT starts_with(src_hash, %(prefix)s)
"""

# Operations: the queue gauges of ``pgaccess.metrics`` (one statement per interval per
# process) and the reads of ``pgaccess dashboard``. Each serves from an index where
# the table grows (finished jobs): only the counts by status scan it.
QUEUE_GAUGES = """
SELECT status, count(*) AS n,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_s
FROM video_job GROUP BY status
"""

THROUGHPUT = """
WITH done AS (
    SELECT date_trunc('minute', finished_at) AS minute,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed') AS failed
    FROM video_job
    WHERE finished_at
          >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
    GROUP BY 1
)
SELECT m.minute, coalesce(done.completed, 0) AS completed,
       coalesce(done.failed, 0) AS failed
FROM generate_series(
    date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
    date_trunc('minute', now()), interval '1 minute'
) AS m(minute)
LEFT JOIN done ON done.minute = m.minute
ORDER BY m.minute
"""

OLDEST_QUEUED = """
SELECT id, src_hash, input_path, priority, attempts, max_attempts, created_at,
       run_after, extract(epoch FROM now() - created_at)::float8 AS age_s
FROM video_job WHERE status = 'queued'
ORDER BY created_at, id LIMIT 1
"""

RUNNING = """
SELECT id, src_hash, locked_by, attempts, max_attempts,
       extract(epoch FROM now() - locked_at)::float8 AS running_s,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
FROM video_job WHERE status = 'processing'
ORDER BY locked_at, id LIMIT %(n)s
"""

# The last errors: jobs failed for good, and queued ones whose last attempt failed.
LATEST_FAILURES = """
SELECT * FROM (
    (SELECT id, src_hash, status, attempts, max_attempts, error, updated_at
     FROM video_job WHERE status = 'failed' ORDER BY finished_at DESC LIMIT %(n)s)
    UNION ALL
    (SELECT id, src_hash, status, attempts, max_attempts, error, updated_at
     FROM video_job WHERE status = 'queued' AND error IS NOT NULL
     ORDER BY updated_at DESC LIMIT %(n)s)
) AS f
ORDER BY updated_at DESC, id DESC LIMIT %(n)s
"""
