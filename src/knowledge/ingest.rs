//! Ingestion: an original stored and recorded (`uploaded`: a queued job), then indexed by a
//! knowledge worker (`indexing` → `indexed` | `error` with the reason, or back to `uploaded` for a
//! retry); re-index and delete; the plan's limits.
//!
//! Crash safety: the chunks, their replacement on a re-index and the final status change are one
//! transaction, committed only while the indexing process still holds the row's lease, so a
//! document is either indexed with all its chunks, once, or not searchable at all (searches only
//! read `indexed` documents). A crash during indexing leaves `indexing` with a lease that runs
//! out, and a worker claims it again. The limits are checked and the row inserted under a lock on
//! the tenant's row, so concurrent uploads cannot overshoot, and a document counts once, from its
//! upload until its deletion (a duplicate, a retry or a re-index counts nothing).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use engine::ports::{EmbedPurpose, Embedder, PortErrorKind};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    chunk::{ChunkOptions, chunk, first_heading},
    extract::{DocumentKind, ExtractError, MAX_FILE_BYTES, extract},
    storage::{ObjectStorage, StorageError},
};
use crate::store::{DEFAULT_MAX_DOCUMENTS, DEFAULT_MAX_STORAGE_BYTES, PgStore, StoreError, vector_literal};

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
    #[error("document {0} is being indexed; try again once it is done")]
    InProgress(Uuid),
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
    /// Recorded; indexing failed for a reason that may pass (the embedder or the storage down):
    /// a knowledge worker retries it.
    Queued {
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
            Self::Queued { reason, .. } => format!("queued for a retry ({reason})"),
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
    /// Indexing attempts so far.
    pub attempts: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The file name without its directories, for `source` and the kind.
fn file_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

/// How long a claim on a document lasts without renewal: a process that dies while indexing
/// gives the document back after at most this long. The process indexing renews it every third.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Retries of a document whose indexing failed for a reason that may pass (the embedder or the
/// object storage unreachable): `backoff_base`, doubled at each attempt, at most `backoff_max`;
/// after `max_attempts` attempts the document ends in `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 8, backoff_base: Duration::from_secs(1), backoff_max: Duration::from_secs(300) }
    }
}

impl RetryPolicy {
    /// The wait after the failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        self.backoff_base.saturating_mul(factor).min(self.backoff_max)
    }
}

/// What an upload did: a new document queued for indexing, or one the tenant already had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    Uploaded { document_id: Uuid },
    Duplicate { document_id: Uuid },
}

impl UploadOutcome {
    pub fn document_id(&self) -> Uuid {
        match self {
            Self::Uploaded { document_id } | Self::Duplicate { document_id } => *document_id,
        }
    }
}

/// A document claimed for indexing (by a knowledge worker or an inline ingest), under the lease
/// of `worker`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub source: String,
    pub object_key: Option<String>,
    /// Attempts so far, this one included.
    pub attempts: i32,
    pub worker: String,
}

/// What became of a claimed document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Indexed with its chunks, in one transaction.
    Indexed { chunks: usize },
    /// Ended in `error` with this reason (permanent, or out of attempts).
    Failed { reason: String },
    /// Back to `uploaded`, to be tried again after `delay`.
    Retry { delay: Duration, reason: String },
    /// The claim was lost (its lease ran out and another process took the document, a re-index
    /// was asked, or the document was deleted): nothing was written.
    Abandoned,
    /// The stop token ([`Ingestor::with_stop`]) was cancelled before anything was written: the
    /// caller gives the document back to the queue.
    Stopped,
}

/// Why one attempt failed.
enum AttemptError {
    /// The document itself is the problem (unreadable, unsupported, original missing).
    Permanent(String),
    /// A service is (perhaps briefly) unavailable.
    Retryable(String),
}

impl From<sqlx::Error> for AttemptError {
    fn from(error: sqlx::Error) -> Self {
        Self::Retryable(format!("database: {error}"))
    }
}

const JOB_COLUMNS: &str = "id, tenant_id, source, object_key, attempts, coalesce(locked_by, '') AS worker";

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Claims the oldest claimable document for `worker`: `uploaded` and due, or `indexing` with a
/// lease that ran out (its process died). Concurrent workers skip each other's rows.
pub async fn claim_next(store: &PgStore, worker: &str, lease: Duration) -> Result<Option<Job>, KnowledgeError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE knowledge_documents
         SET status = 'indexing', locked_by = $1, locked_until = now() + make_interval(secs => $2),
             attempts = attempts + 1, updated_at = now()
         WHERE id = (
             SELECT id FROM knowledge_documents
             WHERE (status = 'uploaded'
                    OR (status = 'indexing' AND coalesce(locked_until, '-infinity') < now()))
               AND next_attempt_at <= now()
             ORDER BY created_at
             FOR UPDATE SKIP LOCKED
             LIMIT 1)
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(worker)
    .bind(seconds(lease))
    .fetch_optional(store.pool())
    .await?)
}

/// Stores `bytes` (the file `name`) for `tenant` and records it `uploaded`: a job for the
/// knowledge workers. Checks the type, the size and the plan's limits; the same content twice is
/// a duplicate and counts nothing.
pub async fn upload(
    store: &PgStore,
    storage: &dyn ObjectStorage,
    tenant: Uuid,
    name: &str,
    bytes: &[u8],
) -> Result<UploadOutcome, KnowledgeError> {
    Ok(record(store, storage, tenant, name, bytes, None).await?.0)
}

/// [`upload`], the new document either queued (`claim` None) or claimed at once by `claim`.
async fn record(
    store: &PgStore,
    storage: &dyn ObjectStorage,
    tenant: Uuid,
    name: &str,
    bytes: &[u8],
    claim: Option<(&str, Duration)>,
) -> Result<(UploadOutcome, Option<Job>), KnowledgeError> {
    let name = file_name(name);
    let kind = DocumentKind::from_name(name).ok_or(ExtractError::Unsupported)?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(ExtractError::TooLarge { bytes: bytes.len(), limit: MAX_FILE_BYTES }.into());
    }
    let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
    let hash = sha256_hex(bytes);
    let key = format!("{tenant}/{hash}");

    let mut tx = store.pool().begin().await?;
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
        return Ok((UploadOutcome::Duplicate { document_id }, None));
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
    storage.put(&key, bytes).await?;
    let title = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    let (worker, lease) = claim.map_or((None, 0.0), |(w, l)| (Some(w), seconds(l)));
    let job: Job = sqlx::query_as(&format!(
        "INSERT INTO knowledge_documents
             (tenant_id, title, source, content_hash, content_type, object_key, bytes,
              status, locked_by, locked_until, attempts)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 CASE WHEN $8::text IS NULL THEN 'uploaded' ELSE 'indexing' END, $8,
                 CASE WHEN $8::text IS NULL THEN NULL ELSE now() + make_interval(secs => $9) END,
                 CASE WHEN $8::text IS NULL THEN 0 ELSE 1 END)
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(tenant)
    .bind(title)
    .bind(name)
    .bind(&hash)
    .bind(kind.content_type())
    .bind(&key)
    .bind(size)
    .bind(worker)
    .bind(lease)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((UploadOutcome::Uploaded { document_id: job.id }, claim.map(|_| job)))
}

/// The ingestion service over the store, an embedder and the object storage: indexes claimed
/// documents (for the knowledge workers, [`super::worker`]) and, for `parley seed` and tests,
/// ingests inline.
pub struct Ingestor<'a> {
    store: &'a PgStore,
    embedder: &'a dyn Embedder,
    storage: &'a dyn ObjectStorage,
    chunking: ChunkOptions,
    retry: RetryPolicy,
    lease: Duration,
    stop: Option<CancellationToken>,
}

/// A document read, chunked and embedded, ready to be written.
struct Prepared {
    heading: Option<String>,
    contents: Vec<String>,
    literals: Vec<String>,
    ordinals: Vec<i32>,
}

impl<'a> Ingestor<'a> {
    pub fn new(store: &'a PgStore, embedder: &'a dyn Embedder, storage: &'a dyn ObjectStorage) -> Self {
        Self {
            store,
            embedder,
            storage,
            chunking: ChunkOptions::default(),
            retry: RetryPolicy::default(),
            lease: DEFAULT_LEASE,
            stop: None,
        }
    }

    pub fn with_chunking(mut self, chunking: ChunkOptions) -> Self {
        self.chunking = chunking;
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Stops [`Ingestor::run`] when `stop` is cancelled while a document is being read, chunked or
    /// embedded ([`JobOutcome::Stopped`]); once its write has begun, the write completes.
    pub fn with_stop(mut self, stop: CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Stores and queues a file: see [`upload`].
    pub async fn upload(&self, tenant: Uuid, name: &str, bytes: &[u8]) -> Result<UploadOutcome, KnowledgeError> {
        upload(self.store, self.storage, tenant, name, bytes).await
    }

    /// Stores `bytes` (the file `name`) for `tenant` and indexes it in this process, under a
    /// lease like a worker's (a crash leaves it to the workers). A retryable failure leaves it
    /// queued for them ([`IngestOutcome::Queued`]).
    pub async fn ingest(&self, tenant: Uuid, name: &str, bytes: &[u8]) -> Result<IngestOutcome, KnowledgeError> {
        let worker = format!("inline-{}", Uuid::new_v4().simple());
        let (outcome, job) = record(self.store, self.storage, tenant, name, bytes, Some((&worker, self.lease))).await?;
        match (outcome, job) {
            (UploadOutcome::Duplicate { document_id }, _) => Ok(IngestOutcome::Duplicate { document_id }),
            (UploadOutcome::Uploaded { .. }, Some(job)) => self.run_inline(&job).await,
            (UploadOutcome::Uploaded { document_id }, None) => Err(KnowledgeError::DocumentNotFound(document_id)),
        }
    }

    /// Queues a recorded document for indexing again from its original (after a failure, or a
    /// change of embedder or chunking): `uploaded`, attempts from zero. A worker indexing it
    /// now loses its claim and writes nothing.
    pub async fn queue_reindex(&self, tenant: Uuid, document_id: Uuid) -> Result<(), KnowledgeError> {
        queue_reindex(self.store, tenant, document_id).await
    }

    /// Indexes a recorded document again, in this process. Refused while another process holds
    /// it ([`KnowledgeError::InProgress`]).
    pub async fn reindex(&self, tenant: Uuid, document_id: Uuid) -> Result<IngestOutcome, KnowledgeError> {
        let worker = format!("inline-{}", Uuid::new_v4().simple());
        let job: Option<Job> = sqlx::query_as(&format!(
            "UPDATE knowledge_documents
             SET status = 'indexing', error = NULL, attempts = 1, next_attempt_at = now(), locked_by = $3,
                 locked_until = now() + make_interval(secs => $4), updated_at = now()
             WHERE id = $1 AND tenant_id = $2
               AND NOT (status = 'indexing' AND coalesce(locked_until, '-infinity') >= now())
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(document_id)
        .bind(tenant)
        .bind(&worker)
        .bind(seconds(self.lease))
        .fetch_optional(self.store.pool())
        .await?;
        match job {
            Some(job) => self.run_inline(&job).await,
            None => {
                let exists: Option<i32> =
                    sqlx::query_scalar("SELECT 1 FROM knowledge_documents WHERE id = $1 AND tenant_id = $2")
                        .bind(document_id)
                        .bind(tenant)
                        .fetch_optional(self.store.pool())
                        .await?;
                Err(if exists.is_some() {
                    KnowledgeError::InProgress(document_id)
                } else {
                    KnowledgeError::DocumentNotFound(document_id)
                })
            }
        }
    }

    async fn run_inline(&self, job: &Job) -> Result<IngestOutcome, KnowledgeError> {
        let document_id = job.id;
        Ok(match self.run(job).await? {
            JobOutcome::Indexed { chunks } => IngestOutcome::Indexed { document_id, chunks },
            JobOutcome::Failed { reason } => IngestOutcome::Failed { document_id, reason },
            JobOutcome::Retry { reason, .. } => IngestOutcome::Queued { document_id, reason },
            // Deleted (or queued again) while it was being indexed: nothing to report on.
            JobOutcome::Abandoned => return Err(KnowledgeError::DocumentNotFound(document_id)),
            // Inline runs have no stop token.
            JobOutcome::Stopped => return Err(KnowledgeError::DocumentNotFound(document_id)),
        })
    }

    /// Deletes a document, its chunks and its original. False when the tenant has no such
    /// document.
    pub async fn delete(&self, tenant: Uuid, document_id: Uuid) -> Result<bool, KnowledgeError> {
        delete(self.store, self.storage, tenant, document_id).await
    }

    /// Indexes a claimed document, renewing its lease meanwhile, and records the outcome: indexed,
    /// failed (permanent, or out of attempts), or back in the queue after a backoff. An `Err` is a
    /// database failure while recording it: the lease then runs out and the document is claimed
    /// again.
    pub async fn run(&self, job: &Job) -> Result<JobOutcome, KnowledgeError> {
        let attempts = u32::try_from(job.attempts).unwrap_or(0);
        if attempts > self.retry.max_attempts {
            let reason = format!(
                "gave up after {} attempts: indexing was interrupted each time (the process stopped)",
                self.retry.max_attempts
            );
            return self.fail(job, &reason).await;
        }
        // The preparation (read, extract, embed) may take long: the lease is renewed meanwhile,
        // and a stop or a lost claim drops it. The write is never dropped half-way: it checks the
        // claim itself, and once it has committed its outcome is reported.
        let work = self.prepare(job);
        tokio::pin!(work);
        let renew_every = (self.lease / 3).max(Duration::from_millis(100));
        let stopped = async {
            match &self.stop {
                Some(stop) => stop.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        let prepared = loop {
            tokio::select! {
                biased;
                prepared = &mut work => break prepared,
                _ = &mut stopped => return Ok(JobOutcome::Stopped),
                _ = tokio::time::sleep(renew_every) => {
                    if !self.renew(job).await {
                        return Ok(JobOutcome::Abandoned);
                    }
                }
            }
        };
        let result = match prepared {
            Ok(prepared) => self.write(job, prepared).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(chunks)) => Ok(JobOutcome::Indexed { chunks }),
            Ok(None) => Ok(JobOutcome::Abandoned),
            Err(AttemptError::Permanent(reason)) => self.fail(job, &reason).await,
            Err(AttemptError::Retryable(reason)) if attempts >= self.retry.max_attempts => {
                self.fail(job, &format!("gave up after {attempts} attempts: {reason}")).await
            }
            Err(AttemptError::Retryable(reason)) => {
                let delay = self.retry.delay(attempts);
                self.retry_later(job, &reason, delay).await
            }
        }
    }

    /// Extends the lease; false when it is no longer this process's. A database error keeps
    /// going: the final commit checks the claim anyway.
    async fn renew(&self, job: &Job) -> bool {
        let renewed = sqlx::query(
            "UPDATE knowledge_documents SET locked_until = now() + make_interval(secs => $3)
             WHERE id = $1 AND status = 'indexing' AND locked_by = $2",
        )
        .bind(job.id)
        .bind(&job.worker)
        .bind(seconds(self.lease))
        .execute(self.store.pool())
        .await;
        !matches!(renewed, Ok(r) if r.rows_affected() == 0)
    }

    /// An attempt's first part: the original read, its text extracted, chunked and embedded.
    async fn prepare(&self, job: &Job) -> Result<Prepared, AttemptError> {
        let kind = DocumentKind::from_name(&job.source)
            .ok_or_else(|| AttemptError::Permanent(ExtractError::Unsupported.to_string()))?;
        let key = job
            .object_key
            .as_deref()
            .ok_or_else(|| AttemptError::Permanent("the original is not in object storage".into()))?;
        let bytes = match self.storage.get(key).await {
            Ok(bytes) => bytes,
            Err(StorageError::NotFound(_)) => {
                return Err(AttemptError::Permanent("the original is missing from object storage".into()));
            }
            Err(e @ StorageError::InvalidKey(_)) => return Err(AttemptError::Permanent(e.to_string())),
            Err(e @ StorageError::Io(_)) => {
                return Err(AttemptError::Retryable(format!("cannot read the original: {e}")));
            }
        };
        let text = extract(kind, &bytes).map_err(|e| AttemptError::Permanent(e.to_string()))?;
        let chunks = chunk(&text, self.chunking);
        if chunks.is_empty() {
            return Err(AttemptError::Permanent(ExtractError::Empty.to_string()));
        }
        let contents: Vec<String> = chunks.iter().map(|c| c.content()).collect();
        let mut vectors = Vec::with_capacity(contents.len());
        for batch in contents.chunks(EMBED_BATCH) {
            match self.embedder.embed(batch, EmbedPurpose::Document).await {
                Ok(v) if v.len() == batch.len() => vectors.extend(v),
                Ok(v) => {
                    return Err(AttemptError::Permanent(format!(
                        "the embedder returned {} vectors for {} texts",
                        v.len(),
                        batch.len()
                    )));
                }
                Err(e) if e.kind == PortErrorKind::Unavailable => {
                    return Err(AttemptError::Retryable(format!("embedding failed: {e}")));
                }
                Err(e) => return Err(AttemptError::Permanent(format!("embedding failed: {e}"))),
            }
        }
        let literals = vectors
            .iter()
            .map(|v| vector_literal(v))
            .collect::<Result<Vec<_>, _>>()
            // A wrong embedder fails the document with a reason, not the insert.
            .map_err(|e| AttemptError::Permanent(format!("the embedder's output cannot be stored: {e}")))?;
        let ordinals: Vec<i32> = (0..contents.len()).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();
        Ok(Prepared { heading: first_heading(&text), contents, literals, ordinals })
    }

    /// An attempt's second part: the chunks written and the status `indexed` in one transaction,
    /// if the claim still holds (`None` when it does not).
    async fn write(&self, job: &Job, prepared: Prepared) -> Result<Option<usize>, AttemptError> {
        let Prepared { heading, contents, literals, ordinals } = prepared;
        let mut tx = self.store.pool().begin().await?;
        // The row first: it locks the document, and proves the claim is still this process's.
        let mut update = sqlx::QueryBuilder::new(
            "UPDATE knowledge_documents
             SET status = 'indexed', error = NULL, locked_by = NULL, locked_until = NULL, updated_at = now()",
        );
        if let Some(heading) = heading {
            update.push(", title = ").push_bind(heading);
        }
        update.push(" WHERE status = 'indexing' AND id = ").push_bind(job.id);
        update.push(" AND locked_by = ").push_bind(&job.worker);
        if update.build().execute(&mut *tx).await?.rows_affected() == 0 {
            return Ok(None);
        }
        sqlx::query("DELETE FROM knowledge_chunks WHERE document_id = $1").bind(job.id).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO knowledge_chunks (document_id, tenant_id, ordinal, text, embedding)
             SELECT $1, $2, o, t, e::vector FROM unnest($3::int4[], $4::text[], $5::text[]) AS x(o, t, e)",
        )
        .bind(job.id)
        .bind(job.tenant_id)
        .bind(&ordinals)
        .bind(&contents)
        .bind(&literals)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(contents.len()))
    }

    /// Marks the claimed document failed with `reason`, its chunks gone, in one transaction.
    async fn fail(&self, job: &Job, reason: &str) -> Result<JobOutcome, KnowledgeError> {
        let mut tx = self.store.pool().begin().await?;
        let updated = sqlx::query(
            "UPDATE knowledge_documents
             SET status = 'error', error = $3, locked_by = NULL, locked_until = NULL, updated_at = now()
             WHERE id = $1 AND status = 'indexing' AND locked_by = $2",
        )
        .bind(job.id)
        .bind(&job.worker)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(JobOutcome::Abandoned);
        }
        sqlx::query("DELETE FROM knowledge_chunks WHERE document_id = $1").bind(job.id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(JobOutcome::Failed { reason: reason.to_owned() })
    }

    /// Gives the claimed document back to the queue, due after `delay`, with the last reason.
    async fn retry_later(&self, job: &Job, reason: &str, delay: Duration) -> Result<JobOutcome, KnowledgeError> {
        let updated = sqlx::query(
            "UPDATE knowledge_documents
             SET status = 'uploaded', error = $3, next_attempt_at = now() + make_interval(secs => $4),
                 locked_by = NULL, locked_until = NULL, updated_at = now()
             WHERE id = $1 AND status = 'indexing' AND locked_by = $2",
        )
        .bind(job.id)
        .bind(&job.worker)
        .bind(reason)
        .bind(seconds(delay))
        .execute(self.store.pool())
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(JobOutcome::Abandoned);
        }
        Ok(JobOutcome::Retry { delay, reason: reason.to_owned() })
    }
}

/// Queues a recorded document for indexing again from its original (after a failure, or a
/// change of embedder or chunking): `uploaded`, attempts from zero. A worker indexing it now
/// loses its claim and writes nothing.
pub async fn queue_reindex(store: &PgStore, tenant: Uuid, document_id: Uuid) -> Result<(), KnowledgeError> {
    let updated = sqlx::query(
        "UPDATE knowledge_documents
         SET status = 'uploaded', error = NULL, attempts = 0, next_attempt_at = now(),
             locked_by = NULL, locked_until = NULL, updated_at = now()
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(document_id)
    .bind(tenant)
    .execute(store.pool())
    .await?;
    if updated.rows_affected() == 0 {
        return Err(KnowledgeError::DocumentNotFound(document_id));
    }
    Ok(())
}

/// Deletes a document, its chunks and its original. False when the tenant has no such document.
pub async fn delete(
    store: &PgStore,
    storage: &dyn ObjectStorage,
    tenant: Uuid,
    document_id: Uuid,
) -> Result<bool, KnowledgeError> {
    let key: Option<Option<String>> =
        sqlx::query_scalar("DELETE FROM knowledge_documents WHERE id = $1 AND tenant_id = $2 RETURNING object_key")
            .bind(document_id)
            .bind(tenant)
            .fetch_optional(store.pool())
            .await?;
    match key {
        None => Ok(false),
        Some(key) => {
            if let Some(key) = key {
                storage.delete(&key).await?;
            }
            Ok(true)
        }
    }
}

/// A document's state while it is waited for.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DocumentState {
    pub id: Uuid,
    pub status: String,
    pub error: Option<String>,
    pub attempts: i32,
}

impl DocumentState {
    /// `indexed` or `error`: no worker will touch it again unless it is re-indexed.
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "indexed" | "error")
    }
}

/// The states of the given documents (those that still exist).
pub async fn document_states(store: &PgStore, ids: &[Uuid]) -> Result<Vec<DocumentState>, KnowledgeError> {
    Ok(sqlx::query_as("SELECT id, status, error, attempts FROM knowledge_documents WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(store.pool())
        .await?)
}

/// The tenant's documents, newest first, with their status and chunk count.
pub async fn list_documents(store: &PgStore, tenant: Uuid) -> Result<Vec<DocumentSummary>, KnowledgeError> {
    Ok(sqlx::query_as(
        "SELECT d.id, d.title, d.source, d.status, d.error, d.bytes,
                (SELECT count(*) FROM knowledge_chunks c WHERE c.document_id = d.id) AS chunks,
                d.attempts, d.created_at, d.updated_at
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
