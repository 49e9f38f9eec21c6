-- pgvector: the `vector` type and its HNSW index for the knowledge chunks' embeddings.
-- IF NOT EXISTS: the extension is often installed by the platform (or a superuser) beforehand.
CREATE EXTENSION IF NOT EXISTS vector;
