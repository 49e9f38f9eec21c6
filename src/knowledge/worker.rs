//! The `knowledge` worker: indexes the documents that uploads queue. The queue is the
//! `knowledge_documents` table itself (durable in PostgreSQL): a slot claims the oldest due row
//! with `FOR UPDATE SKIP LOCKED` under a lease ([`super::claim_next`]), indexes it, and records
//! the outcome, emitting `knowledge_document_indexed`, `knowledge_document_failed` or
//! `knowledge_job_retry`. Any number of workers (processes, or `parley kb ingest` itself) may run
//! at once.
//!
//! Wake-up: `LISTEN parley_knowledge_jobs` (a trigger notifies on every queued row), and a poll
//! every `poll_interval` for what a notification cannot announce: retries coming due, leases
//! running out, and notifications lost while the listener reconnects.

use std::{sync::Arc, time::Duration};

use engine::{
    events::{Event, EventSink, names},
    ports::Embedder,
};
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    ObjectStorage,
    ingest::{DEFAULT_LEASE, Ingestor, Job, JobOutcome, RetryPolicy, claim_next},
};
use crate::{settings::Settings, store::PgStore};

/// The channel the queue trigger notifies (migration `20251201000008_knowledge_jobs.sql`).
pub const JOBS_CHANNEL: &str = "parley_knowledge_jobs";

/// How a knowledge worker runs.
#[derive(Debug, Clone)]
pub struct KnowledgeWorkerConfig {
    /// Names the claims (`locked_by`) and the events (`workerId`).
    pub id: String,
    /// Documents indexed at once.
    pub concurrency: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
}

impl KnowledgeWorkerConfig {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            concurrency: 2,
            lease: DEFAULT_LEASE,
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        }
    }

    /// Retries as the message jobs': JOB_MAX_ATTEMPTS, JOB_BACKOFF_BASE, JOB_BACKOFF_MAX.
    pub fn from_settings(id: impl Into<String>, settings: &Settings) -> Self {
        Self {
            retry: RetryPolicy {
                max_attempts: settings.job_max_attempts,
                backoff_base: settings.job_backoff_base,
                backoff_max: settings.job_backoff_max,
            },
            ..Self::new(id)
        }
    }
}

/// Indexes queued documents until stopped.
#[derive(Clone)]
pub struct KnowledgeWorker {
    config: Arc<KnowledgeWorkerConfig>,
    store: PgStore,
    embedder: Arc<dyn Embedder>,
    storage: Arc<dyn ObjectStorage>,
    events: Arc<dyn EventSink>,
}

impl KnowledgeWorker {
    pub fn new(
        config: KnowledgeWorkerConfig,
        store: PgStore,
        embedder: Arc<dyn Embedder>,
        storage: Arc<dyn ObjectStorage>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        Self { config: Arc::new(config), store, embedder, storage, events }
    }

    /// Runs until `stop` is cancelled. A document being read or embedded then is given back to
    /// the queue at once (not left to its lease); one being written is finished first. Then the
    /// call returns.
    pub async fn run(self, stop: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.store.clone(), wake.clone(), stop.clone()));
        let mut slots = Vec::with_capacity(self.config.concurrency.max(1));
        for slot in 0..self.config.concurrency.max(1) {
            let worker = self.clone();
            let (wake, stop) = (wake.clone(), stop.clone());
            let id = format!("{}/{slot}", self.config.id);
            slots.push(tokio::spawn(async move { worker.slot(id, wake, stop).await }));
        }
        tracing::info!(worker_id = %self.config.id, concurrency = slots.len(), "knowledge worker started");
        for slot in slots {
            let _ = slot.await;
        }
        let _ = listener.await;
        tracing::info!(worker_id = %self.config.id, "knowledge worker stopped");
    }

    /// Claims and indexes one document at a time.
    async fn slot(&self, id: String, wake: Arc<Notify>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let claimed = tokio::select! {
                _ = stop.cancelled() => return,
                claimed = claim_next(&self.store, &id, self.config.lease) => claimed,
            };
            match claimed {
                Ok(Some(job)) => {
                    // A stop interrupts the reading and embedding, not the write (see `Ingestor::run`).
                    if self.index(&job, &stop).await == JobOutcome::Stopped {
                        release(&self.store, &job).await;
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(worker_id = %id, error = %e, "cannot claim a knowledge document"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// Indexes one claimed document and reports what became of it.
    pub async fn index(&self, job: &Job, stop: &CancellationToken) -> JobOutcome {
        let started = std::time::Instant::now();
        let ingestor = Ingestor::new(&self.store, self.embedder.as_ref(), self.storage.as_ref())
            .with_retry(self.config.retry)
            .with_lease(self.config.lease)
            .with_stop(stop.clone());
        let outcome = match ingestor.run(job).await {
            Ok(outcome) => outcome,
            Err(e) => {
                // The outcome could not be recorded (PostgreSQL down): the lease runs out and the
                // document is claimed again.
                tracing::warn!(document_id = %job.id, error = %e, "cannot record a knowledge document's outcome");
                return JobOutcome::Abandoned;
            }
        };
        let common = |event: Event| {
            event
                .with("documentId", job.id.to_string())
                .with("tenantId", job.tenant_id.to_string())
                .with("source", &job.source)
                .with("workerId", &job.worker)
        };
        match &outcome {
            JobOutcome::Indexed { chunks } => self.events.emit(
                common(Event::info(names::KNOWLEDGE_DOCUMENT_INDEXED))
                    .with("chunks", chunks)
                    .with("attempt", job.attempts)
                    .with("durationMs", u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            ),
            JobOutcome::Failed { reason } => self.events.emit(
                common(Event::error(names::KNOWLEDGE_DOCUMENT_FAILED))
                    .with("attempts", job.attempts)
                    .with("error", reason),
            ),
            JobOutcome::Retry { delay, reason } => self.events.emit(
                common(Event::warn(names::KNOWLEDGE_JOB_RETRY))
                    .with("attempt", job.attempts)
                    .with("maxAttempts", self.config.retry.max_attempts)
                    .with("delayMs", u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                    .with("error", reason),
            ),
            JobOutcome::Abandoned => {
                tracing::info!(document_id = %job.id, "knowledge document claim lost; another process has it")
            }
            JobOutcome::Stopped => {
                tracing::info!(document_id = %job.id, "knowledge worker stopping; the document goes back to the queue")
            }
        }
        outcome
    }
}

/// Gives a claimed document back to the queue, due now, the interrupted attempt not counted.
async fn release(store: &PgStore, job: &Job) {
    let released = sqlx::query(
        "UPDATE knowledge_documents
         SET status = 'uploaded', attempts = greatest(attempts - 1, 0), next_attempt_at = now(),
             locked_by = NULL, locked_until = NULL, updated_at = now()
         WHERE id = $1 AND status = 'indexing' AND locked_by = $2",
    )
    .bind(job.id)
    .bind(&job.worker)
    .execute(store.pool())
    .await;
    if let Err(e) = released {
        tracing::warn!(document_id = %job.id, error = %e, "cannot release a knowledge document; its lease will run out");
    }
}

/// Wakes the slots on each notification; reconnects while PostgreSQL is away (the slots poll
/// meanwhile).
async fn listen(store: PgStore, wake: Arc<Notify>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let connected = async {
            let mut listener = PgListener::connect_with(store.pool()).await?;
            listener.listen(JOBS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot listen for knowledge jobs; polling");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    }
                }
            },
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.recv() => match received {
                    Ok(_) => wake.notify_waiters(),
                    Err(_) => break,
                },
            }
        }
    }
}
