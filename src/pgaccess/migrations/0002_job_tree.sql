-- Jobs in jobs: nested tracking, fan-out/fan-in and per-key concurrency limits.
-- Takes a database at 0001_initial.sql to the schema of sql/schema.sql: the same
-- columns (appended, in the same order), constraints and indexes, by the same names.
-- Every new column is nullable with no default: adding them rewrites nothing.

ALTER TABLE video_job
    ADD COLUMN IF NOT EXISTS parent_id bigint,
    ADD COLUMN IF NOT EXISTS job_number text,
    ADD COLUMN IF NOT EXISTS children_count integer,
    ADD COLUMN IF NOT EXISTS children_pending integer,
    ADD COLUMN IF NOT EXISTS children_failed integer,
    ADD COLUMN IF NOT EXISTS then_complete boolean,
    ADD COLUMN IF NOT EXISTS concurrency_key text,
    -- The new status 'waiting'. The old check was the column's unnamed one, which
    -- PostgreSQL named video_job_status_check; the new one is named explicitly.
    DROP CONSTRAINT IF EXISTS video_job_status_check,
    ADD CONSTRAINT video_job_status_check CHECK (
        status IN ('queued', 'processing', 'completed', 'failed', 'cancelled', 'waiting'));

CREATE INDEX IF NOT EXISTS video_job_parent_idx
    ON video_job (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS video_job_key_processing_idx
    ON video_job (concurrency_key)
    WHERE status = 'processing' AND concurrency_key IS NOT NULL;

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
