-- The tenants' knowledge bases: documents and their chunks with embeddings (768 dimensions,
-- cosine distance, HNSW).

CREATE TABLE knowledge_documents (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    title        text NOT NULL,
    -- Where it came from: the uploaded file name or a URL.
    source       text NOT NULL,
    -- Hex SHA-256 of the original: the same content is stored once per tenant.
    content_hash text NOT NULL,
    content_type text,
    -- The original in object storage.
    object_key   text,
    status       text NOT NULL DEFAULT 'uploaded'
                 CHECK (status IN ('uploaded', 'indexing', 'indexed', 'error')),
    error        text,
    bytes        bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, content_hash)
);

CREATE TABLE knowledge_chunks (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    document_id uuid NOT NULL REFERENCES knowledge_documents (id) ON DELETE CASCADE,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    ordinal     integer NOT NULL,
    text        text NOT NULL,
    embedding   vector(768) NOT NULL,
    UNIQUE (document_id, ordinal)
);

CREATE INDEX knowledge_chunks_tenant_id ON knowledge_chunks (tenant_id);
CREATE INDEX knowledge_chunks_embedding ON knowledge_chunks USING hnsw (embedding vector_cosine_ops);
