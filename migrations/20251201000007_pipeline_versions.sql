-- A record of the pipeline configurations that were loaded (audit: what ran when).

CREATE TABLE pipeline_versions (
    id             bigserial PRIMARY KEY,
    -- Hex SHA-256 of the file's content.
    content_hash   text NOT NULL UNIQUE,
    content        text NOT NULL,
    -- First and latest time this content was loaded.
    loaded_at      timestamptz NOT NULL DEFAULT now(),
    last_loaded_at timestamptz NOT NULL DEFAULT now()
);
