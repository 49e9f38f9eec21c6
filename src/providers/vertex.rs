//! Vertex AI's REST surface shared by the Gemini chat and the text embeddings: the model URLs under
//! `{VERTEX_AI_BASE_URL}/v1/projects/{GCP_PROJECT_ID}/locations/{VERTEX_AI_LOCATION}/publishers/google/models/`,
//! the service account's bearer token on every call, and Google's error body classified.

use std::time::Duration;

use engine::{masking::mask_phones_in, ports::PortError};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use url::Url;

use super::{
    ProviderError,
    google_auth::TokenSource,
    http_client::{transport_error, truncate},
};

/// Calls Vertex AI models of one project and location. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VertexClient {
    http: reqwest::Client,
    /// `…/publishers/google/models`, to which `{model}:{method}` is appended.
    models_url: Url,
    tokens: TokenSource,
}

/// `{"error":{"code":429,"message":"…","status":"RESOURCE_EXHAUSTED"}}`.
#[derive(Deserialize)]
struct ErrorEnvelope {
    error: GoogleError,
}

#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

impl VertexClient {
    /// `base_url` is `VERTEX_AI_BASE_URL` (`https://{location}-aiplatform.googleapis.com` by
    /// default, or a proxy); the API version and the project's path are appended to it.
    pub fn new(
        http: reqwest::Client,
        base_url: &Url,
        project: &str,
        location: &str,
        tokens: TokenSource,
    ) -> Result<Self, ProviderError> {
        let mut models_url = base_url.clone();
        models_url
            .path_segments_mut()
            .map_err(|_| ProviderError::InvalidBaseUrl { setting: "VERTEX_AI_BASE_URL" })?
            .pop_if_empty()
            .extend(["v1", "projects", project, "locations", location, "publishers", "google", "models"]);
        Ok(Self { http, models_url, tokens })
    }

    /// `…/models/{model}:{method}`, the model escaped as one path segment.
    pub fn model_url(&self, service: &'static str, model: &str, method: &str) -> Result<Url, PortError> {
        if model.trim().is_empty() {
            return Err(PortError::permanent(service, Some("no_model".into()), "no model name"));
        }
        let mut url = self.models_url.clone();
        url.path_segments_mut()
            .map_err(|_| PortError::permanent(service, None, "VERTEX_AI_BASE_URL cannot take a path"))?
            .push(&format!("{model}:{method}"));
        Ok(url)
    }

    /// One call: POSTs `body` to `url` with the access token, and parses a 2xx answer as `T`.
    /// A 401 forgets the token, so that a retry fetches another (it may have been revoked early).
    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        service: &'static str,
        url: &Url,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<T, PortError> {
        let token = self.tokens.token().await?;
        let response = self
            .http
            .post(url.clone())
            .bearer_auth(token.expose_secret())
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport_error(service, e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| transport_error(service, e))?;
        if !(200..300).contains(&status) {
            if status == 401 {
                self.tokens.invalidate(&token);
            }
            return Err(google_error(service, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|_| PortError {
            // A proxy's page or a cut answer: another try may well succeed.
            code: Some("invalid_response".into()),
            ..PortError::unavailable(service, format!("HTTP {status}: the answer is not what Vertex AI sends"))
        })
    }
}

/// Throttling (429 `RESOURCE_EXHAUSTED`), server errors and an expired token (401, fetched again
/// on the retry) are retryable; any other refusal (unknown model, invalid argument, permission
/// denied on the project) would be refused again. The provider's text is kept short and masked.
pub(crate) fn google_error(service: &'static str, status: u16, body: &[u8]) -> PortError {
    let parsed = serde_json::from_slice::<ErrorEnvelope>(body).ok().map(|e| e.error);
    let text = match &parsed {
        Some(error) => error.message.clone().unwrap_or_default(),
        None => truncate(&String::from_utf8_lossy(body), 200),
    };
    let message =
        if text.trim().is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {}", text.trim()) };
    let message = truncate(&mask_phones_in(&message), 400);
    let code = parsed.and_then(|e| e.status).filter(|s| !s.is_empty()).unwrap_or_else(|| format!("http_{status}"));
    match status {
        401 | 408 | 429 | 500..=599 => PortError { code: Some(code), ..PortError::unavailable(service, message) },
        _ => PortError::permanent(service, Some(code), message),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use engine::{events::MemoryEvents, ports::PortErrorKind};
    use serde_json::json;

    use super::*;
    use crate::providers::{
        fake_http::FakeServer,
        google_auth::{self, DEFAULT_REFRESH_MARGIN},
        http_client::{self, HttpTimeouts},
    };

    /// A Vertex client for `project` in `europe-west1`, calling `vertex` with tokens from `oauth`.
    pub(crate) fn client(vertex: &FakeServer, oauth: &FakeServer, events: &MemoryEvents) -> VertexClient {
        VertexClient::new(
            http_client::build(HttpTimeouts::LLM).expect("client"),
            &vertex.url,
            "parley-test-project",
            "europe-west1",
            google_auth::tests::source_for(oauth, DEFAULT_REFRESH_MARGIN, events),
        )
        .expect("client")
    }

    #[test]
    fn model_urls_follow_the_project_and_location() {
        let account = crate::providers::google_auth::ServiceAccount::from_json(&google_auth::tests::key_file(
            "https://oauth2.googleapis.com/token",
        ))
        .expect("key");
        let tokens = TokenSource::new(
            account,
            http_client::build(HttpTimeouts::OAUTH).expect("client"),
            crate::providers::retry::Retries::new(
                crate::providers::retry::RetryPolicy::once(Duration::from_secs(1)),
                Arc::new(MemoryEvents::new()),
            ),
        );
        for base in ["https://europe-west1-aiplatform.googleapis.com", "https://proxy.example.com/vertex/"] {
            let client = VertexClient::new(
                http_client::build(HttpTimeouts::LLM).expect("client"),
                &Url::parse(base).expect("url"),
                "my-project",
                "europe-west1",
                tokens.clone(),
            )
            .expect("client");
            let url = client.model_url("vertex", "gemini-1.5-pro", "generateContent").expect("url");
            assert_eq!(
                url.as_str(),
                format!(
                    "{}/v1/projects/my-project/locations/europe-west1/publishers/google/models/gemini-1.5-pro:generateContent",
                    base.trim_end_matches('/')
                )
            );
        }
    }

    #[test]
    fn google_errors_are_classified_by_status() {
        let body = |status: &str| json!({"error": {"code": 0, "message": "m", "status": status}}).to_string();
        let cases = [
            (429, "RESOURCE_EXHAUSTED", PortErrorKind::Unavailable),
            (503, "UNAVAILABLE", PortErrorKind::Unavailable),
            (401, "UNAUTHENTICATED", PortErrorKind::Unavailable),
            (400, "INVALID_ARGUMENT", PortErrorKind::Permanent),
            (403, "PERMISSION_DENIED", PortErrorKind::Permanent),
            (404, "NOT_FOUND", PortErrorKind::Permanent),
        ];
        for (status, name, kind) in cases {
            let error = google_error("vertex", status, body(name).as_bytes());
            assert_eq!(error.kind, kind, "{status} {name}");
            assert_eq!(error.code.as_deref(), Some(name));
        }
        let page = google_error("vertex", 502, b"<html>Bad Gateway</html>");
        assert_eq!((page.kind, page.code.as_deref()), (PortErrorKind::Unavailable, Some("http_502")));
    }
}
