//! The embedders behind the engine's `Embedder` port — `hash` (the embedded default, no model),
//! any OpenAI-compatible `/embeddings` server, and Vertex AI's text embeddings — with the batching
//! they share, and the start-up check that their vectors fit the database's column.

pub mod hash;
pub mod openai;
pub mod vertex;

use engine::ports::Embedder;
use sqlx::PgPool;

pub use hash::HashEmbedder;
pub use openai::OpenAiEmbedder;
pub use vertex::VertexEmbedder;

/// The texts cut into consecutive batches of at most `max_texts` texts and, unless a single text
/// is longer, `max_chars` characters: providers limit both the inputs of a request and its total
/// size.
pub(crate) fn batches(texts: &[String], max_texts: usize, max_chars: usize) -> Vec<&[String]> {
    let mut out = Vec::new();
    let (mut start, mut chars) = (0, 0);
    for (i, text) in texts.iter().enumerate() {
        let len = text.chars().count();
        if i > start && (i - start == max_texts.max(1) || chars + len > max_chars) {
            out.push(&texts[start..i]);
            (start, chars) = (i, 0);
        }
        chars += len;
    }
    if start < texts.len() {
        out.push(&texts[start..]);
    }
    out
}

/// Checks at start-up that `embedder`'s vectors have the dimension of the `vector(N)` column
/// `knowledge_chunks.embedding`, so that a mismatch stops Parley with a clear message instead of
/// failing every ingestion and every retrieval. The error says what to change.
pub async fn check_embedding_dimension(embedder: &dyn Embedder, pool: &PgPool) -> Result<(), String> {
    let column: Option<(String,)> = sqlx::query_as(
        "SELECT format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         WHERE a.attrelid = to_regclass('knowledge_chunks') AND a.attname = 'embedding' AND NOT a.attisdropped",
    )
    .fetch_optional(pool)
    .await
    .map_err(|e| format!("cannot read the type of knowledge_chunks.embedding: {e}"))?;
    let Some((column_type,)) = column else {
        return Err(
            "the database has no knowledge_chunks.embedding column: apply the migrations (`parley migrate`)".to_owned()
        );
    };
    let stored = column_type
        .strip_prefix("vector(")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| {
            format!("knowledge_chunks.embedding is `{column_type}`, expected a vector with a fixed dimension, e.g. vector(768)")
        })?;
    let produced = embedder.dimensions();
    if produced != stored {
        return Err(format!(
            "the embedder produces {produced}-dimensional vectors but knowledge_chunks.embedding is vector({stored}): \
             choose an embedding model of {stored} dimensions (EMBEDDING_PROVIDER, EMBEDDING_MODEL), or change the \
             column with a migration and re-index the knowledge base"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lengths: &[usize]) -> Vec<String> {
        lengths.iter().map(|n| "x".repeat(*n)).collect()
    }

    fn sizes(batches: &[&[String]]) -> Vec<usize> {
        batches.iter().map(|b| b.len()).collect()
    }

    #[test]
    fn batches_respect_the_count_and_the_size_limits() {
        assert_eq!(sizes(&batches(&texts(&[1; 7]), 3, 1000)), [3, 3, 1]);
        assert_eq!(sizes(&batches(&texts(&[40, 40, 40, 10]), 10, 100)), [2, 2]);
        assert_eq!(sizes(&batches(&texts(&[500, 5]), 10, 100)), [1, 1], "a long text goes alone");
        assert!(batches(&[], 3, 100).is_empty());
    }

    /// A database of its own for the test, dropped at the end.
    struct TestDb {
        admin: PgPool,
        name: String,
        pool: PgPool,
    }

    impl TestDb {
        async fn new() -> Self {
            let admin = PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await.expect("PostgreSQL");
            let name = format!("parley_test_dim_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
            let pool = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}")).await.expect("connect");
            Self { admin, name, pool }
        }

        async fn drop(self) {
            self.pool.close().await;
            let _ =
                sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&self.admin).await;
        }
    }

    #[tokio::test]
    async fn the_migrated_database_takes_the_768_dimension_embedders() {
        let db = TestDb::new().await;
        crate::store::migrate(&db.pool).await.expect("migrations");

        let checked = check_embedding_dimension(&HashEmbedder::default(), &db.pool).await;

        db.drop().await;
        assert_eq!(checked, Ok(()));
    }

    #[tokio::test]
    async fn a_mismatch_or_a_missing_column_stops_start_up_with_what_to_do() {
        let db = TestDb::new().await;
        let before_migrations = check_embedding_dimension(&HashEmbedder::default(), &db.pool).await;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS vector").execute(&db.pool).await.expect("pgvector");
        sqlx::query("CREATE TABLE knowledge_chunks (id serial, embedding vector(1536))")
            .execute(&db.pool)
            .await
            .expect("table");

        let mismatch = check_embedding_dimension(&HashEmbedder::default(), &db.pool).await;

        db.drop().await;
        let missing = before_migrations.expect_err("no table yet");
        assert!(missing.contains("parley migrate"), "{missing}");
        let mismatch = mismatch.expect_err("1536 is not 768");
        assert!(
            mismatch.starts_with(
                "the embedder produces 768-dimensional vectors but knowledge_chunks.embedding is vector(1536)"
            ),
            "{mismatch}"
        );
    }
}
