//! The OpenAI-compatible chat client: `POST {LLM_BASE_URL}/chat/completions`, which OpenAI, Azure
//! OpenAI's compatible endpoint, vLLM, Ollama, LiteLLM and most gateways serve.

use std::time::Duration;

use engine::{
    async_trait,
    masking::mask_phones_in,
    ports::{ChatMessage, Llm, LlmRequest, LlmResponse, PortError},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::providers::{
    ProviderError,
    http_client::{transport_error, truncate},
    retry::{AttemptError, Retries},
};

/// The service name in this client's errors.
pub const SERVICE: &str = "llm";

/// The longest provider text kept in an error message.
const MAX_PROVIDER_TEXT: usize = 400;

pub struct OpenAiLlm {
    client: reqwest::Client,
    /// `{LLM_BASE_URL}/chat/completions`, computed once.
    completions_url: Url,
    api_key: Option<SecretString>,
    /// `LLM_MODEL`: asked for when the request names no model.
    default_model: String,
    retries: Retries,
}

impl OpenAiLlm {
    /// `base_url` includes the API version path (`https://api.openai.com/v1`).
    pub fn new(
        client: reqwest::Client,
        base_url: &Url,
        api_key: Option<SecretString>,
        default_model: String,
        retries: Retries,
    ) -> Result<Self, ProviderError> {
        let mut completions_url = base_url.clone();
        completions_url
            .path_segments_mut()
            .map_err(|_| ProviderError::InvalidBaseUrl { setting: "LLM_BASE_URL" })?
            .pop_if_empty()
            .push("chat")
            .push("completions");
        // A key that is set but blank would send `Bearer ` and be refused: treat it as unset.
        let api_key = api_key.filter(|k| !k.expose_secret().trim().is_empty());
        Ok(Self { client, completions_url, api_key, default_model, retries })
    }
}

#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct CompletionResponse {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<AnswerMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct AnswerMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ApiError,
}

/// `{"error":{"message","type","code"}}`; `code` is a string, a number or null depending on the
/// server.
#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<Value>,
}

#[async_trait]
impl Llm for OpenAiLlm {
    async fn complete(&self, request: &LlmRequest) -> Result<LlmResponse, PortError> {
        let model = request.model.as_deref().unwrap_or(&self.default_model);
        let body = CompletionRequest {
            model,
            messages: &request.messages,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
        };
        // A completion can be asked again: the only cost of a retry is its tokens.
        let body = &body;
        self.retries
            .run(&|event| event.with("model", model), |timeout| async move {
                self.attempt(body, model, timeout).await.map_err(AttemptError::idempotent)
            })
            .await
    }
}

impl OpenAiLlm {
    async fn attempt(
        &self,
        body: &CompletionRequest<'_>,
        model: &str,
        timeout: Duration,
    ) -> Result<LlmResponse, PortError> {
        let mut call = self.client.post(self.completions_url.clone()).json(body).timeout(timeout);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let response = call.send().await.map_err(|e| transport_error(SERVICE, e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| transport_error(SERVICE, e))?;
        if !(200..300).contains(&status) {
            return Err(openai_error(SERVICE, status, &bytes, self.api_key.as_ref()));
        }

        let parsed: CompletionResponse = serde_json::from_slice(&bytes).map_err(|_| {
            // A gateway's HTML page or a cut answer: another try may well succeed.
            PortError {
                code: Some("invalid_response".into()),
                ..PortError::unavailable(SERVICE, "the answer is not a chat completion")
            }
        })?;
        let Some(choice) = parsed.choices.into_iter().next() else {
            // Seen from overloaded gateways; the job's retry with backoff is the right answer, and
            // a request that keeps getting none ends in the dead-letter stream anyway.
            return Err(PortError {
                code: Some("no_choices".into()),
                ..PortError::unavailable(SERVICE, "the answer has no choices")
            });
        };
        let text = choice.message.and_then(|m| m.content).unwrap_or_default();
        if text.trim().is_empty() {
            if choice.finish_reason.as_deref() == Some("content_filter") {
                // The same conversation meets the same filter: retrying only costs money.
                return Err(PortError::permanent(
                    SERVICE,
                    Some("content_filter".into()),
                    "the answer was withheld by the provider's content filter",
                ));
            }
            return Err(PortError {
                code: Some("empty_answer".into()),
                ..PortError::unavailable(SERVICE, "the answer is empty")
            });
        }
        Ok(LlmResponse {
            text,
            model: parsed.model.filter(|m| !m.is_empty()).unwrap_or_else(|| model.to_owned()),
            prompt_tokens: parsed.usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: parsed.usage.as_ref().and_then(|u| u.completion_tokens),
        })
    }
}

/// The error of an OpenAI-compatible server (chat or embeddings), classified: throttling,
/// timeouts and server errors are retried; any other refusal (bad model, bad key, request too
/// long) would be refused again. The message never holds the key or an unmasked phone number
/// (servers quote the prompt in some errors).
pub(crate) fn openai_error(
    service: &'static str,
    status: u16,
    body: &[u8],
    api_key: Option<&SecretString>,
) -> PortError {
    let parsed = serde_json::from_slice::<ErrorEnvelope>(body).ok().map(|e| e.error);
    let provider_code = parsed.as_ref().and_then(|e| match &e.code {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    });
    let text = match &parsed {
        Some(error) => {
            let mut text = error.message.clone().unwrap_or_default();
            if let Some(kind) = error.kind.as_deref().filter(|k| !k.is_empty()) {
                text.push_str(&format!(" [{kind}]"));
            }
            text
        }
        None => truncate(&String::from_utf8_lossy(body), 200),
    };
    let message =
        if text.trim().is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {}", text.trim()) };
    let message = match api_key {
        Some(key) => message.replace(key.expose_secret(), "[redacted]"),
        None => message,
    };
    let message = truncate(&mask_phones_in(&message), MAX_PROVIDER_TEXT);
    let code = Some(provider_code.unwrap_or_else(|| format!("http_{status}")));
    match status {
        408 | 409 | 429 | 500..=599 => PortError { code, ..PortError::unavailable(service, message) },
        _ => PortError::permanent(service, code, message),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;

    use engine::{
        events::{MemoryEvents, names},
        ports::{ChatRole, PortErrorKind},
    };
    use serde_json::json;

    use super::*;
    use crate::providers::{
        fake_http::{FakeReply, FakeServer},
        http_client::{self, HttpTimeouts},
        retry::RetryPolicy,
    };

    const KEY: &str = "sk-test-secret-key";

    fn llm_logging_to(
        server: &FakeServer,
        key: Option<&str>,
        timeouts: HttpTimeouts,
        events: &MemoryEvents,
    ) -> OpenAiLlm {
        OpenAiLlm::new(
            http_client::build(timeouts).expect("client"),
            &server.base("/v1"),
            key.map(SecretString::from),
            "gpt-4o-mini".into(),
            Retries::new(RetryPolicy::fast(timeouts.total), Arc::new(events.clone())),
        )
        .expect("base URL")
    }

    fn llm(server: &FakeServer, key: Option<&str>, timeouts: HttpTimeouts) -> OpenAiLlm {
        llm_logging_to(server, key, timeouts, &MemoryEvents::new())
    }

    fn request(model: Option<&str>) -> LlmRequest {
        LlmRequest {
            model: model.map(str::to_owned),
            messages: vec![
                ChatMessage { role: ChatRole::System, content: "Tu es l'assistant.".into() },
                ChatMessage { role: ChatRole::User, content: "Bonjour".into() },
                ChatMessage { role: ChatRole::Assistant, content: "Bonjour !".into() },
                ChatMessage { role: ChatRole::User, content: "Vos horaires ?".into() },
            ],
            temperature: Some(0.5),
            max_tokens: Some(256),
            knowledge: Vec::new(),
        }
    }

    fn completion(text: &str) -> Value {
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}
        })
    }

    async fn refused_with(answer: FakeReply) -> PortError {
        let server = FakeServer::start(answer).await;
        let error = llm(&server, Some(KEY), HttpTimeouts::LLM).complete(&request(None)).await.expect_err("refused");
        assert!(!format!("{error} {error:?}").contains(KEY), "key in the error: {error:?}");
        error
    }

    #[tokio::test]
    async fn chat_request_carries_the_model_the_conversation_and_the_bearer_key() {
        let server = FakeServer::start(FakeReply::Json(200, completion("Ouvert de 9h à 18h."))).await;

        let answer =
            llm(&server, Some(KEY), HttpTimeouts::LLM).complete(&request(Some("gpt-4o"))).await.expect("answered");

        let received = server.only_request();
        assert_eq!(received.method, "POST");
        assert_eq!(received.path, "/v1/chat/completions");
        assert_eq!(received.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(
            received.body,
            json!({
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "Tu es l'assistant."},
                    {"role": "user", "content": "Bonjour"},
                    {"role": "assistant", "content": "Bonjour !"},
                    {"role": "user", "content": "Vos horaires ?"}
                ],
                "temperature": 0.5,
                "max_tokens": 256
            })
        );
        assert_eq!(
            answer,
            LlmResponse {
                text: "Ouvert de 9h à 18h.".into(),
                model: "gpt-4o-mini-2024-07-18".into(),
                prompt_tokens: Some(42),
                completion_tokens: Some(7),
            }
        );
    }

    #[tokio::test]
    async fn without_a_model_or_key_the_configured_model_is_asked_anonymously() {
        let server = FakeServer::start(FakeReply::Json(
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": "Bonjour"}}]}),
        ))
        .await;
        let mut req = request(None);
        req.temperature = None;
        req.max_tokens = None;

        let answer = llm(&server, None, HttpTimeouts::LLM).complete(&req).await.expect("answered");

        let received = server.only_request();
        assert_eq!(received.header("authorization"), None);
        assert_eq!(received.body["model"], "gpt-4o-mini");
        assert!(received.body.get("temperature").is_none() && received.body.get("max_tokens").is_none());
        assert_eq!(answer.model, "gpt-4o-mini", "a server that names no model answered with the one asked");
        assert_eq!((answer.prompt_tokens, answer.completion_tokens), (None, None));
    }

    #[tokio::test]
    async fn server_error_is_retryable() {
        let error = refused_with(FakeReply::Json(
            500,
            json!({"error": {"message": "The server had an error", "type": "server_error", "code": null}}),
        ))
        .await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("http_500"));
    }

    #[tokio::test]
    async fn rate_limit_is_retryable() {
        let error = refused_with(FakeReply::Json(
            429,
            json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
        ))
        .await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("rate_limit_exceeded"));
    }

    #[tokio::test]
    async fn bad_request_is_permanent_with_the_servers_message() {
        let error = refused_with(FakeReply::Json(
            400,
            json!({"error": {
                "message": "The model `gpt-5-imaginary` does not exist",
                "type": "invalid_request_error",
                "code": "model_not_found"
            }}),
        ))
        .await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("model_not_found"));
        assert!(error.message.contains("does not exist"), "{error}");
    }

    #[tokio::test]
    async fn wrong_key_is_permanent_and_never_echoed() {
        let error = refused_with(FakeReply::Json(
            401,
            json!({"error": {"message": format!("Incorrect API key provided: {KEY}"), "type": "invalid_request_error", "code": "invalid_api_key"}}),
        ))
        .await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert!(error.message.contains("[redacted]"), "{error}");
    }

    #[tokio::test]
    async fn empty_choices_are_retried() {
        let error = refused_with(FakeReply::Json(200, json!({"choices": []}))).await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("no_choices"));
    }

    #[tokio::test]
    async fn filtered_answer_is_permanent() {
        let error = refused_with(FakeReply::Json(
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "content_filter"}]}),
        ))
        .await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("content_filter"));
    }

    #[tokio::test]
    async fn llm_that_never_answers_times_out_as_retryable() {
        let server = FakeServer::start(FakeReply::Hang).await;
        let timeouts = HttpTimeouts { connect: Duration::from_secs(1), total: Duration::from_millis(300) };

        let error = llm(&server, Some(KEY), timeouts).complete(&request(None)).await.expect_err("timed out");

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("timeout"));
        assert_eq!(server.requests().len(), 1, "no time was left for another attempt");
    }

    #[tokio::test]
    async fn overloaded_server_is_asked_again_and_the_retry_logged() {
        let server = FakeServer::start_sequence(vec![
            FakeReply::Json(503, json!({"error": {"message": "overloaded", "type": "server_error"}})),
            FakeReply::Json(200, completion("Bonjour !")),
        ])
        .await;
        let events = MemoryEvents::new();

        let answer = llm_logging_to(&server, Some(KEY), HttpTimeouts::LLM, &events)
            .complete(&request(None))
            .await
            .expect("answered on the second attempt");

        assert_eq!(answer.text, "Bonjour !");
        assert_eq!(server.requests().len(), 2);
        let retried = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].field("service"), Some(&json!("llm")));
        assert_eq!(retried[0].field("model"), Some(&json!("gpt-4o-mini")));
        assert_eq!(retried[0].field("code"), Some(&json!("http_503")));
    }

    #[tokio::test]
    async fn bad_request_is_asked_once() {
        let server = FakeServer::start(FakeReply::Json(400, json!({"error": {"message": "bad"}}))).await;
        let events = MemoryEvents::new();

        llm_logging_to(&server, Some(KEY), HttpTimeouts::LLM, &events).complete(&request(None)).await.expect_err("bad");

        assert_eq!(server.requests().len(), 1);
        assert!(events.all().is_empty());
    }
}
