//! OpenAI-compatible embeddings: `POST {EMBEDDING_BASE_URL}/embeddings` with `EMBEDDING_MODEL`,
//! asking for [`DEFAULT_DIMENSIONS`] dimensions (OpenAI's `text-embedding-3-*` shorten their
//! vectors on request; a server that ignores the request and answers another length is refused
//! with a clear error rather than stored).

use std::time::Duration;

use engine::{
    async_trait,
    embedding::DEFAULT_DIMENSIONS,
    ports::{EmbedPurpose, Embedder, PortError},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use super::batches;
use crate::providers::{
    ProviderError,
    http_client::transport_error,
    llm::openai::openai_error,
    retry::{AttemptError, Retries, RetryPolicy},
};

/// The service name in this client's errors.
pub const SERVICE: &str = "openai_embeddings";

/// Inputs per request: OpenAI takes up to 2048; smaller requests fail and retry more cheaply.
const MAX_TEXTS: usize = 256;
/// Characters per request, well under OpenAI's 300,000 tokens per request.
const MAX_CHARS: usize = 400_000;

pub struct OpenAiEmbedder {
    client: reqwest::Client,
    /// `{EMBEDDING_BASE_URL}/embeddings`, computed once.
    embeddings_url: Url,
    api_key: Option<SecretString>,
    model: String,
    /// One budget for a question (a user waits), another for document batches.
    query_retries: Retries,
    document_retries: Retries,
}

#[derive(Serialize)]
struct EmbeddingRequest<'a> {
    model: &'a str,
    input: &'a [String],
    dimensions: usize,
    encoding_format: &'static str,
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    #[serde(default)]
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

impl OpenAiEmbedder {
    /// `base_url` includes the API version path (`https://api.openai.com/v1`). `retries` logs
    /// retried calls; its policy is replaced by [`RetryPolicy::EMBED_QUERY`] for questions and
    /// [`RetryPolicy::EMBED_DOCUMENTS`] for documents.
    pub fn new(
        client: reqwest::Client,
        base_url: &Url,
        api_key: Option<SecretString>,
        model: String,
        retries: Retries,
    ) -> Result<Self, ProviderError> {
        let mut embeddings_url = base_url.clone();
        embeddings_url
            .path_segments_mut()
            .map_err(|_| ProviderError::InvalidBaseUrl { setting: "EMBEDDING_BASE_URL" })?
            .pop_if_empty()
            .push("embeddings");
        Ok(Self {
            client,
            embeddings_url,
            // A key that is set but blank would send `Bearer ` and be refused: treat it as unset.
            api_key: api_key.filter(|k| !k.expose_secret().trim().is_empty()),
            model,
            query_retries: retries.with_policy(RetryPolicy::EMBED_QUERY),
            document_retries: retries.with_policy(RetryPolicy::EMBED_DOCUMENTS),
        })
    }

    /// Replaces both budgets (tests use short ones).
    pub fn with_retries(mut self, query: Retries, documents: Retries) -> Self {
        self.query_retries = query;
        self.document_retries = documents;
        self
    }

    async fn attempt(&self, texts: &[String], timeout: Duration) -> Result<Vec<Vec<f32>>, PortError> {
        let body = EmbeddingRequest {
            model: &self.model,
            input: texts,
            dimensions: DEFAULT_DIMENSIONS,
            encoding_format: "float",
        };
        let mut call = self.client.post(self.embeddings_url.clone()).json(&body).timeout(timeout);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let response = call.send().await.map_err(|e| transport_error(SERVICE, e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| transport_error(SERVICE, e))?;
        if !(200..300).contains(&status) {
            return Err(openai_error(SERVICE, status, &bytes, self.api_key.as_ref()));
        }
        let mut parsed: EmbeddingResponse = serde_json::from_slice(&bytes).map_err(|_| PortError {
            code: Some("invalid_response".into()),
            ..PortError::unavailable(SERVICE, "the answer is not an embedding list")
        })?;
        // The order of `data` is the order of `index`, which servers are not bound to follow.
        parsed.data.sort_by_key(|item| item.index.unwrap_or(usize::MAX));
        let vectors: Vec<Vec<f32>> = parsed.data.into_iter().map(|item| item.embedding).collect();
        check_vectors(SERVICE, &self.model, texts.len(), &vectors)?;
        Ok(vectors)
    }
}

/// One vector per text, each of [`DEFAULT_DIMENSIONS`] values: anything else would be stored
/// wrong or refused by the database, and is the same on every retry.
pub(crate) fn check_vectors(
    service: &'static str,
    model: &str,
    expected: usize,
    vectors: &[Vec<f32>],
) -> Result<(), PortError> {
    if vectors.len() != expected {
        return Err(PortError::permanent(
            service,
            Some("count_mismatch".into()),
            format!("asked for {expected} embeddings, got {}", vectors.len()),
        ));
    }
    if let Some(wrong) = vectors.iter().find(|v| v.len() != DEFAULT_DIMENSIONS) {
        return Err(PortError::permanent(
            service,
            Some("dimension_mismatch".into()),
            format!(
                "model `{model}` answered {}-dimensional vectors, {DEFAULT_DIMENSIONS} are needed: choose a model that \
                 supports {DEFAULT_DIMENSIONS} dimensions",
                wrong.len()
            ),
        ));
    }
    Ok(())
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn dimensions(&self) -> usize {
        DEFAULT_DIMENSIONS
    }

    async fn embed(&self, texts: &[String], purpose: EmbedPurpose) -> Result<Vec<Vec<f32>>, PortError> {
        let retries = match purpose {
            EmbedPurpose::Query => &self.query_retries,
            EmbedPurpose::Document => &self.document_retries,
        };
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in batches(texts, MAX_TEXTS, MAX_CHARS) {
            let describe = |event: engine::events::Event| event.with("model", &self.model).with("texts", batch.len());
            // Embedding the same texts again is harmless: retried on any retryable error.
            let embedded = retries
                .run(&describe, |timeout| async move {
                    self.attempt(batch, timeout).await.map_err(AttemptError::idempotent)
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
        http_client::{self, HttpTimeouts},
    };

    const KEY: &str = "sk-embeddings-test-key";

    fn embedder(server: &FakeServer, key: Option<&str>, events: &MemoryEvents, budget: Duration) -> OpenAiEmbedder {
        let retries = Retries::new(RetryPolicy::fast(budget), Arc::new(events.clone()));
        OpenAiEmbedder::new(
            http_client::build(HttpTimeouts::EMBED_DOCUMENTS).expect("client"),
            &server.base("/v1"),
            key.map(SecretString::from),
            "text-embedding-3-small".into(),
            retries.clone(),
        )
        .expect("base URL")
        .with_retries(retries.clone(), retries)
    }

    fn vector(seed: f32) -> Vec<f32> {
        (0..DEFAULT_DIMENSIONS).map(|i| seed + i as f32 / 1000.0).collect()
    }

    fn answer(vectors: &[(usize, Vec<f32>)]) -> Value {
        json!({
            "object": "list",
            "data": vectors.iter().map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v})).collect::<Vec<_>>(),
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8}
        })
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("passage {i}")).collect()
    }

    #[tokio::test]
    async fn texts_are_embedded_in_768_dimensions_with_the_model_and_key() {
        // Answered out of order: the index puts them back.
        let server = FakeServer::start(FakeReply::Json(200, answer(&[(1, vector(1.0)), (0, vector(0.0))]))).await;

        let vectors = embedder(&server, Some(KEY), &MemoryEvents::new(), HttpTimeouts::EMBED_DOCUMENTS.total)
            .embed(&texts(2), EmbedPurpose::Document)
            .await
            .expect("embedded");

        assert_eq!(vectors, vec![vector(0.0), vector(1.0)]);
        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v1/embeddings");
        assert_eq!(request.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(
            request.body,
            json!({
                "model": "text-embedding-3-small",
                "input": ["passage 0", "passage 1"],
                "dimensions": 768,
                "encoding_format": "float"
            })
        );
    }

    #[tokio::test]
    async fn many_texts_are_sent_in_batches() {
        let server = FakeServer::start(FakeReply::Json(
            200,
            answer(&(0..MAX_TEXTS).map(|i| (i, vector(0.0))).collect::<Vec<_>>()),
        ))
        .await;

        let error = embedder(&server, None, &MemoryEvents::new(), HttpTimeouts::EMBED_DOCUMENTS.total)
            .embed(&texts(MAX_TEXTS + 1), EmbedPurpose::Document)
            .await
            .expect_err("the fake answers 256 vectors to the second batch of one");

        let requests = server.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].body["input"].as_array().map(Vec::len), Some(MAX_TEXTS));
        assert_eq!(requests[1].body["input"], json!([format!("passage {MAX_TEXTS}")]));
        assert_eq!(requests[0].header("authorization"), None, "no key, no header");
        assert_eq!(error.code.as_deref(), Some("count_mismatch"));
        assert_eq!(error.kind, PortErrorKind::Permanent);
    }

    #[tokio::test]
    async fn nothing_to_embed_calls_nobody() {
        let server = FakeServer::start(FakeReply::Json(500, json!({}))).await;

        let vectors = embedder(&server, None, &MemoryEvents::new(), HttpTimeouts::EMBED_QUERY.total)
            .embed(&[], EmbedPurpose::Query)
            .await
            .expect("nothing");

        assert!(vectors.is_empty());
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn a_model_that_ignores_the_dimensions_is_refused_clearly() {
        let server = FakeServer::start(FakeReply::Json(200, answer(&[(0, vec![0.5; 1536])]))).await;

        let error = embedder(&server, Some(KEY), &MemoryEvents::new(), HttpTimeouts::EMBED_QUERY.total)
            .embed(&texts(1), EmbedPurpose::Query)
            .await
            .expect_err("1536 is not 768");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("dimension_mismatch"));
        assert!(error.message.contains("1536-dimensional"), "{error}");
    }

    #[tokio::test]
    async fn throttling_is_retried_and_logged() {
        let server = FakeServer::start_sequence(vec![
            FakeReply::Json(429, json!({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}})),
            FakeReply::Json(200, answer(&[(0, vector(0.0))])),
        ])
        .await;
        let events = MemoryEvents::new();

        let vectors = embedder(&server, Some(KEY), &events, HttpTimeouts::EMBED_QUERY.total)
            .embed(&texts(1), EmbedPurpose::Query)
            .await
            .expect("second attempt");

        assert_eq!(vectors.len(), 1);
        let retried = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].field("service"), Some(&json!(SERVICE)));
        assert_eq!(retried[0].field("code"), Some(&json!("rate_limit_exceeded")));
    }

    #[tokio::test]
    async fn a_wrong_key_is_permanent_and_never_echoed() {
        let server = FakeServer::start(FakeReply::Json(
            401,
            json!({"error": {"message": format!("Incorrect API key provided: {KEY}"), "code": "invalid_api_key"}}),
        ))
        .await;

        let error = embedder(&server, Some(KEY), &MemoryEvents::new(), HttpTimeouts::EMBED_QUERY.total)
            .embed(&texts(1), EmbedPurpose::Query)
            .await
            .expect_err("refused");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(server.requests().len(), 1);
        assert!(!format!("{error:?}").contains(KEY), "{error:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_as_retryable() {
        let server = FakeServer::start(FakeReply::Hang).await;

        let error = embedder(&server, None, &MemoryEvents::new(), Duration::from_millis(300))
            .embed(&texts(1), EmbedPurpose::Query)
            .await
            .expect_err("timeout");

        assert!(error.is_retryable());
        assert_eq!(error.code.as_deref(), Some("timeout"));
    }
}
