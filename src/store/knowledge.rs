//! Knowledge search: a tenant's chunks nearest to a query embedding, by cosine similarity over
//! pgvector's HNSW index.

use engine::{ids::TenantId, message::KnowledgeChunk};
use sqlx::{
    Postgres,
    encode::IsNull,
    error::BoxDynError,
    postgres::{PgArgumentBuffer, PgTypeInfo},
};

use super::{EMBEDDING_DIMENSIONS, PgStore, StoreError, parse_id};

/// A tenant with at most this many chunks is searched exactly (every chunk compared), one with more
/// through the HNSW index. The HNSW index covers every tenant's chunks: for a small tenant among
/// many others, the index scan has to walk past thousands of other tenants' chunks to find `top_k`
/// of its own, and is both slower and less accurate than comparing its few chunks.
pub const EXACT_SEARCH_MAX_CHUNKS: usize = 1000;

/// The search for the `top_k` nearest chunks. The query vector is bound as a `vector` in
/// pgvector's binary form ([`QueryVector`]), so that PostgreSQL receives it ready to use: bound as
/// text and cast in SQL (as before), the cast became a per-row conversion of 768 floats once
/// PostgreSQL switched the prepared statement to a generic plan (from its sixth execution on a
/// connection).
///
/// The statement suits a generic plan, which cannot know the tenant's size: it counts the tenant's
/// chunks up to [`EXACT_SEARCH_MAX_CHUNKS`] + 1 (a short scan of the tenant index), and each branch
/// of the `UNION ALL` runs only when its one-time condition holds. The exact branch orders by the
/// score, which no index serves; the other orders by the distance expression itself, then `LIMIT`,
/// which is what lets the planner walk the HNSW index. `top_k` is written into the statement rather
/// than bound: with `LIMIT $n`, a generic plan does not know how few rows are wanted and sorts all
/// the tenant's chunks instead of walking the index (measured: 31 ms instead of 1.2 ms for 2,000
/// chunks, growing with the tenant's chunks). sqlx caches one statement per distinct `top_k`, which
/// comes from the pipeline's configuration.
///
/// The tenant filter is applied to the rows the index yields; with `hnsw.iterative_scan` (set per
/// connection in `store::pool_options`) the scan goes on until `top_k` rows of the tenant are
/// found instead of returning fewer, and its `relaxed_order` may yield them slightly out of order:
/// the outer `ORDER BY` restores it. The score threshold applies to the top rows outside the
/// branches (filtering inside would defeat the index).
fn search_sql(top_k: usize) -> String {
    let branch = |condition: &str, order: &str| {
        format!(
            "(SELECT c.document_id, d.title, c.text, 1 - (c.embedding <=> $2) AS score
              FROM knowledge_chunks c JOIN knowledge_documents d ON d.id = c.document_id
              WHERE {condition} AND c.tenant_id = $1 AND d.status = 'indexed'
              ORDER BY {order}
              LIMIT {top_k})"
        )
    };
    format!(
        "WITH size AS MATERIALIZED (
             SELECT count(*) <= {max} AS small
             FROM (SELECT 1 FROM knowledge_chunks WHERE tenant_id = $1 LIMIT {max} + 1) chunks
         )
         SELECT document_id, title, text, score FROM (
             {exact}
             UNION ALL
             {indexed}
         ) top
         WHERE score >= $3
         ORDER BY score DESC",
        max = EXACT_SEARCH_MAX_CHUNKS,
        exact = branch("(SELECT small FROM size)", "score DESC"),
        indexed = branch("NOT (SELECT small FROM size)", "c.embedding <=> $2"),
    )
}

/// Refuses an embedding of the wrong dimension or with non-finite values, which PostgreSQL would
/// reject less clearly.
fn check_embedding(embedding: &[f32]) -> Result<(), StoreError> {
    if embedding.len() != EMBEDDING_DIMENSIONS {
        return Err(StoreError::Invalid(format!(
            "embedding has {} dimensions, the knowledge base stores {EMBEDDING_DIMENSIONS}",
            embedding.len()
        )));
    }
    if embedding.iter().any(|x| !x.is_finite()) {
        return Err(StoreError::Invalid("embedding has a non-finite value".into()));
    }
    Ok(())
}

/// An embedding as pgvector's text form (`[0.1,0.2,…]`), for inserts that cast text with
/// `::vector` (the ingestion's batched chunk insert, the tests). Refuses the wrong dimension and
/// non-finite values.
pub fn vector_literal(embedding: &[f32]) -> Result<String, StoreError> {
    check_embedding(embedding)?;
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

/// A checked embedding bound as a pgvector `vector` parameter, in the type's binary form
/// (`vector_recv`: the dimension and a reserved zero as big-endian `int16`, then each value as a
/// big-endian `float4`). sqlx looks the type's oid up by name once per connection.
#[derive(Debug, Clone, Copy)]
struct QueryVector<'a>(&'a [f32]);

impl<'a> QueryVector<'a> {
    fn new(embedding: &'a [f32]) -> Result<Self, StoreError> {
        check_embedding(embedding)?;
        Ok(Self(embedding))
    }
}

impl sqlx::Type<Postgres> for QueryVector<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("vector")
    }
}

impl sqlx::Encode<'_, Postgres> for QueryVector<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let dimensions = i16::try_from(self.0.len())?;
        buf.extend_from_slice(&dimensions.to_be_bytes());
        buf.extend_from_slice(&0i16.to_be_bytes());
        for x in self.0 {
            buf.extend_from_slice(&x.to_be_bytes());
        }
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        4 + 4 * self.0.len()
    }
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
        let vector = QueryVector::new(embedding)?;
        let mut conn = self.hot().await?;
        let rows: Vec<ChunkRow> = sqlx::query_as(&search_sql(top_k))
            .bind(tenant)
            .bind(vector)
            .bind(f64::from(min_score))
            .fetch_all(&mut *conn)
            .await?;
        conn.keep();
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

    /// Adds `count` chunks with random vectors to `document`, without the HNSW index's incremental
    /// inserts (slow at this size): the index is dropped and built again from its own definition.
    async fn random_chunks(db: &TestDatabase, document: Uuid, tenant: Uuid, count: i32) {
        let index: String = sqlx::query_scalar("SELECT pg_get_indexdef('knowledge_chunks_embedding'::regclass)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        sqlx::query("DROP INDEX knowledge_chunks_embedding").execute(&db.pool).await.unwrap();
        // The subquery refers to `g` so that each row gets a vector of its own.
        sqlx::query(
            "INSERT INTO knowledge_chunks (document_id, tenant_id, ordinal, text, embedding)
             SELECT $1, $2, 1000 + g, 'random chunk ' || g,
                    (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, 768) WHERE g > 0)::vector
             FROM generate_series(1, $3) g",
        )
        .bind(document)
        .bind(tenant)
        .bind(count)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(&index).execute(&db.pool).await.unwrap();
        sqlx::query("ANALYZE knowledge_documents, knowledge_chunks").execute(&db.pool).await.unwrap();
    }

    /// What PostgreSQL does with the search once it runs as a generic plan (from the sixth execution
    /// of the statement on a connection): for a tenant with more than `EXACT_SEARCH_MAX_CHUNKS` it
    /// must still walk the HNSW index, with the query vector as a plain parameter (`<=> $2`), never
    /// converted for each row (`($2)::text::vector`); a small tenant's chunks are compared exactly.
    #[tokio::test]
    async fn a_generic_plan_walks_the_hnsw_index_with_the_query_vector_bound_once() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        let big = tenant(&store, "Big").await;
        let small = tenant(&store, "Small").await;
        let big_doc = document(&db, big, "Catalogue", "indexed", &[]).await;
        let small_texts = [
            "Les horaires du magasin de Lyon : du mardi au samedi.",
            "La livraison en point relais prend trois jours.",
            "Les retours sont gratuits pendant trente jours.",
        ];
        let small_doc = document(&db, small, "FAQ", "indexed", &small_texts).await;
        random_chunks(&db, big_doc, big, 3000).await;

        sqlx::query(&format!("ALTER DATABASE {} SET plan_cache_mode = force_generic_plan", db.name()))
            .execute(&db.pool)
            .await
            .unwrap();
        // New connections take the setting (and `hnsw.iterative_scan` from the pool's own setup).
        let generic = PgStore::new(crate::store::connect(&db.url).await.unwrap());

        let probe: String =
            sqlx::query_scalar("SELECT embedding::text FROM knowledge_chunks WHERE tenant_id = $1 AND ordinal = 1500")
                .bind(big)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let mut conn = generic.pool.acquire().await.unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(mode, "force_generic_plan");
        // The statement the store sends, with its parameters typed as the store binds them.
        sqlx::raw_sql(&format!("PREPARE search (uuid, vector, float8) AS {}", search_sql(5)))
            .execute(&mut *conn)
            .await
            .unwrap();
        let explain = |tenant: Uuid| format!("EXPLAIN (ANALYZE, COSTS OFF) EXECUTE search('{tenant}', '{probe}', 0)");
        let plan: Vec<String> = sqlx::query_scalar(&explain(big)).fetch_all(&mut *conn).await.unwrap();
        let hnsw = plan.iter().find(|l| l.contains("Index Scan using knowledge_chunks_embedding"));
        let plan = plan.join("\n");
        assert!(hnsw.is_some_and(|l| l.contains("actual time")), "the HNSW index is not walked:\n{plan}");
        assert!(plan.contains("Order By: (embedding <=> $2)"), "the query vector is not a plain parameter:\n{plan}");
        // The text form's plan reads `(($2)::text)::vector`, evaluated for each row compared.
        assert!(!plan.contains("$2)::"), "the query vector is cast in SQL:\n{plan}");
        // The small tenant's few chunks are compared exactly, without the index.
        let plan: Vec<String> = sqlx::query_scalar(&explain(small)).fetch_all(&mut *conn).await.unwrap();
        let hnsw = plan.iter().find(|l| l.contains("Index Scan using knowledge_chunks_embedding"));
        let plan = plan.join("\n");
        assert!(hnsw.is_some_and(|l| l.contains("never executed")), "the HNSW index is walked:\n{plan}");
        assert!(plan.contains("rows=3 loops=1"), "the small tenant's chunks are not all compared:\n{plan}");
        drop(conn);

        // The store's own path, past the five custom plans: the probe's own chunk comes first.
        let probe: Vec<f32> = probe.trim_matches(['[', ']']).split(',').map(|x| x.parse().unwrap()).collect();
        for _ in 0..7 {
            let found = generic.search_knowledge(&TenantId::new(big.to_string()), &probe, 5, -1.0).await.unwrap();
            assert_eq!(found.len(), 5);
            assert_eq!(found[0].text, "random chunk 500");
            assert!((found[0].score - 1.0).abs() < 1e-4, "{}", found[0].score);
            assert!(found.windows(2).all(|w| w[0].score >= w[1].score), "not best first: {found:?}");
        }
        // A tenant with 3 chunks among 3,003 gets all of them, and only them, best first.
        let query = hash_embedding("Quels sont les horaires du magasin de Lyon ?", DEFAULT_DIMENSIONS);
        for _ in 0..7 {
            let found = generic.search_knowledge(&TenantId::new(small.to_string()), &query, 5, -1.0).await.unwrap();
            assert_eq!(found.len(), 3, "{found:?}");
            assert_eq!(found[0].text, small_texts[0]);
            assert!(found.iter().all(|c| c.document_id == small_doc.to_string()), "another tenant's chunk: {found:?}");
        }
        generic.pool.close().await;
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
