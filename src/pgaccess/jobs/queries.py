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
)
_RETURNING = ", ".join(f"v.{c}" for c in CLAIMED_COLUMNS)

ENQUEUE = f"""
WITH input AS (
    SELECT * FROM unnest(
        %(hashes)s::text[], %(paths)s::text[], %(priorities)s::int[],
        %(at)s::timestamptz[], %(delays)s::float8[], %(max_attempts)s::int[]
    ) WITH ORDINALITY AS t(src_hash, input_path, priority, at, delay, max_attempts, ord)
), ins AS (
    INSERT INTO video_job (src_hash, input_path, priority, run_after, max_attempts)
    SELECT src_hash, input_path, priority,
           COALESCE(at, now() + make_interval(secs => delay), now()), max_attempts
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

# MATERIALIZED: the locking SELECT runs once, on its own, and feeds the UPDATE; inlined,
# the planner could evaluate it in a way that locks rows it then does not update.
# SKIP LOCKED: concurrent claimers pass over each other's rows instead of queueing.
# The order is that of video_job_queued_idx (priority DESC, created_at, id); the
# server sorts what RETURNING gives back in no particular order.
CLAIM = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM video_job
    WHERE status = 'queued' AND run_after <= now() AND attempts < max_attempts
    ORDER BY priority DESC, created_at, id
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
), claimed AS (
    UPDATE video_job AS v
    SET status = 'processing', locked_by = %(worker)s, locked_at = now(),
        heartbeat_at = now(), attempts = v.attempts + 1, updated_at = now()
    FROM picked
    WHERE v.id = picked.id
    RETURNING {_RETURNING}
)
SELECT * FROM claimed ORDER BY priority DESC, created_at, id
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

# One statement, so one transaction: the job is completed together with its highlights
# and metrics, or not at all. The inserts read ``done``, so they write nothing when the
# job is no longer held (or a retry finds it already completed): that, not the
# metrics' op_id, is what keeps a retried completion from writing them twice, so the
# server makes the op_id (gen_random_uuid) when the client sends NULL.
COMPLETE = f"""
WITH done AS (
    UPDATE video_job
    SET status = 'completed', output_path = %(output_path)s, error = NULL,
        finished_at = now(), heartbeat_at = now(), updated_at = now()
    WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
    RETURNING id
), hl AS (
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
)
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT count(*) FROM hl) AS highlights,
       (SELECT count(*) FROM m) AS metrics
"""

# COMPLETE for a batch of jobs held by one worker, in one statement (one transaction):
# each job is completed with its own highlights and timings or not at all, as COMPLETE
# does it; a job no longer held is left alone and missing from the result. Returns the
# ids completed.
COMPLETE_MANY = f"""
WITH done AS (
    UPDATE video_job AS v
    SET status = 'completed', output_path = c.output_path, error = NULL,
        finished_at = now(), heartbeat_at = now(), updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(output_paths)s::text[]) AS c(id, output_path)
    WHERE v.id = c.id AND v.status = 'processing' AND v.locked_by = %(worker)s
    RETURNING v.id
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
)
SELECT id FROM done
"""

# attempts was counted at claim time: after the first failure the wait is BACKOFF_BASE,
# then doubles, capped at BACKOFF_MAX.
FAIL = """
UPDATE video_job
SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    error = %(error)s,
    run_after = CASE WHEN attempts < max_attempts
        THEN now() + make_interval(
            secs => least(%(max)s::float8, %(base)s::float8 * power(2, attempts - 1)))
        ELSE run_after END,
    finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END,
    updated_at = now()
WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
RETURNING status
"""

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
    RETURNING id, status
), woke AS (
    SELECT pg_notify('{CHANNEL}', count(*)::text) FROM back
    WHERE status = 'queued' HAVING count(*) > 0
)
SELECT id, status FROM back WHERE (SELECT count(*) FROM woke) >= 0
"""

RETRY_FAILED = """
UPDATE video_job
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL,
    locked_by = NULL, updated_at = now()
WHERE id = %(id)s AND status = 'failed'
RETURNING id
"""

CANCEL = """
UPDATE video_job SET status = 'cancelled', finished_at = now(), updated_at = now()
WHERE id = %(id)s
  AND (status IN ('queued', 'processing') OR (%(failed)s AND status = 'failed'))
RETURNING id
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
# database holds work that is not the demo's.
DEMO_PROGRESS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('queued', 'processing')) AS unfinished,
       count(*) FILTER (WHERE attempts > 1) AS retried
FROM video_job WHERE id = ANY(%(ids)s::bigint[])
"""

DEMO_RUN_TOTALS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status IN ('queued', 'processing')) AS unfinished,
       count(*) FILTER (WHERE attempts > 1) AS retried,
       coalesce(sum(attempts), 0) AS attempts,
       (SELECT count(*) FROM highlight WHERE job_id = ANY(%(ids)s::bigint[]))
           AS highlights,
       extract(epoch FROM max(finished_at) - %(started)s::timestamptz)::float8
           AS elapsed_s
FROM video_job WHERE id = ANY(%(ids)s::bigint[])
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
