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

// ---------------------------------------------------------------------------------------------
// Jobs on the knowledge worker

mod jobs {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use engine::{
        async_trait,
        events::{MemoryEvents, names},
        ports::{EmbedPurpose, Embedder, PortError},
    };
    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    use super::{status, tenant};
    use crate::{
        knowledge::*,
        providers::embeddings::HashEmbedder,
        store::{PgStore, testing::TestDatabase},
    };

    /// The hash embedder behind a switch: the first `failures` calls fail as an unreachable
    /// service would; each call waits `delay` first.
    struct FlakyEmbedder {
        failures: usize,
        calls: AtomicUsize,
        delay: Duration,
    }

    impl FlakyEmbedder {
        fn new(failures: usize) -> Self {
            Self { failures, calls: AtomicUsize::new(0), delay: Duration::ZERO }
        }
    }

    #[async_trait]
    impl Embedder for FlakyEmbedder {
        fn dimensions(&self) -> usize {
            HashEmbedder::default().dimensions()
        }
        async fn embed(&self, texts: &[String], purpose: EmbedPurpose) -> Result<Vec<Vec<f32>>, PortError> {
            tokio::time::sleep(self.delay).await;
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(PortError::unavailable("embeddings", "connection refused"));
            }
            HashEmbedder::default().embed(texts, purpose).await
        }
    }

    struct Bench {
        db: TestDatabase,
        store: PgStore,
        storage: Arc<dyn ObjectStorage>,
        events: MemoryEvents,
        _dir: tempfile::TempDir,
    }

    impl Bench {
        async fn new() -> Self {
            let db = TestDatabase::create().await;
            let store = PgStore::new(db.pool.clone());
            let dir = tempfile::tempdir().unwrap();
            let storage: Arc<dyn ObjectStorage> = Arc::new(LocalDirectory::new(dir.path()));
            Self { db, store, storage, events: MemoryEvents::new(), _dir: dir }
        }

        fn worker(&self, id: &str, embedder: Arc<dyn Embedder>, retry: RetryPolicy) -> KnowledgeWorker {
            let config = KnowledgeWorkerConfig {
                poll_interval: Duration::from_millis(50),
                lease: Duration::from_secs(30),
                retry,
                ..KnowledgeWorkerConfig::new(id)
            };
            KnowledgeWorker::new(
                config,
                self.store.clone(),
                embedder,
                self.storage.clone(),
                Arc::new(self.events.clone()),
            )
        }

        async fn upload(&self, tenant: Uuid, name: &str, content: &str) -> Uuid {
            match upload(&self.store, self.storage.as_ref(), tenant, name, content.as_bytes()).await.unwrap() {
                UploadOutcome::Uploaded { document_id } => document_id,
                other => panic!("{other:?}"),
            }
        }

        /// Waits until the document is indexed or failed, and returns its status and error.
        async fn settled(&self, id: Uuid) -> (String, Option<String>) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let states = document_states(&self.store, &[id]).await.unwrap();
                if states.first().is_some_and(|s| s.is_final()) {
                    return status(&self.db, id).await;
                }
                assert!(tokio::time::Instant::now() < deadline, "document {id} never settled: {states:?}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }

        async fn attempts(&self, id: Uuid) -> i32 {
            document_states(&self.store, &[id]).await.unwrap()[0].attempts
        }

        async fn chunks(&self, id: Uuid) -> Vec<String> {
            sqlx::query_scalar("SELECT text FROM knowledge_chunks WHERE document_id = $1 ORDER BY ordinal")
                .bind(id)
                .fetch_all(&self.db.pool)
                .await
                .unwrap()
        }

        fn events_for(&self, name: &str, id: Uuid) -> usize {
            self.events
                .named(name)
                .iter()
                .filter(|e| e.field("documentId").and_then(|v| v.as_str()) == Some(&id.to_string()))
                .count()
        }
    }

    const FAQ: &str = "# Horaires\n\nLa boutique est ouverte du lundi au samedi de 9h à 19h.\n\n## Dimanche\n\nFermé le dimanche, sauf en décembre.";

    fn fast_retries(max_attempts: u32) -> RetryPolicy {
        RetryPolicy { max_attempts, backoff_base: Duration::from_millis(20), backoff_max: Duration::from_millis(40) }
    }

    #[tokio::test]
    async fn a_failing_embedder_is_retried_with_backoff_then_the_document_is_indexed_once() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let id = bench.upload(shop, "horaires.md", FAQ).await;
        assert_eq!(status(&bench.db, id).await, ("uploaded".into(), None), "an upload only queues");

        let stop = CancellationToken::new();
        let worker = bench.worker("w1", Arc::new(FlakyEmbedder::new(2)), fast_retries(5));
        let running = tokio::spawn(worker.run(stop.clone()));
        assert_eq!(bench.settled(id).await, ("indexed".into(), None));
        stop.cancel();
        running.await.unwrap();

        assert_eq!(bench.attempts(id).await, 3, "two failures, then success");
        let retries = bench.events.named(names::KNOWLEDGE_JOB_RETRY);
        assert_eq!(retries.len(), 2);
        assert_eq!(retries[0].field("attempt"), Some(&1.into()));
        assert_eq!(retries[0].field("delayMs"), Some(&20.into()));
        assert_eq!(retries[1].field("delayMs"), Some(&40.into()));
        let error = retries[0].field("error").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        assert!(error.contains("embedding failed: embeddings: connection refused"), "{error}");
        assert_eq!(bench.events_for(names::KNOWLEDGE_DOCUMENT_INDEXED, id), 1);
        assert!(!bench.chunks(id).await.is_empty());
        bench.db.drop_database().await;
    }

    #[tokio::test]
    async fn an_embedder_that_stays_down_ends_the_document_in_error_after_the_last_attempt() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let id = bench.upload(shop, "horaires.md", FAQ).await;
        let stop = CancellationToken::new();
        let running = tokio::spawn(
            bench.worker("w1", Arc::new(FlakyEmbedder::new(usize::MAX)), fast_retries(3)).run(stop.clone()),
        );
        let (state, error) = bench.settled(id).await;
        stop.cancel();
        running.await.unwrap();
        assert_eq!(state, "error");
        assert_eq!(
            error.as_deref(),
            Some("gave up after 3 attempts: embedding failed: embeddings: connection refused")
        );
        assert_eq!(bench.events.count(names::KNOWLEDGE_JOB_RETRY), 2);
        assert_eq!(bench.events_for(names::KNOWLEDGE_DOCUMENT_FAILED, id), 1);
        assert!(bench.chunks(id).await.is_empty());
        bench.db.drop_database().await;
    }

    #[tokio::test]
    async fn a_corrupt_pdf_fails_at_once_with_its_reason_and_is_not_retried() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let corrupt = "%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >> endobj\nxref\nbroken\n%%EOF";
        let id = bench.upload(shop, "tarifs.pdf", corrupt).await;
        let stop = CancellationToken::new();
        let running =
            tokio::spawn(bench.worker("w1", Arc::new(HashEmbedder::default()), fast_retries(5)).run(stop.clone()));
        let (state, error) = bench.settled(id).await;
        stop.cancel();
        running.await.unwrap();
        assert_eq!(state, "error");
        assert!(error.as_deref().unwrap_or_default().starts_with("unreadable PDF"), "{error:?}");
        assert_eq!(bench.attempts(id).await, 1);
        assert_eq!(bench.events.count(names::KNOWLEDGE_JOB_RETRY), 0);
        bench.db.drop_database().await;
    }

    #[tokio::test]
    async fn a_job_interrupted_mid_index_is_picked_up_again_and_indexed_exactly_once() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let id = bench.upload(shop, "horaires.md", FAQ).await;
        let busy = bench.upload(shop, "autre.md", "# Autre\n\nUn document qu'un worker vivant indexe.").await;
        // A worker died while indexing `id` (its lease ran out), having left a stray chunk; another
        // one is alive and working on `busy`.
        sqlx::query(
            "UPDATE knowledge_documents SET status = 'indexing', attempts = 1, locked_by = 'dead-worker',
                    locked_until = now() - interval '1 second' WHERE id = $1",
        )
        .bind(id)
        .execute(&bench.db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO knowledge_chunks (document_id, tenant_id, ordinal, text, embedding)
             VALUES ($1, $2, 0, 'stray half-indexed chunk', array_fill(0.5, ARRAY[768])::vector)",
        )
        .bind(id)
        .bind(shop)
        .execute(&bench.db.pool)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE knowledge_documents SET status = 'indexing', attempts = 1, locked_by = 'live-worker',
                    locked_until = now() + interval '1 hour' WHERE id = $1",
        )
        .bind(busy)
        .execute(&bench.db.pool)
        .await
        .unwrap();

        let stop = CancellationToken::new();
        let running =
            tokio::spawn(bench.worker("w2", Arc::new(HashEmbedder::default()), fast_retries(5)).run(stop.clone()));
        assert_eq!(bench.settled(id).await, ("indexed".into(), None));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
        running.await.unwrap();

        let expected = chunk::chunk(FAQ, chunk::ChunkOptions::default()).len();
        let chunks = bench.chunks(id).await;
        assert_eq!(chunks.len(), expected, "{chunks:?}");
        assert!(chunks.iter().all(|c| c != "stray half-indexed chunk"));
        assert_eq!(bench.attempts(id).await, 2);
        assert_eq!(bench.events_for(names::KNOWLEDGE_DOCUMENT_INDEXED, id), 1);
        assert_eq!(status(&bench.db, busy).await.0, "indexing", "a live lease is left alone");
        // Counted once against the plan: one row per upload, its bytes once.
        let (documents, bytes): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(bytes), 0)::bigint FROM knowledge_documents WHERE tenant_id = $1",
        )
        .bind(shop)
        .fetch_one(&bench.db.pool)
        .await
        .unwrap();
        assert_eq!(
            (documents, bytes),
            (2, (FAQ.len() + "# Autre\n\nUn document qu'un worker vivant indexe.".len()) as i64)
        );
        bench.db.drop_database().await;
    }

    #[tokio::test]
    async fn two_workers_share_the_queue_and_index_each_document_once() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(
                bench.upload(shop, &format!("doc{i}.md"), &format!("# Document {i}\n\nContenu numéro {i}.")).await,
            );
        }
        let stop = CancellationToken::new();
        let a = tokio::spawn(bench.worker("a", Arc::new(HashEmbedder::default()), fast_retries(5)).run(stop.clone()));
        let b = tokio::spawn(bench.worker("b", Arc::new(HashEmbedder::default()), fast_retries(5)).run(stop.clone()));
        for id in &ids {
            assert_eq!(bench.settled(*id).await.0, "indexed");
        }
        stop.cancel();
        a.await.unwrap();
        b.await.unwrap();
        for id in &ids {
            assert_eq!(bench.events_for(names::KNOWLEDGE_DOCUMENT_INDEXED, *id), 1, "{id}");
            assert_eq!(bench.attempts(*id).await, 1);
        }
        bench.db.drop_database().await;
    }

    #[tokio::test]
    async fn a_stopped_worker_gives_its_document_back_to_the_queue_at_once() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let id = bench.upload(shop, "horaires.md", FAQ).await;
        let slow = FlakyEmbedder { delay: Duration::from_secs(30), ..FlakyEmbedder::new(0) };
        let stop = CancellationToken::new();
        let running = tokio::spawn(bench.worker("w1", Arc::new(slow), fast_retries(5)).run(stop.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while status(&bench.db, id).await.0 != "indexing" {
            assert!(tokio::time::Instant::now() < deadline, "never claimed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), running).await.expect("the worker stops promptly").unwrap();
        assert_eq!(status(&bench.db, id).await.0, "uploaded");
        assert_eq!(bench.attempts(id).await, 0, "the interrupted attempt is not counted");
        bench.db.drop_database().await;
    }

    #[tokio::test]
    async fn a_reindex_queues_the_document_again_and_a_worker_indexes_it() {
        let bench = Bench::new().await;
        let shop = tenant(&bench.store, "Boutique", None).await;
        let embedder = HashEmbedder::default();
        let ingestor = Ingestor::new(&bench.store, &embedder, bench.storage.as_ref());
        let IngestOutcome::Indexed { document_id: id, chunks } =
            ingestor.ingest(shop, "horaires.md", FAQ.as_bytes()).await.unwrap()
        else {
            panic!("inline ingest indexes")
        };
        ingestor.queue_reindex(shop, id).await.unwrap();
        assert_eq!(status(&bench.db, id).await.0, "uploaded");
        assert!(matches!(ingestor.queue_reindex(shop, Uuid::new_v4()).await, Err(KnowledgeError::DocumentNotFound(_))));
        let stop = CancellationToken::new();
        let running =
            tokio::spawn(bench.worker("w1", Arc::new(HashEmbedder::default()), fast_retries(5)).run(stop.clone()));
        assert_eq!(bench.settled(id).await, ("indexed".into(), None));
        stop.cancel();
        running.await.unwrap();
        assert_eq!(bench.chunks(id).await.len(), chunks);
        bench.db.drop_database().await;
    }
}
