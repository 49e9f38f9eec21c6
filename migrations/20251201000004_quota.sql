-- Monthly message quotas: the count per tenant and period, and which messages were counted.

CREATE TABLE monthly_usage (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- `YYYY-MM`, UTC.
    period     text NOT NULL,
    used       bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period)
);

-- One row per message granted by the quota: a retried job counts once and gets its first answer.
-- A refused message leaves no row (it counts nothing).
CREATE TABLE quota_consumptions (
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    period              text NOT NULL,
    provider_message_id text NOT NULL,
    -- `monthly_usage.used` right after this message was counted.
    used_after          bigint NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, provider_message_id)
);
