-- pgaccess: the video pipeline's schema. The one source of the schema; shipped inside
-- the package as pgaccess/schema.sql and applied by `pgaccess init-db` or
-- pgaccess.schema.apply(). Idempotent: applying it twice changes nothing.
--
-- Applied inside one transaction under a transaction-scoped advisory lock (see
-- pgaccess/schema.py), so concurrent appliers queue instead of racing on the catalog.

CREATE TABLE IF NOT EXISTS video_job (
    id            bigserial PRIMARY KEY,
    src_hash      text        NOT NULL UNIQUE,
    -- Nullable on purpose: the usage guide's transaction example enqueues a job with only
    -- src_hash and status. The jobs layer always sets it.
    input_path    text,
    status        text        NOT NULL DEFAULT 'queued'
                  CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    priority      integer     NOT NULL DEFAULT 0,
    attempts      integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts  integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after     timestamptz NOT NULL DEFAULT now(),
    locked_by     text,
    locked_at     timestamptz,
    heartbeat_at  timestamptz,
    error         text,
    output_path   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

-- Serves claim(): "the highest priority, then the oldest, queued job". Partial, so it
-- stays small however many finished jobs the table keeps.
CREATE INDEX IF NOT EXISTS video_job_queued_idx
    ON video_job (priority DESC, created_at, id) WHERE status = 'queued';
-- Serves reclaim_stale() (the processing jobs, few) and a worker's look-up of the jobs
-- it holds. Not on heartbeat_at: every heartbeat rewrites that column, and an index on it
-- would turn each heartbeat into a non-HOT update writing every index of the table.
DROP INDEX IF EXISTS video_job_processing_idx;
CREATE INDEX IF NOT EXISTS video_job_held_idx
    ON video_job (locked_by) WHERE status = 'processing';
-- Serves purge() and the finished-per-minute figure of stats().
CREATE INDEX IF NOT EXISTS video_job_finished_idx
    ON video_job (finished_at) WHERE finished_at IS NOT NULL;

-- updated_at is set by the queue's own statements (updated_at = now()), not by a row
-- trigger: the trigger cost a PL/pgSQL call per updated row, on every claim, heartbeat
-- and completion. A plain UPDATE of video_job (say db.update) sets it only if told to.
DROP TRIGGER IF EXISTS video_job_touch_updated_at ON video_job;
DROP FUNCTION IF EXISTS pgaccess_touch_updated_at();

-- Wakes idle workers (LISTEN pgaccess_video_job, see pgaccess/jobs/listener.py): once per
-- INSERT statement, however many rows it inserts, with the number of jobs that are due
-- now as the payload. Jobs due later, and jobs a failure put back with a backoff, are
-- found by the workers' polling. Statement-level, so a 100,000-row enqueue is one
-- notification; it also covers inserts that do not go through VideoJobs.
CREATE OR REPLACE FUNCTION pgaccess_video_job_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    due bigint;
BEGIN
    SELECT count(*) INTO due FROM pgaccess_new_jobs
    WHERE status = 'queued' AND run_after <= now();
    IF due > 0 THEN
        -- The time makes each payload unique: NOTIFY folds identical ones sent in one
        -- transaction, and 100 one-row inserts there are 100 jobs, not 1.
        PERFORM pg_notify('pgaccess_video_job', due || ' ' || clock_timestamp());
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS video_job_notify ON video_job;
CREATE TRIGGER video_job_notify
    AFTER INSERT ON video_job REFERENCING NEW TABLE AS pgaccess_new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION pgaccess_video_job_notify();

-- The queue churns: every job is inserted, updated twice or more, and (with purge)
-- deleted. Vacuum it after 1% of dead rows rather than 20%, so the claim's index scan
-- does not wade through dead entries; leave room in each page for HOT heartbeats.
ALTER TABLE video_job SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 500,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1,
    fillfactor = 90
);

CREATE TABLE IF NOT EXISTS highlight (
    id          bigserial PRIMARY KEY,
    job_id      bigint           NOT NULL REFERENCES video_job (id) ON DELETE CASCADE,
    start_time  double precision NOT NULL CHECK (start_time >= 0),
    end_time    double precision NOT NULL,
    score       double precision NOT NULL,
    label       text,
    created_at  timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT highlight_span_check CHECK (end_time > start_time),
    -- The natural key: re-adding a job's highlights (a retried job, a retried write)
    -- adds nothing.
    CONSTRAINT highlight_job_span_key UNIQUE (job_id, start_time, end_time)
);

CREATE INDEX IF NOT EXISTS highlight_score_idx ON highlight (score DESC);

CREATE TABLE IF NOT EXISTS processing_metrics (
    id           bigserial PRIMARY KEY,
    -- A metric has no natural key, so the writer gives it one: a UUID generated by the
    -- client before the first attempt, so a retry after an unknown outcome is a no-op.
    op_id        uuid             NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    job_id       bigint           REFERENCES video_job (id) ON DELETE CASCADE,
    stage        text             NOT NULL,
    duration_ms  double precision NOT NULL CHECK (duration_ms >= 0),
    created_at   timestamptz      NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS processing_metrics_job_idx ON processing_metrics (job_id);
CREATE INDEX IF NOT EXISTS processing_metrics_stage_idx
    ON processing_metrics (stage, created_at);
