//! Knowledge search: a tenant's chunks nearest to a query embedding, by cosine similarity over
//! pgvector's HNSW index.

use engine::{ids::TenantId, message::KnowledgeChunk};

use super::{EMBEDDING_DIMENSIONS, PgStore, StoreError, parse_id};

/// An embedding as pgvector's text form (`[0.1,0.2,…]`), bound as text and cast with
/// `::vector`: no client-side vector type needed. Refuses the wrong dimension and non-finite
/// values, which PostgreSQL would reject less clearly.
pub fn vector_literal(embedding: &[f32]) -> Result<String, StoreError> {
    if embedding.len() != EMBEDDING_DIMENSIONS {
        return Err(StoreError::Invalid(format!(
            "embedding has {} dimensions, the knowledge base stores {EMBEDDING_DIMENSIONS}",
            embedding.len()
        )));
    }
    if embedding.iter().any(|x| !x.is_finite()) {
        return Err(StoreError::Invalid("embedding has a non-finite value".into()));
    }
    let mut out = String::with_capacity(embedding.len() * 12 + 2);
    out.push('[');
    for (i, x) in embedding.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // `Display` of f32 prints the shortest text that reads back as the same value.
        out.push_str(&x.to_string());
    }
    out.push(']');
    Ok(out)
}

#[derive(sqlx::FromRow)]
struct ChunkRow {
    document_id: uuid::Uuid,
    title: String,
    text: String,
    score: f64,
}

impl PgStore {
    /// The tenant's chunks of indexed documents most similar to `embedding`, best first: the
    /// `top_k` nearest, keeping those scoring at least `min_score` (score = 1 − cosine distance).
    pub(super) async fn search_chunks(
        &self,
        tenant: &TenantId,
        embedding: &[f32],
        top_k: usize,
        min_score: f32,
    ) -> Result<Vec<KnowledgeChunk>, StoreError> {
        let tenant = parse_id("tenant", tenant.as_str())?;
        if top_k == 0 {
            return Ok(Vec::new());
        }
        let vector = vector_literal(embedding)?;
        // Ordering by the distance expression itself is what lets the planner use the HNSW index;
        // the score threshold applies to those top rows (filtering inside would defeat the index).
        let rows: Vec<ChunkRow> = sqlx::query_as(
            "SELECT document_id, title, text, score FROM (
                 SELECT c.document_id, d.title, c.text, 1 - (c.embedding <=> $2::text::vector) AS score
                 FROM knowledge_chunks c JOIN knowledge_documents d ON d.id = c.document_id
                 WHERE c.tenant_id = $1 AND d.status = 'indexed'
                 ORDER BY c.embedding <=> $2::text::vector
                 LIMIT $3
             ) top
             WHERE score >= $4
             ORDER BY score DESC",
        )
        .bind(tenant)
        .bind(vector)
        .bind(i64::try_from(top_k).unwrap_or(i64::MAX))
        .bind(f64::from(min_score))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| KnowledgeChunk {
                document_id: r.document_id.to_string(),
                title: r.title,
                text: r.text,
                score: r.score as f32,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use engine::{
        embedding::{DEFAULT_DIMENSIONS, hash_embedding},
        ports::RelationalStore,
    };
    use uuid::Uuid;

    use super::*;
    use crate::store::{SeedTenant, testing::TestDatabase};

    async fn tenant(store: &PgStore, name: &str) -> Uuid {
        store
            .seed_tenant(&SeedTenant {
                name: name.into(),
                phone_number_id: format!("PNID-{name}"),
                plan: None,
                monthly_messages: None,
                provider: "sandbox".into(),
            })
            .await
            .unwrap()
            .tenant_id
    }

    async fn document(db: &TestDatabase, tenant: Uuid, title: &str, status: &str, chunks: &[&str]) -> Uuid {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO knowledge_documents (tenant_id, title, source, content_hash, status)
             VALUES ($1, $2, $2, md5($2 || $1::text), $3) RETURNING id",
        )
        .bind(tenant)
        .bind(title)
        .bind(status)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        for (ordinal, text) in chunks.iter().enumerate() {
            sqlx::query(
                "INSERT INTO knowledge_chunks (document_id, tenant_id, ordinal, text, embedding)
                 VALUES ($1, $2, $3, $4, $5::text::vector)",
            )
            .bind(id)
            .bind(tenant)
            .bind(ordinal as i32)
            .bind(text)
            .bind(vector_literal(&hash_embedding(text, DEFAULT_DIMENSIONS)).unwrap())
            .execute(&db.pool)
            .await
            .unwrap();
        }
        id
    }

    #[tokio::test]
    async fn search_returns_the_tenants_best_chunks_first_and_never_another_tenants() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        let a = tenant(&store, "A").await;
        let b = tenant(&store, "B").await;
        let hours = "Nos horaires d'ouverture : du lundi au vendredi, de 9h à 18h.";
        let delivery = "La livraison est gratuite dès 50 euros d'achat.";
        let doc_a = document(&db, a, "FAQ", "indexed", &[delivery, hours, "Le paiement se fait par carte."]).await;
        document(&db, b, "FAQ de B", "indexed", &["Nos horaires d'ouverture : tous les jours de 8h à 20h."]).await;
        document(&db, a, "Brouillon", "indexing", &["Nos horaires d'ouverture changent en été."]).await;

        let query = hash_embedding("Quels sont vos horaires d'ouverture ?", DEFAULT_DIMENSIONS);
        let found = store.search_knowledge(&TenantId::new(a.to_string()), &query, 2, 0.0).await.unwrap();

        assert_eq!(found.len(), 2);
        assert_eq!(found[0].text, hours);
        assert_eq!(found[0].title, "FAQ");
        assert_eq!(found[0].document_id, doc_a.to_string());
        assert!(found[0].score > found[1].score);
        assert!(found[0].score > 0.0 && found[0].score <= 1.0 + 1e-5, "{}", found[0].score);
        assert!(found.iter().all(|c| !c.text.contains("8h à 20h")), "tenant B's chunk leaked: {found:?}");
        assert!(found.iter().all(|c| !c.text.contains("en été")), "a document still indexing was searched");

        let threshold = (found[0].score + found[1].score) / 2.0;
        let strict = store.search_knowledge(&TenantId::new(a.to_string()), &query, 5, threshold).await.unwrap();
        assert_eq!(strict.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), [hours], "min_score filters");

        let for_b = store.search_knowledge(&TenantId::new(b.to_string()), &query, 5, 0.0).await.unwrap();
        assert_eq!(for_b.len(), 1);
        assert!(for_b[0].text.contains("8h à 20h"));

        let none = store.search_knowledge(&TenantId::new(a.to_string()), &query, 0, 0.0).await.unwrap();
        assert!(none.is_empty());
        db.drop_database().await;
    }

    #[test]
    fn wrong_dimension_or_non_finite_embeddings_are_refused() {
        assert!(matches!(vector_literal(&[0.5; 3]), Err(StoreError::Invalid(_))));
        let mut v = vec![0.0; EMBEDDING_DIMENSIONS];
        v[7] = f32::NAN;
        assert!(matches!(vector_literal(&v), Err(StoreError::Invalid(_))));
        v[7] = -0.25;
        let literal = vector_literal(&v).unwrap();
        assert!(literal.starts_with("[0,0,"), "{}", &literal[..10]);
        assert!(literal.contains(",-0.25,"));
    }
}
