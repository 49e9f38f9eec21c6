//! The knowledge base's ingestion: a tenant's documents (.txt, .md, .html, .pdf) stored in object
//! storage and queued, then extracted, chunked along their headings, embedded through the
//! engine's [`engine::ports::Embedder`] and stored in `knowledge_chunks` by the knowledge workers
//! ([`worker`]), which the `rag-retrieve` stage searches. Also the sample knowledge base that
//! `parley seed` loads for the demo tenant.

pub mod chunk;
pub mod extract;
pub mod ingest;
pub mod sample;
pub mod storage;
pub mod worker;

pub use ingest::{
    DocumentState, DocumentSummary, IngestOutcome, Ingestor, Job, JobOutcome, KnowledgeError, RetryPolicy,
    UploadOutcome, claim_next, delete, document_states, list_documents, queue_reindex, resolve_tenant, upload,
};
pub use sample::{SAMPLE_DOCUMENTS, seed_sample, seed_sample_into};
pub use storage::{GcsConfig, GcsStorage, LocalDirectory, ObjectStorage, StorageConfig, StorageError, build_storage};
pub use worker::{KnowledgeWorker, KnowledgeWorkerConfig};

#[cfg(test)]
mod tests;
