//! Ingestion end to end on a real PostgreSQL: upload → indexed → retrieved by a question,
//! duplicates, a corrupt PDF, tenant isolation, the plans' limits, and recall on the sample set.

use engine::{
    ids::TenantId,
    ports::{EmbedPurpose, Embedder, RelationalStore},
};
use uuid::Uuid;

use super::*;
use crate::{
    providers::embeddings::HashEmbedder,
    store::{PgStore, SeedTenant, testing::TestDatabase},
};

async fn tenant(store: &PgStore, name: &str, plan: Option<&str>) -> Uuid {
    store
        .seed_tenant(&SeedTenant {
            name: name.into(),
            phone_number_id: format!("PNID-{name}"),
            plan: plan.map(Into::into),
            monthly_messages: None,
            provider: "sandbox".into(),
        })
        .await
        .unwrap()
        .tenant_id
}

async fn ask(store: &PgStore, tenant: Uuid, question: &str, top_k: usize) -> Vec<engine::message::KnowledgeChunk> {
    let query = HashEmbedder::default().embed(&[question.to_owned()], EmbedPurpose::Query).await.unwrap();
    store.search_knowledge(&TenantId::new(tenant.to_string()), &query[0], top_k, 0.0).await.unwrap()
}

async fn status(db: &TestDatabase, id: Uuid) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, error FROM knowledge_documents WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_uploaded_faq_is_indexed_and_answers_a_question_and_a_second_upload_is_a_duplicate() {
    let db = TestDatabase::create().await;
    let store = PgStore::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalDirectory::new(dir.path());
    let embedder = HashEmbedder::default();
    let ingestor = Ingestor::new(&store, &embedder, &storage);
    let shop = tenant(&store, "Boutique", None).await;
    let content = SAMPLE_DOCUMENTS.iter().find(|(n, _)| *n == "livraison.md").unwrap().1;

    let outcome = ingestor.ingest(shop, "docs/livraison.md", content.as_bytes()).await.unwrap();
    let IngestOutcome::Indexed { document_id, chunks } = outcome else { panic!("{outcome:?}") };
    assert!(chunks >= 3, "one chunk per section at least: {chunks}");
    assert_eq!(status(&db, document_id).await, ("indexed".into(), None));

    let found = ask(&store, shop, "La livraison est-elle gratuite ?", 3).await;
    assert_eq!(found[0].document_id, document_id.to_string());
    assert_eq!(found[0].title, "Livraison");
    assert!(found[0].text.starts_with("Livraison > Tarifs\n\n"), "{}", found[0].text);
    assert!(found[0].text.contains("gratuite dès 50 euros"), "{}", found[0].text);

    let again = ingestor.ingest(shop, "copie.md", content.as_bytes()).await.unwrap();
    assert_eq!(again, IngestOutcome::Duplicate { document_id });
    assert_eq!(again.summary(), "duplicate");
    let listed = list_documents(&store, shop).await.unwrap();
    assert_eq!(listed.len(), 1, "a duplicate adds no row");
    assert_eq!((listed[0].source.as_str(), listed[0].status.as_str()), ("livraison.md", "indexed"));
    assert_eq!(listed[0].chunks, chunks as i64);
    assert_eq!(listed[0].bytes, content.len() as i64);

    // The original is kept, so a re-index works from it and gives the same chunks.
    assert_eq!(ingestor.reindex(shop, document_id).await.unwrap(), IngestOutcome::Indexed { document_id, chunks });
    assert!(ingestor.delete(shop, document_id).await.unwrap());
    assert!(ask(&store, shop, "La livraison est-elle gratuite ?", 3).await.is_empty());
    assert!(list_documents(&store, shop).await.unwrap().is_empty());
    assert_eq!(std::fs::read_dir(dir.path().join(shop.to_string())).unwrap().count(), 0, "original deleted");
    db.drop_database().await;
}

#[tokio::test]
async fn a_corrupt_pdf_ends_in_error_with_its_reason_and_unsupported_files_are_refused() {
    let db = TestDatabase::create().await;
    let store = PgStore::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalDirectory::new(dir.path());
    let embedder = HashEmbedder::default();
    let ingestor = Ingestor::new(&store, &embedder, &storage);
    let shop = tenant(&store, "Boutique", None).await;

    let corrupt = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >> endobj\nxref\nbroken\n%%EOF";
    let outcome = ingestor.ingest(shop, "tarifs.pdf", corrupt).await.unwrap();
    let IngestOutcome::Failed { document_id, reason } = &outcome else { panic!("{outcome:?}") };
    assert!(reason.starts_with("unreadable PDF"), "{reason}");
    assert!(outcome.summary().starts_with("error: unreadable PDF"));
    let (state, error) = status(&db, *document_id).await;
    assert_eq!(state, "error");
    assert_eq!(error.as_deref(), Some(reason.as_str()));

    let err = ingestor.ingest(shop, "photo.png", b"\x89PNG").await.unwrap_err();
    assert_eq!(err.to_string(), "unsupported file type (accepted: .txt, .md, .html, .pdf)");
    assert_eq!(list_documents(&store, shop).await.unwrap().len(), 1, "an unsupported file is not recorded");
    db.drop_database().await;
}

#[tokio::test]
async fn tenant_a_never_retrieves_tenant_b_documents() {
    let db = TestDatabase::create().await;
    let store = PgStore::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalDirectory::new(dir.path());
    let embedder = HashEmbedder::default();
    let a = tenant(&store, "A", None).await;
    let b = tenant(&store, "B", None).await;
    seed_sample_into(&store, &embedder, &storage, b).await.unwrap();
    let ingestor = Ingestor::new(&store, &embedder, &storage);
    let own = "# Horaires\n\nNous sommes ouverts tous les jours de 7h à 22h.";
    ingestor.ingest(a, "horaires.md", own.as_bytes()).await.unwrap();

    let found = ask(&store, a, "Quels sont vos horaires d'ouverture le dimanche ?", 10).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].text.contains("7h à 22h"));
    // The same content in two tenants is two documents: duplicates are per tenant.
    let sample = SAMPLE_DOCUMENTS[0].1;
    assert!(matches!(ingestor.ingest(a, "h.md", sample.as_bytes()).await.unwrap(), IngestOutcome::Indexed { .. }));
    db.drop_database().await;
}

#[tokio::test]
async fn the_plan_limits_on_documents_and_storage_are_enforced_and_counted_once() {
    let db = TestDatabase::create().await;
    let store = PgStore::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalDirectory::new(dir.path());
    let embedder = HashEmbedder::default();
    let ingestor = Ingestor::new(&store, &embedder, &storage);
    sqlx::query("INSERT INTO plans (code, name, max_documents, max_storage_bytes) VALUES ('tiny', 'Tiny', 2, 100)")
        .execute(&db.pool)
        .await
        .unwrap();
    let shop = tenant(&store, "Petite", Some("tiny")).await;

    assert!(matches!(ingestor.ingest(shop, "a.txt", &[b'a'; 40]).await.unwrap(), IngestOutcome::Indexed { .. }));
    // A duplicate and a re-index count nothing.
    assert!(matches!(ingestor.ingest(shop, "a2.txt", &[b'a'; 40]).await.unwrap(), IngestOutcome::Duplicate { .. }));
    let err = ingestor.ingest(shop, "big.txt", &[b'b'; 61]).await.unwrap_err();
    assert!(matches!(err, KnowledgeError::StorageLimit { bytes: 61, would_use: 101, limit: 100 }), "{err:?}");
    assert!(err.to_string().starts_with("storage limit reached"), "{err}");
    assert!(matches!(ingestor.ingest(shop, "b.txt", &[b'b'; 60]).await.unwrap(), IngestOutcome::Indexed { .. }));
    let err = ingestor.ingest(shop, "c.txt", b"c").await.unwrap_err();
    assert!(matches!(err, KnowledgeError::DocumentLimit { used: 2, limit: 2 }), "{err:?}");
    assert!(err.to_string().contains("2 of the 2 documents"), "{err}");
    assert_eq!(list_documents(&store, shop).await.unwrap().len(), 2);

    // Without a plan: the defaults, which allow at least 100 documents and 50 MB.
    let free = tenant(&store, "Libre", None).await;
    assert!(matches!(ingestor.ingest(free, "a.txt", &[b'a'; 40]).await.unwrap(), IngestOutcome::Indexed { .. }));
    const {
        assert!(
            crate::store::DEFAULT_MAX_DOCUMENTS >= 100 && crate::store::DEFAULT_MAX_STORAGE_BYTES >= 50 * 1024 * 1024
        )
    };
    db.drop_database().await;
}

/// The evaluation set: questions a customer would ask, with the sample document that answers.
const EVALUATION: &[(&str, &str)] = &[
    ("Êtes-vous ouverts le dimanche ?", "horaires.md"),
    ("À quelle heure ouvre la boutique le samedi ?", "horaires.md"),
    ("Combien coûte la livraison à domicile ?", "livraison.md"),
    ("En combien de jours je reçois mon colis en Belgique ?", "livraison.md"),
    ("Comment retourner un article défectueux ?", "retours.md"),
    ("Quand serai-je remboursé après mon retour ?", "retours.md"),
    ("Puis-je payer avec PayPal ou Apple Pay ?", "paiement.txt"),
    ("Proposez-vous le paiement en trois fois ?", "paiement.txt"),
];

#[tokio::test]
async fn the_sample_knowledge_answers_the_evaluation_questions_with_the_hash_embedder() {
    let db = TestDatabase::create().await;
    let store = PgStore::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalDirectory::new(dir.path());
    let embedder = HashEmbedder::default();
    let shop = tenant(&store, "Demo", None).await;
    let seeded = seed_sample_into(&store, &embedder, &storage, shop).await.unwrap();
    assert!(seeded.iter().all(|(_, o)| matches!(o, IngestOutcome::Indexed { .. })), "{seeded:?}");
    let again = seed_sample_into(&store, &embedder, &storage, shop).await.unwrap();
    assert!(again.iter().all(|(_, o)| matches!(o, IngestOutcome::Duplicate { .. })), "seeding is idempotent");

    let sources: std::collections::HashMap<String, String> =
        list_documents(&store, shop).await.unwrap().into_iter().map(|d| (d.id.to_string(), d.source)).collect();
    let (mut hits_at_1, mut hits_at_5) = (0, 0);
    let mut misses = Vec::new();
    for (question, expected) in EVALUATION {
        let found = ask(&store, shop, question, 5).await;
        let docs: Vec<&str> = found.iter().map(|c| sources[&c.document_id].as_str()).collect();
        hits_at_1 += usize::from(docs.first() == Some(expected));
        if docs.contains(expected) {
            hits_at_5 += 1;
        } else {
            misses.push((question, docs));
        }
    }
    let recall_at_5 = hits_at_5 as f64 / EVALUATION.len() as f64;
    eprintln!("recall@1 = {hits_at_1}/{n}, recall@5 = {hits_at_5}/{n}", n = EVALUATION.len());
    // Measured: 8/8 at 5 and 6/8 at 1. Bag-of-words hashing misses paraphrases, and with four
    // documents recall@5 is the easy bar; recall@1 is what the `local` LLM's verbatim quote needs.
    assert!(recall_at_5 >= 0.875, "recall@5 = {recall_at_5}; missed: {misses:?}");
    assert!(hits_at_1 >= 6, "recall@1 = {hits_at_1}/8");
    db.drop_database().await;
}
