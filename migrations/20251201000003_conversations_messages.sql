-- Conversations (one per business number and end user) and their messages, inbound and outbound.

CREATE TABLE conversations (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id            uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    channel_id           uuid NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    -- The user's WhatsApp id (phone number digits): needed to reply. Never logged unmasked.
    wa_id                text NOT NULL,
    contact_name         text,
    -- The provider timestamp of the user's latest message: the 24-hour customer-service window.
    last_inbound_at      timestamptz,
    -- Set when the monthly quota refused a message: the period (`YYYY-MM`, UTC) and the limit then.
    quota_blocked_period text,
    quota_blocked_limit  bigint,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel_id, wa_id)
);

CREATE INDEX conversations_tenant_id ON conversations (tenant_id);

CREATE TABLE messages (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    channel_id          uuid NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    conversation_id     uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    direction           text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    -- Inbound: the user's message id (wamid). Outbound: set once the provider accepted the send.
    provider_message_id text,
    -- Inbound: the job that recorded it (a redelivery has another job id).
    job_id              text,
    -- Outbound: the inbound wamid it answers.
    in_reply_to         text,
    message_type        text NOT NULL DEFAULT 'text',
    body                text,
    -- Inbound: received. Outbound: pending (recorded, not yet accepted by the provider), then
    -- sent < delivered < read, or failed (terminal, with its error code).
    status              text NOT NULL
                        CHECK (status IN ('received', 'pending', 'sent', 'delivered', 'read', 'failed')),
    error_code          text,
    error_reason        text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Inbound: the provider's timestamp. Outbound: when the provider accepted it.
    sent_at             timestamptz,
    delivered_at        timestamptz,
    read_at             timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((direction = 'inbound') = (status = 'received')),
    -- Idempotence of the webhook's at-least-once delivery: one row per provider message. NULLs
    -- (outbound rows not yet sent) do not collide.
    CONSTRAINT messages_channel_provider_message_id UNIQUE (channel_id, provider_message_id)
);

-- At most one answer per inbound message: a retried job finds the row its first run wrote.
CREATE UNIQUE INDEX messages_one_reply_per_inbound ON messages (channel_id, in_reply_to)
    WHERE direction = 'outbound';
-- The conversation's history, newest first.
CREATE INDEX messages_conversation_recent ON messages (conversation_id, created_at DESC);
CREATE INDEX messages_tenant_id ON messages (tenant_id);
