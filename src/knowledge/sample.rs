//! The sample knowledge base (`knowledge/sample/`: a small shop's FAQ in French), compiled into
//! the binary so that `parley seed` loads it from any working directory.

use engine::ports::Embedder;
use uuid::Uuid;

use std::sync::Arc;

use super::{IngestOutcome, Ingestor, KnowledgeError, LocalDirectory, ObjectStorage, build_storage};
use crate::{settings::Settings, store::PgStore};

/// The sample documents: file name and content.
pub const SAMPLE_DOCUMENTS: &[(&str, &str)] = &[
    ("horaires.md", include_str!("../../knowledge/sample/horaires.md")),
    ("livraison.md", include_str!("../../knowledge/sample/livraison.md")),
    ("retours.md", include_str!("../../knowledge/sample/retours.md")),
    ("paiement.txt", include_str!("../../knowledge/sample/paiement.txt")),
];

/// Loads the sample documents into `tenant`'s knowledge base, originals in the configured object
/// storage (`KNOWLEDGE_DIR` or `GCS_BUCKET_NAME`, read from the environment like the service's).
/// Idempotent: a second run reports them as duplicates.
pub async fn seed_sample(
    store: &PgStore,
    embedder: &dyn Embedder,
    tenant: Uuid,
) -> Result<Vec<(String, IngestOutcome)>, KnowledgeError> {
    let storage: Arc<dyn ObjectStorage> = match Settings::from_env() {
        Ok(settings) => build_storage(&settings)?,
        Err(_) => Arc::new(LocalDirectory::from_env()),
    };
    seed_sample_into(store, embedder, storage.as_ref(), tenant).await
}

/// [`seed_sample`] with the object storage given.
pub async fn seed_sample_into(
    store: &PgStore,
    embedder: &dyn Embedder,
    storage: &dyn super::ObjectStorage,
    tenant: Uuid,
) -> Result<Vec<(String, IngestOutcome)>, KnowledgeError> {
    let ingestor = Ingestor::new(store, embedder, storage);
    let mut out = Vec::with_capacity(SAMPLE_DOCUMENTS.len());
    for (name, content) in SAMPLE_DOCUMENTS {
        let outcome = ingestor.ingest(tenant, name, content.as_bytes()).await?;
        out.push(((*name).to_owned(), outcome));
    }
    Ok(out)
}
