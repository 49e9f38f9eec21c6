//! The `hash` embedder, the embedded default: feature hashing, no model, no network.

use engine::{
    async_trait,
    embedding::{DEFAULT_DIMENSIONS, hash_embedding},
    ports::{EmbedPurpose, Embedder, PortError},
};

/// Deterministic bag-of-words vectors ([`hash_embedding`]): retrieval works, and is testable,
/// without a model. Queries and documents are embedded alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashEmbedder {
    dimensions: usize,
}

impl HashEmbedder {
    /// An embedder of `dimensions` values per vector; Parley's tables hold [`DEFAULT_DIMENSIONS`].
    pub fn new(dimensions: usize) -> Self {
        Self { dimensions: dimensions.max(1) }
    }
}

impl Default for HashEmbedder {
    fn default() -> Self {
        Self::new(DEFAULT_DIMENSIONS)
    }
}

#[async_trait]
impl Embedder for HashEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String], _purpose: EmbedPurpose) -> Result<Vec<Vec<f32>>, PortError> {
        Ok(texts.iter().map(|text| hash_embedding(text, self.dimensions)).collect())
    }
}

#[cfg(test)]
mod tests {
    use engine::embedding::cosine;

    use super::*;

    #[tokio::test]
    async fn hash_embedder_returns_one_768_value_vector_per_text() {
        let embedder = HashEmbedder::default();
        let texts = vec!["Quels sont vos horaires ?".to_owned(), "Livraison gratuite".to_owned()];

        let vectors = embedder.embed(&texts, EmbedPurpose::Document).await.expect("embeds");

        assert_eq!(embedder.dimensions(), 768);
        assert_eq!(vectors.len(), 2);
        assert!(vectors.iter().all(|v| v.len() == 768));
    }

    #[tokio::test]
    async fn a_query_matches_the_document_with_the_same_words() {
        let embedder = HashEmbedder::default();
        let doc = embedder.embed(&["Nos horaires : 9h-18h".to_owned()], EmbedPurpose::Document).await.expect("doc");
        let query = embedder.embed(&["Nos horaires : 9h-18h".to_owned()], EmbedPurpose::Query).await.expect("query");

        assert!((cosine(&doc[0], &query[0]) - 1.0).abs() < 1e-5);
    }
}
