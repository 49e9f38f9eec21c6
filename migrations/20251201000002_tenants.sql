-- Who uses Parley: plans, tenants (businesses), their WhatsApp channels (business numbers) and
-- their assistants.

CREATE TABLE plans (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- starter, pro, business, enterprise (seeded); operators may add more.
    code                  text NOT NULL UNIQUE,
    name                  text NOT NULL,
    -- Messages per calendar month (UTC); NULL = unlimited.
    monthly_message_limit bigint CHECK (monthly_message_limit >= 0),
    -- The pipeline tier (`[tiers.<name>]` in the pipeline file); NULL = the base pipeline.
    tier                  text,
    max_documents         integer NOT NULL CHECK (max_documents >= 0),
    max_storage_bytes     bigint NOT NULL CHECK (max_storage_bytes >= 0),
    created_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id                             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                           text NOT NULL UNIQUE,
    -- NULL: the base pipeline and the default limits (see `store::DEFAULT_MONTHLY_MESSAGES`).
    plan_id                        uuid REFERENCES plans (id),
    -- Overrides the plan's monthly limit for this tenant.
    monthly_message_limit_override bigint CHECK (monthly_message_limit_override >= 0),
    created_at                     timestamptz NOT NULL DEFAULT now(),
    updated_at                     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tenants_plan_id ON tenants (plan_id);

CREATE TABLE channels (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id            uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    provider             text NOT NULL CHECK (provider IN ('meta', '360dialog', 'sandbox')),
    -- Meta's `metadata.phone_number_id`: resolves every webhook event to its channel and tenant.
    phone_number_id      text NOT NULL UNIQUE,
    display_phone_number text,
    -- Per-channel overrides of the provider secrets: {"api_key": ..., "webhook_token": ...}.
    -- Secret: never logged, never returned by an API.
    credentials          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX channels_tenant_id ON channels (tenant_id);

CREATE TABLE assistants (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name          text NOT NULL,
    system_prompt text NOT NULL,
    -- NULL: the pipeline's model and temperature.
    model         text,
    temperature   real CHECK (temperature >= 0),
    is_default    boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX assistants_tenant_id ON assistants (tenant_id);
-- One default assistant per tenant: the one that answers on its channels.
CREATE UNIQUE INDEX assistants_one_default_per_tenant ON assistants (tenant_id) WHERE is_default;
