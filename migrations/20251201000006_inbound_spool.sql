-- Webhook events made durable in PostgreSQL while Redis is down; workers process them from here.

CREATE TABLE inbound_spool (
    id               bigserial PRIMARY KEY,
    -- The queued event (`queue::QueuedEvent` as JSON).
    event            jsonb NOT NULL,
    shard            integer NOT NULL,
    -- Events with the same key are processed one at a time, in id order.
    conversation_key text NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    -- Not claimable before (retry backoff).
    available_at     timestamptz NOT NULL DEFAULT now(),
    -- A worker's lease: the row is not claimable again before, unless the worker finishes it.
    locked_until     timestamptz,
    last_error       text,
    done_at          timestamptz
);

-- Claiming: unfinished rows in order.
CREATE INDEX inbound_spool_unfinished ON inbound_spool (id) WHERE done_at IS NULL;
-- Per-conversation order: is there an older unfinished row of the same conversation?
CREATE INDEX inbound_spool_unfinished_by_conversation ON inbound_spool (conversation_key, id)
    WHERE done_at IS NULL;
