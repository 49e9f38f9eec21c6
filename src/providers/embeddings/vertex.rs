//! Vertex AI text embeddings: `POST …/publishers/google/models/{VERTEX_EMBEDDING_MODEL}:predict`
//! (`text-embedding-004` by default), one instance per text with the task type that tells a
//! question (`RETRIEVAL_QUERY`) from a passage (`RETRIEVAL_DOCUMENT`), 768 dimensions, at most 250
//! texts per request.

use std::time::Duration;

use engine::{
    async_trait,
    embedding::DEFAULT_DIMENSIONS,
    events::Event,
    ports::{EmbedPurpose, Embedder, PortError},
};
use serde::{Deserialize, Serialize};

use super::{batches, openai::check_vectors};
use crate::providers::{
    retry::{AttemptError, Retries, RetryPolicy},
    vertex::VertexClient,
};

/// The service name in this client's errors.
pub const SERVICE: &str = "vertex_embeddings";

/// Vertex AI's limit of instances per request.
pub const MAX_TEXTS: usize = 250;
/// Characters per request: Vertex AI also limits a request's tokens (20,000); at about four
/// characters per token this stays under it. A longer text goes alone and is truncated by
/// Vertex AI (`autoTruncate`).
const MAX_CHARS: usize = 60_000;

pub struct VertexEmbedder {
    client: VertexClient,
    model: String,
    query_retries: Retries,
    document_retries: Retries,
}

#[derive(Serialize)]
struct PredictRequest<'a> {
    instances: Vec<Instance<'a>>,
    parameters: Parameters,
}

#[derive(Serialize)]
struct Instance<'a> {
    content: &'a str,
    task_type: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Parameters {
    output_dimensionality: usize,
    auto_truncate: bool,
}

#[derive(Deserialize)]
struct PredictResponse {
    #[serde(default)]
    predictions: Vec<Prediction>,
}

#[derive(Deserialize)]
struct Prediction {
    embeddings: Embedding,
}

#[derive(Deserialize)]
struct Embedding {
    values: Vec<f32>,
}

impl VertexEmbedder {
    /// `retries` logs retried calls; its policy is replaced by [`RetryPolicy::EMBED_QUERY`] for
    /// questions and [`RetryPolicy::EMBED_DOCUMENTS`] for documents.
    pub fn new(client: VertexClient, model: String, retries: Retries) -> Self {
        Self {
            client,
            model,
            query_retries: retries.with_policy(RetryPolicy::EMBED_QUERY),
            document_retries: retries.with_policy(RetryPolicy::EMBED_DOCUMENTS),
        }
    }

    /// Replaces both budgets (tests use short ones).
    pub fn with_retries(mut self, query: Retries, documents: Retries) -> Self {
        self.query_retries = query;
        self.document_retries = documents;
        self
    }

    async fn attempt(
        &self,
        url: &url::Url,
        texts: &[String],
        task_type: &'static str,
        timeout: Duration,
    ) -> Result<Vec<Vec<f32>>, PortError> {
        let body = PredictRequest {
            instances: texts.iter().map(|content| Instance { content, task_type }).collect(),
            parameters: Parameters { output_dimensionality: DEFAULT_DIMENSIONS, auto_truncate: true },
        };
        let answer: PredictResponse = self.client.post(SERVICE, url, &body, timeout).await?;
        let vectors: Vec<Vec<f32>> = answer.predictions.into_iter().map(|p| p.embeddings.values).collect();
        check_vectors(SERVICE, &self.model, texts.len(), &vectors)?;
        Ok(vectors)
    }
}

#[async_trait]
impl Embedder for VertexEmbedder {
    fn dimensions(&self) -> usize {
        DEFAULT_DIMENSIONS
    }

    async fn embed(&self, texts: &[String], purpose: EmbedPurpose) -> Result<Vec<Vec<f32>>, PortError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (task_type, retries) = match purpose {
            EmbedPurpose::Query => ("RETRIEVAL_QUERY", &self.query_retries),
            EmbedPurpose::Document => ("RETRIEVAL_DOCUMENT", &self.document_retries),
        };
        let url = self.client.model_url(SERVICE, &self.model, "predict")?;
        let url = &url;
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in batches(texts, MAX_TEXTS, MAX_CHARS) {
            let describe = |event: Event| event.with("model", &self.model).with("texts", batch.len());
            let embedded = retries
                .run(&describe, |timeout| async move {
                    self.attempt(url, batch, task_type, timeout).await.map_err(AttemptError::idempotent)
                })
                .await?;
            vectors.extend(embedded);
        }
        Ok(vectors)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use engine::{
        events::{MemoryEvents, names},
        ports::PortErrorKind,
    };
    use serde_json::{Value, json};

    use super::*;
    use crate::providers::{
        fake_http::{FakeReply, FakeServer},
        google_auth::tests::granted,
        http_client::HttpTimeouts,
        vertex::tests::client,
    };

    const PREDICT_PATH: &str =
        "/v1/projects/parley-test-project/locations/europe-west1/publishers/google/models/text-embedding-004:predict";

    struct Fixture {
        vertex: FakeServer,
        events: MemoryEvents,
        embedder: VertexEmbedder,
        _oauth: FakeServer,
    }

    async fn fixture(reply: FakeReply, budget: Duration) -> Fixture {
        let vertex = FakeServer::start(reply).await;
        let oauth = FakeServer::start(granted("ya29.embed-token", 3600)).await;
        let events = MemoryEvents::new();
        let retries = Retries::new(RetryPolicy::fast(budget), Arc::new(events.clone()));
        let embedder =
            VertexEmbedder::new(client(&vertex, &oauth, &events), "text-embedding-004".into(), retries.clone())
                .with_retries(retries.clone(), retries);
        Fixture { vertex, events, embedder, _oauth: oauth }
    }

    fn predictions(n: usize) -> Value {
        json!({
            "predictions": (0..n).map(|i| json!({"embeddings": {
                "values": vec![i as f32; DEFAULT_DIMENSIONS],
                "statistics": {"truncated": false, "token_count": 4}
            }})).collect::<Vec<_>>(),
            "metadata": {"billableCharacterCount": 42}
        })
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("passage {i}")).collect()
    }

    #[tokio::test]
    async fn a_question_is_embedded_as_a_retrieval_query_in_768_dimensions() {
        let f = fixture(FakeReply::Json(200, predictions(1)), HttpTimeouts::EMBED_QUERY.total).await;

        let vectors =
            f.embedder.embed(&["Quels sont vos horaires ?".into()], EmbedPurpose::Query).await.expect("embedded");

        assert_eq!(vectors, vec![vec![0.0; DEFAULT_DIMENSIONS]]);
        let request = f.vertex.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, PREDICT_PATH);
        assert_eq!(request.header("authorization"), Some("Bearer ya29.embed-token"));
        assert_eq!(
            request.body,
            json!({
                "instances": [{"content": "Quels sont vos horaires ?", "task_type": "RETRIEVAL_QUERY"}],
                "parameters": {"outputDimensionality": 768, "autoTruncate": true}
            })
        );
    }

    #[tokio::test]
    async fn documents_are_embedded_as_retrieval_documents_in_batches_of_250() {
        let f = fixture(FakeReply::Json(200, predictions(MAX_TEXTS)), HttpTimeouts::EMBED_DOCUMENTS.total).await;

        let vectors = f.embedder.embed(&texts(2 * MAX_TEXTS), EmbedPurpose::Document).await.expect("embedded");

        assert_eq!(vectors.len(), 2 * MAX_TEXTS);
        let requests = f.vertex.requests();
        assert_eq!(requests.len(), 2);
        for request in &requests {
            let instances = request.body["instances"].as_array().expect("instances");
            assert_eq!(instances.len(), MAX_TEXTS);
            assert!(instances.iter().all(|i| i["task_type"] == "RETRIEVAL_DOCUMENT"));
        }
        assert_eq!(requests[1].body["instances"][0]["content"], format!("passage {MAX_TEXTS}"));
    }

    #[tokio::test]
    async fn a_short_answer_is_refused_rather_than_misaligned() {
        let f = fixture(FakeReply::Json(200, predictions(1)), HttpTimeouts::EMBED_DOCUMENTS.total).await;

        let error = f.embedder.embed(&texts(2), EmbedPurpose::Document).await.expect_err("one missing");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("count_mismatch"));
    }

    #[tokio::test]
    async fn quota_exhaustion_is_retried_then_retryable() {
        let f = fixture(
            FakeReply::Json(
                429,
                json!({"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}),
            ),
            HttpTimeouts::EMBED_QUERY.total,
        )
        .await;

        let error = f.embedder.embed(&texts(1), EmbedPurpose::Query).await.expect_err("throttled");

        assert!(error.is_retryable());
        assert_eq!(error.service, SERVICE);
        assert_eq!(f.vertex.requests().len(), 3);
        assert_eq!(f.events.count(names::PROVIDER_CALL_RETRIED), 2);
    }

    #[tokio::test]
    async fn a_refused_argument_is_permanent() {
        let f = fixture(
            FakeReply::Json(400, json!({"error": {"code": 400, "message": "Invalid outputDimensionality", "status": "INVALID_ARGUMENT"}})),
            HttpTimeouts::EMBED_QUERY.total,
        )
        .await;

        let error = f.embedder.embed(&texts(1), EmbedPurpose::Query).await.expect_err("refused");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("INVALID_ARGUMENT"));
        assert_eq!(f.vertex.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_silent_vertex_times_out_as_retryable() {
        let f = fixture(FakeReply::Hang, Duration::from_millis(300)).await;

        let error = f.embedder.embed(&texts(1), EmbedPurpose::Query).await.expect_err("timeout");

        assert!(error.is_retryable());
        assert_eq!(error.code.as_deref(), Some("timeout"));
    }
}
