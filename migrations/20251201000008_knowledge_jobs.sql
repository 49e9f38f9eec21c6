-- Knowledge ingestion as durable jobs: `knowledge_documents` is its own queue. A row `uploaded`
-- whose `next_attempt_at` has come is claimable; a worker claims it (`indexing`, `locked_by`,
-- `locked_until` = now + lease, `attempts` + 1) with FOR UPDATE SKIP LOCKED, renews the lease
-- while it works, and ends it `indexed` (chunks and status in one transaction), `error`, or back
-- to `uploaded` with a later `next_attempt_at` for a retry. A row `indexing` whose lease ran out
-- belongs to a worker that died: it is claimable again.

ALTER TABLE knowledge_documents
    ADD COLUMN attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN locked_until    timestamptz,
    ADD COLUMN locked_by       text;

-- Documents indexed before this migration are done; nothing to claim.
CREATE INDEX knowledge_documents_claimable ON knowledge_documents (next_attempt_at, created_at)
    WHERE status IN ('uploaded', 'indexing');

-- Wakes the knowledge workers (LISTEN parley_knowledge_jobs) as soon as a job is queued; they
-- also poll, so a lost notification only delays a job by the poll interval.
CREATE FUNCTION knowledge_documents_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('parley_knowledge_jobs', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER knowledge_documents_queued
    AFTER INSERT OR UPDATE OF status ON knowledge_documents
    FOR EACH ROW WHEN (NEW.status = 'uploaded')
    EXECUTE FUNCTION knowledge_documents_notify();
