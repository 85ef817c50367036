-- pgaccess: the video pipeline's schema, the newest version in one file, for readers.
-- Databases are made and upgraded by the numbered migrations shipped in the package
-- (src/pgaccess/migrations/NNNN_name.sql), applied by `pgaccess migrate` or
-- pgaccess.schema.migrate(); tests/test_migrations.py checks that migrating an empty
-- database builds exactly what this file builds. A change to the schema is a new
-- migration AND the same change here (columns added by ALTER TABLE go last).

CREATE TABLE IF NOT EXISTS video_job (
    id            bigserial PRIMARY KEY,
    src_hash      text        NOT NULL UNIQUE,
    -- Nullable on purpose: the usage guide's transaction example enqueues a job with only
    -- src_hash and status. The jobs layer always sets it.
    input_path    text,
    status        text        NOT NULL DEFAULT 'queued',
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
    finished_at   timestamptz,
    -- Jobs in jobs (nested tracking, fan-out/fan-in). All nullable with no default, so
    -- a plain queued job stores none of them (a bit each in the row's null bitmap).
    -- The job this one is a child of; no foreign key: a child finishes before its
    -- parent, and a key would cost a trigger per enqueued row.
    parent_id     bigint,
    -- "17.2.1": the parent's number, a dot, the child's index. NULL for a root job,
    -- whose number is its id.
    job_number    text,
    -- The last child index handed out (children are numbered without gaps from it).
    children_count   integer,
    -- Spawned children not finished yet, while the job is 'waiting'; 0 once the last
    -- one finished (the job's handler then sees children_done).
    children_pending integer,
    -- How many of them ended failed or cancelled.
    children_failed  integer,
    -- Complete the job, rather than queue it again, when its last child completed.
    then_complete boolean,
    -- At most video_job_concurrency.max_running jobs of a key are processing at once.
    concurrency_key text,
    -- 'waiting': a parent waiting for the children it spawned, or a spawned child
    -- waiting for its parent's block to end (never claimed yet: attempts = 0).
    CONSTRAINT video_job_status_check CHECK (
        status IN ('queued', 'processing', 'completed', 'failed', 'cancelled', 'waiting'))
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
-- Serves children(), cancel()'s walk down a job tree and a block's open children.
CREATE INDEX IF NOT EXISTS video_job_parent_idx
    ON video_job (parent_id) WHERE parent_id IS NOT NULL;
-- Serves the claim's count of a limited key's processing jobs.
CREATE INDEX IF NOT EXISTS video_job_key_processing_idx
    ON video_job (concurrency_key)
    WHERE status = 'processing' AND concurrency_key IS NOT NULL;
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

-- Per-key concurrency limits (VideoJobs.set_concurrency): at most max_running jobs
-- with that concurrency_key are processing at once, across every worker and host.
-- Keys without a row are unlimited. A claim of a limited key locks its row, so
-- claims of one key are serialized (see pgaccess/jobs/queries.py, CLAIM_LIMITED).
CREATE TABLE IF NOT EXISTS video_job_concurrency (
    concurrency_key text        PRIMARY KEY,
    max_running     integer     NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT video_job_concurrency_max_running_check CHECK (max_running >= 0)
);

-- How many jobs of a concurrency key are processing, counted with a snapshot of its
-- own: VOLATILE PL/pgSQL takes a new snapshot for each statement it runs, so a claim
-- that calls it after locking the key's video_job_concurrency row counts every claim
-- of that key committed before the lock (see pgaccess/jobs/queries.py, CLAIM_LIMITED).
CREATE OR REPLACE FUNCTION pgaccess_processing(p_key text) RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN (SELECT count(*) FROM video_job
            WHERE status = 'processing' AND concurrency_key = p_key);
END
$$;

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
