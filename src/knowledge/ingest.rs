//! Ingestion: an original stored and recorded (`uploaded`), then indexed (`indexing` →
//! `indexed` | `error` with the reason); re-index and delete; the plan's limits.
//!
//! Crash safety: the chunks, their replacement on a re-index and the final status change are one
//! transaction, so a document is either indexed with all its chunks or not searchable at all
//! (searches only read `indexed` documents). A crash during indexing leaves `indexing`, which a
//! re-index repairs. The limits are checked and the row inserted under a lock on the tenant's
//! row, so concurrent uploads cannot overshoot, and a document counts once, from its upload until
//! its deletion (a duplicate or a re-index counts nothing).

use engine::ports::{EmbedPurpose, Embedder};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    chunk::{ChunkOptions, chunk, first_heading},
    extract::{DocumentKind, ExtractError, MAX_FILE_BYTES, extract},
    storage::{ObjectStorage, StorageError},
};
use crate::store::{DEFAULT_MAX_DOCUMENTS, DEFAULT_MAX_STORAGE_BYTES, EMBEDDING_DIMENSIONS, PgStore, StoreError};

/// Texts per embedding call: providers bound a request's inputs, and the adapters split further.
const EMBED_BATCH: usize = 32;

/// Why an ingestion could not run. A file that is recorded but cannot be indexed is not an
/// error: it is [`IngestOutcome::Failed`], and its document has status `error`.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("document {0} not found")]
    DocumentNotFound(Uuid),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error(
        "document limit reached: the tenant has {used} of the {limit} documents its plan allows; delete some first"
    )]
    DocumentLimit { used: i64, limit: i64 },
    #[error("storage limit reached: {bytes} more bytes would use {would_use} of the {limit} bytes the plan allows")]
    StorageLimit { bytes: i64, would_use: i64, limit: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for KnowledgeError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    Indexed {
        document_id: Uuid,
        chunks: usize,
    },
    /// The tenant already has a document with this content: nothing was added.
    Duplicate {
        document_id: Uuid,
    },
    /// Recorded, but indexing failed: the document has status `error` with this reason.
    Failed {
        document_id: Uuid,
        reason: String,
    },
}

impl IngestOutcome {
    /// The CLI's line for the file: `indexed`, `duplicate` or `error: <reason>`.
    pub fn summary(&self) -> String {
        match self {
            Self::Indexed { .. } => "indexed".into(),
            Self::Duplicate { .. } => "duplicate".into(),
            Self::Failed { reason, .. } => format!("error: {reason}"),
        }
    }
}

/// A document as listed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct DocumentSummary {
    pub id: Uuid,
    pub title: String,
    pub source: String,
    pub status: String,
    pub error: Option<String>,
    pub bytes: i64,
    pub chunks: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The ingestion service over the store, an embedder and the object storage.
pub struct Ingestor<'a> {
    store: &'a PgStore,
    embedder: &'a dyn Embedder,
    storage: &'a dyn ObjectStorage,
    chunking: ChunkOptions,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// pgvector's text form of an embedding. `store::knowledge::vector_literal` does the same but is
/// private to the store; the checks matter here because a wrong embedder must fail the document
/// with a reason, not the insert.
fn vector_literal(embedding: &[f32]) -> Result<String, String> {
    if embedding.len() != EMBEDDING_DIMENSIONS {
        return Err(format!(
            "the embedder returned {} dimensions, the knowledge base stores {EMBEDDING_DIMENSIONS}",
            embedding.len()
        ));
    }
    if embedding.iter().any(|x| !x.is_finite()) {
        return Err("the embedder returned a non-finite value".into());
    }
    let parts: Vec<String> = embedding.iter().map(f32::to_string).collect();
    Ok(format!("[{}]", parts.join(",")))
}

/// The file name without its directories, for `source` and the kind.
fn file_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

impl<'a> Ingestor<'a> {
    pub fn new(store: &'a PgStore, embedder: &'a dyn Embedder, storage: &'a dyn ObjectStorage) -> Self {
        Self { store, embedder, storage, chunking: ChunkOptions::default() }
    }

    pub fn with_chunking(mut self, chunking: ChunkOptions) -> Self {
        self.chunking = chunking;
        self
    }

    /// Stores `bytes` (the file `name`) for `tenant` and indexes it.
    pub async fn ingest(&self, tenant: Uuid, name: &str, bytes: &[u8]) -> Result<IngestOutcome, KnowledgeError> {
        let name = file_name(name);
        let kind = DocumentKind::from_name(name).ok_or(ExtractError::Unsupported)?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ExtractError::TooLarge { bytes: bytes.len(), limit: MAX_FILE_BYTES }.into());
        }
        let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        let hash = sha256_hex(bytes);
        let key = format!("{tenant}/{hash}");

        let mut tx = self.store.pool().begin().await?;
        // Serialises this tenant's uploads: the limits below hold under concurrency.
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(KnowledgeError::UnknownTenant(tenant.to_string()));
        }
        let duplicate: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM knowledge_documents WHERE tenant_id = $1 AND content_hash = $2")
                .bind(tenant)
                .bind(&hash)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(document_id) = duplicate {
            return Ok(IngestOutcome::Duplicate { document_id });
        }
        let (max_documents, max_bytes, used_documents, used_bytes): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT coalesce(p.max_documents, $2)::bigint, coalesce(p.max_storage_bytes, $3),
                    (SELECT count(*) FROM knowledge_documents WHERE tenant_id = t.id),
                    (SELECT coalesce(sum(bytes), 0)::bigint FROM knowledge_documents WHERE tenant_id = t.id)
             FROM tenants t LEFT JOIN plans p ON p.id = t.plan_id WHERE t.id = $1",
        )
        .bind(tenant)
        .bind(DEFAULT_MAX_DOCUMENTS)
        .bind(DEFAULT_MAX_STORAGE_BYTES)
        .fetch_one(&mut *tx)
        .await?;
        if used_documents >= max_documents {
            return Err(KnowledgeError::DocumentLimit { used: used_documents, limit: max_documents });
        }
        if used_bytes.saturating_add(size) > max_bytes {
            return Err(KnowledgeError::StorageLimit {
                bytes: size,
                would_use: used_bytes.saturating_add(size),
                limit: max_bytes,
            });
        }
        // Stored before the row commits: a recorded document always has its original. A crash
        // between the two leaves an unreferenced object under a content key, which the next
        // upload of that content overwrites.
        self.storage.put(&key, bytes).await?;
        let title = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
        let document_id: Uuid = sqlx::query_scalar(
            "INSERT INTO knowledge_documents (tenant_id, title, source, content_hash, content_type, object_key, status, bytes)
             VALUES ($1, $2, $3, $4, $5, $6, 'uploaded', $7) RETURNING id",
        )
        .bind(tenant)
        .bind(title)
        .bind(name)
        .bind(&hash)
        .bind(kind.content_type())
        .bind(&key)
        .bind(size)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;

        self.index(tenant, document_id, kind, bytes).await
    }

    /// Indexes a recorded document again from its original (after a failure, a crash during
    /// indexing, or a change of embedder or chunking).
    pub async fn reindex(&self, tenant: Uuid, document_id: Uuid) -> Result<IngestOutcome, KnowledgeError> {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT source, object_key FROM knowledge_documents WHERE id = $1 AND tenant_id = $2")
                .bind(document_id)
                .bind(tenant)
                .fetch_optional(self.store.pool())
                .await?;
        let (source, key) = row.ok_or(KnowledgeError::DocumentNotFound(document_id))?;
        let Some(kind) = DocumentKind::from_name(&source) else {
            return self.fail(document_id, &ExtractError::Unsupported.to_string()).await;
        };
        let Some(key) = key else {
            return self.fail(document_id, "the original is not in object storage").await;
        };
        let bytes = match self.storage.get(&key).await {
            Ok(bytes) => bytes,
            Err(StorageError::NotFound(_)) => {
                return self.fail(document_id, "the original is missing from object storage").await;
            }
            Err(e) => return Err(e.into()),
        };
        self.index(tenant, document_id, kind, &bytes).await
    }

    /// Deletes a document, its chunks and its original. False when the tenant has no such
    /// document.
    pub async fn delete(&self, tenant: Uuid, document_id: Uuid) -> Result<bool, KnowledgeError> {
        let key: Option<Option<String>> =
            sqlx::query_scalar("DELETE FROM knowledge_documents WHERE id = $1 AND tenant_id = $2 RETURNING object_key")
                .bind(document_id)
                .bind(tenant)
                .fetch_optional(self.store.pool())
                .await?;
        match key {
            None => Ok(false),
            Some(key) => {
                if let Some(key) = key {
                    self.storage.delete(&key).await?;
                }
                Ok(true)
            }
        }
    }

    async fn index(
        &self,
        tenant: Uuid,
        document_id: Uuid,
        kind: DocumentKind,
        bytes: &[u8],
    ) -> Result<IngestOutcome, KnowledgeError> {
        sqlx::query(
            "UPDATE knowledge_documents SET status = 'indexing', error = NULL, updated_at = now()
             WHERE id = $1 AND tenant_id = $2",
        )
        .bind(document_id)
        .bind(tenant)
        .execute(self.store.pool())
        .await?;

        let text = match extract(kind, bytes) {
            Ok(text) => text,
            Err(e) => return self.fail(document_id, &e.to_string()).await,
        };
        let chunks = chunk(&text, self.chunking);
        if chunks.is_empty() {
            return self.fail(document_id, &ExtractError::Empty.to_string()).await;
        }
        let contents: Vec<String> = chunks.iter().map(|c| c.content()).collect();
        let mut vectors = Vec::with_capacity(contents.len());
        for batch in contents.chunks(EMBED_BATCH) {
            match self.embedder.embed(batch, EmbedPurpose::Document).await {
                Ok(v) if v.len() == batch.len() => vectors.extend(v),
                Ok(v) => {
                    let reason = format!("the embedder returned {} vectors for {} texts", v.len(), batch.len());
                    return self.fail(document_id, &reason).await;
                }
                Err(e) => return self.fail(document_id, &format!("embedding failed: {e}")).await,
            }
        }
        let mut literals = Vec::with_capacity(vectors.len());
        for v in &vectors {
            match vector_literal(v) {
                Ok(l) => literals.push(l),
                Err(e) => return self.fail(document_id, &e).await,
            }
        }
        let ordinals: Vec<i32> = (0..contents.len()).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();

        let mut tx = self.store.pool().begin().await?;
        sqlx::query("DELETE FROM knowledge_chunks WHERE document_id = $1").bind(document_id).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO knowledge_chunks (document_id, tenant_id, ordinal, text, embedding)
             SELECT $1, $2, o, t, e::vector FROM unnest($3::int4[], $4::text[], $5::text[]) AS x(o, t, e)",
        )
        .bind(document_id)
        .bind(tenant)
        .bind(&ordinals)
        .bind(&contents)
        .bind(&literals)
        .execute(&mut *tx)
        .await?;
        let mut update = sqlx::QueryBuilder::new(
            "UPDATE knowledge_documents SET status = 'indexed', error = NULL, updated_at = now()",
        );
        if let Some(heading) = first_heading(&text) {
            update.push(", title = ").push_bind(heading);
        }
        update.push(" WHERE id = ").push_bind(document_id);
        let updated = update.build().execute(&mut *tx).await?;
        if updated.rows_affected() == 0 {
            // Deleted while it was being indexed: nothing to keep.
            return Err(KnowledgeError::DocumentNotFound(document_id));
        }
        tx.commit().await?;
        Ok(IngestOutcome::Indexed { document_id, chunks: contents.len() })
    }

    /// Marks the document failed with `reason`, its chunks gone, in one transaction.
    async fn fail(&self, document_id: Uuid, reason: &str) -> Result<IngestOutcome, KnowledgeError> {
        let mut tx = self.store.pool().begin().await?;
        sqlx::query("DELETE FROM knowledge_chunks WHERE document_id = $1").bind(document_id).execute(&mut *tx).await?;
        sqlx::query("UPDATE knowledge_documents SET status = 'error', error = $2, updated_at = now() WHERE id = $1")
            .bind(document_id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(IngestOutcome::Failed { document_id, reason: reason.to_owned() })
    }
}

/// The tenant's documents, newest first, with their status and chunk count.
pub async fn list_documents(store: &PgStore, tenant: Uuid) -> Result<Vec<DocumentSummary>, KnowledgeError> {
    Ok(sqlx::query_as(
        "SELECT d.id, d.title, d.source, d.status, d.error, d.bytes,
                (SELECT count(*) FROM knowledge_chunks c WHERE c.document_id = d.id) AS chunks,
                d.created_at, d.updated_at
         FROM knowledge_documents d WHERE d.tenant_id = $1 ORDER BY d.created_at DESC, d.id",
    )
    .bind(tenant)
    .fetch_all(store.pool())
    .await?)
}

/// A tenant named by its id or its name.
pub async fn resolve_tenant(store: &PgStore, id_or_name: &str) -> Result<Uuid, KnowledgeError> {
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM tenants WHERE id::text = $1 OR name = $1 LIMIT 1")
        .bind(id_or_name)
        .fetch_optional(store.pool())
        .await?;
    id.ok_or_else(|| KnowledgeError::UnknownTenant(id_or_name.to_owned()))
}
