//! The knowledge base's ingestion: a tenant's documents (.txt, .md, .html, .pdf) extracted,
//! chunked along their headings, embedded through the engine's [`engine::ports::Embedder`] and
//! stored in `knowledge_chunks`, which the `rag-retrieve` stage searches; the originals kept in
//! object storage. Also the sample knowledge base that `parley seed` loads for the demo tenant.

pub mod chunk;
pub mod extract;
pub mod ingest;
pub mod sample;
pub mod storage;

pub use ingest::{DocumentSummary, IngestOutcome, Ingestor, KnowledgeError, list_documents, resolve_tenant};
pub use sample::{SAMPLE_DOCUMENTS, seed_sample, seed_sample_into};
pub use storage::{LocalDirectory, ObjectStorage, StorageError};

#[cfg(test)]
mod tests;
