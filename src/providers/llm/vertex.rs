//! Gemini on Vertex AI: `POST …/publishers/google/models/{model}:generateContent` with the
//! conversation as `contents` (roles `user` and `model`), the system messages as
//! `systemInstruction`, and `generationConfig`; the token counts come from `usageMetadata`.

use std::time::Duration;

use engine::{
    async_trait,
    ports::{ChatRole, Llm, LlmRequest, LlmResponse, PortError},
};
use serde::{Deserialize, Serialize};

use crate::providers::{
    retry::{AttemptError, Retries},
    vertex::VertexClient,
};

/// The service name in this client's errors.
pub const SERVICE: &str = "vertex";

/// Finish reasons that mean the answer was withheld: the same conversation meets them again.
const WITHHELD: &[&str] = &["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"];

pub struct VertexLlm {
    client: VertexClient,
    /// `VERTEX_AI_MODEL`: asked for when the request names no model.
    default_model: String,
    retries: Retries,
}

impl VertexLlm {
    pub fn new(client: VertexClient, default_model: String, retries: Retries) -> Self {
        Self { client, default_model, retries }
    }
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct GenerateRequest {
    contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
struct Part {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    /// Gemini's reasoning, when the model shares it: not part of the answer.
    #[serde(default, skip_serializing)]
    thought: bool,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: Option<u32>,
    #[serde(default)]
    candidates_token_count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

/// The request body: system messages joined into `systemInstruction`; the other messages in
/// order, consecutive messages of one role merged into one content (Gemini expects the turns to
/// alternate).
fn generate_request(request: &LlmRequest) -> GenerateRequest {
    let system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| m.role == ChatRole::System && !m.content.trim().is_empty())
        .map(|m| m.content.as_str())
        .collect();
    let mut contents: Vec<Content> = Vec::new();
    for message in request.messages.iter().filter(|m| m.role != ChatRole::System) {
        let role = if message.role == ChatRole::Assistant { "model" } else { "user" };
        let part = Part { text: Some(message.content.clone()), thought: false };
        match contents.last_mut() {
            Some(last) if last.role.as_deref() == Some(role) => last.parts.push(part),
            _ => contents.push(Content { role: Some(role.to_owned()), parts: vec![part] }),
        }
    }
    let config = GenerationConfig { temperature: request.temperature, max_output_tokens: request.max_tokens };
    GenerateRequest {
        contents,
        system_instruction: (!system.is_empty())
            .then(|| Content { role: None, parts: vec![Part { text: Some(system.join("\n\n")), thought: false }] }),
        generation_config: (config.temperature.is_some() || config.max_output_tokens.is_some()).then_some(config),
    }
}

#[async_trait]
impl Llm for VertexLlm {
    async fn complete(&self, request: &LlmRequest) -> Result<LlmResponse, PortError> {
        let model = request.model.as_deref().unwrap_or(&self.default_model);
        let url = self.client.model_url(SERVICE, model, "generateContent")?;
        let body = generate_request(request);
        let (url, body) = (&url, &body);
        // A completion can be asked again: the only cost of a retry is its tokens.
        self.retries
            .run(&|event| event.with("model", model), |timeout| async move {
                self.attempt(url, body, model, timeout).await.map_err(AttemptError::idempotent)
            })
            .await
    }
}

impl VertexLlm {
    async fn attempt(
        &self,
        url: &url::Url,
        body: &GenerateRequest,
        model: &str,
        timeout: Duration,
    ) -> Result<LlmResponse, PortError> {
        let answer: GenerateResponse = self.client.post(SERVICE, url, body, timeout).await?;
        if let Some(reason) = answer.prompt_feedback.and_then(|f| f.block_reason) {
            return Err(PortError::permanent(
                SERVICE,
                Some("content_filter".into()),
                format!("the question was blocked by Vertex AI's filters ({reason})"),
            ));
        }
        let Some(candidate) = answer.candidates.into_iter().next() else {
            return Err(PortError {
                code: Some("no_candidates".into()),
                ..PortError::unavailable(SERVICE, "the answer has no candidates")
            });
        };
        let text: String = candidate
            .content
            .unwrap_or_default()
            .parts
            .into_iter()
            .filter(|p| !p.thought)
            .filter_map(|p| p.text)
            .collect();
        if text.trim().is_empty() {
            let reason = candidate.finish_reason.unwrap_or_default();
            if WITHHELD.contains(&reason.as_str()) {
                return Err(PortError::permanent(
                    SERVICE,
                    Some("content_filter".into()),
                    format!("the answer was withheld by Vertex AI's filters ({reason})"),
                ));
            }
            return Err(PortError {
                code: Some("empty_answer".into()),
                ..PortError::unavailable(SERVICE, format!("the answer is empty (finish reason `{reason}`)"))
            });
        }
        Ok(LlmResponse {
            text,
            model: answer.model_version.filter(|m| !m.is_empty()).unwrap_or_else(|| model.to_owned()),
            prompt_tokens: answer.usage_metadata.as_ref().and_then(|u| u.prompt_token_count),
            completion_tokens: answer.usage_metadata.as_ref().and_then(|u| u.candidates_token_count),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use engine::{
        events::{MemoryEvents, names},
        ports::{ChatMessage, PortErrorKind},
    };
    use serde_json::{Value, json};

    use super::*;
    use crate::providers::{
        fake_http::{FakeReply, FakeServer},
        google_auth::tests::granted,
        http_client::HttpTimeouts,
        retry::RetryPolicy,
        vertex::tests::client,
    };

    const MODEL_PATH: &str = "/v1/projects/parley-test-project/locations/europe-west1/publishers/google/models/gemini-1.5-pro:generateContent";

    struct Fixture {
        vertex: FakeServer,
        oauth: FakeServer,
        events: MemoryEvents,
        llm: VertexLlm,
    }

    async fn fixture(replies: Vec<FakeReply>, budget: Duration) -> Fixture {
        let vertex = FakeServer::start_sequence(replies).await;
        let oauth = FakeServer::start(granted("ya29.vertex-token", 3600)).await;
        let events = MemoryEvents::new();
        let llm = VertexLlm::new(
            client(&vertex, &oauth, &events),
            "gemini-1.5-pro".into(),
            Retries::new(RetryPolicy::fast(budget), Arc::new(events.clone())),
        );
        Fixture { vertex, oauth, events, llm }
    }

    fn request() -> LlmRequest {
        LlmRequest {
            model: None,
            messages: vec![
                ChatMessage { role: ChatRole::System, content: "Tu es l'assistant de la boutique.".into() },
                ChatMessage { role: ChatRole::System, content: "Informations : ouvert de 9h à 18h.".into() },
                ChatMessage { role: ChatRole::User, content: "Bonjour".into() },
                ChatMessage { role: ChatRole::Assistant, content: "Bonjour ! Que puis-je faire ?".into() },
                ChatMessage { role: ChatRole::User, content: "Vos horaires ?".into() },
                ChatMessage { role: ChatRole::User, content: "Et le samedi ?".into() },
            ],
            temperature: Some(0.3),
            max_tokens: Some(512),
            knowledge: Vec::new(),
        }
    }

    fn answer(text: &str) -> Value {
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "safetyRatings": []
            }],
            "usageMetadata": {"promptTokenCount": 57, "candidatesTokenCount": 12, "totalTokenCount": 69},
            "modelVersion": "gemini-1.5-pro-002"
        })
    }

    async fn refused_with(reply: FakeReply) -> (PortError, Fixture) {
        let f = fixture(vec![reply], HttpTimeouts::LLM.total).await;
        let error = f.llm.complete(&request()).await.expect_err("refused");
        assert!(!format!("{error:?}").contains("ya29"), "the token never shows: {error:?}");
        (error, f)
    }

    #[tokio::test]
    async fn the_conversation_is_sent_as_gemini_contents_with_the_bearer_token() {
        let f = fixture(
            vec![FakeReply::Json(200, answer("Ouvert de 9h à 18h, et le samedi matin."))],
            HttpTimeouts::LLM.total,
        )
        .await;

        let response = f.llm.complete(&request()).await.expect("answered");

        assert_eq!(
            response,
            LlmResponse {
                text: "Ouvert de 9h à 18h, et le samedi matin.".into(),
                model: "gemini-1.5-pro-002".into(),
                prompt_tokens: Some(57),
                completion_tokens: Some(12),
            }
        );
        let sent = f.vertex.only_request();
        assert_eq!(sent.method, "POST");
        assert_eq!(sent.path, MODEL_PATH);
        assert_eq!(sent.header("authorization"), Some("Bearer ya29.vertex-token"));
        assert_eq!(
            sent.body,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Bonjour"}]},
                    {"role": "model", "parts": [{"text": "Bonjour ! Que puis-je faire ?"}]},
                    {"role": "user", "parts": [{"text": "Vos horaires ?"}, {"text": "Et le samedi ?"}]}
                ],
                "systemInstruction": {"parts": [{"text": "Tu es l'assistant de la boutique.\n\nInformations : ouvert de 9h à 18h."}]},
                "generationConfig": {"temperature": 0.3, "maxOutputTokens": 512}
            })
        );
        assert_eq!(f.oauth.requests().len(), 1);
    }

    #[tokio::test]
    async fn the_requested_model_is_used_and_absent_settings_are_left_out() {
        let f = fixture(
            vec![FakeReply::Json(200, json!({"candidates": [{"content": {"parts": [{"text": "Oui"}]}}]}))],
            HttpTimeouts::LLM.total,
        )
        .await;
        let mut req = request();
        req.model = Some("gemini-2.0-flash".into());
        req.temperature = None;
        req.max_tokens = None;
        req.messages.retain(|m| m.role != ChatRole::System);

        let response = f.llm.complete(&req).await.expect("answered");

        let sent = f.vertex.only_request();
        assert!(sent.path.ends_with("/models/gemini-2.0-flash:generateContent"), "{}", sent.path);
        assert!(sent.body.get("systemInstruction").is_none() && sent.body.get("generationConfig").is_none());
        assert_eq!(response.model, "gemini-2.0-flash");
        assert_eq!((response.prompt_tokens, response.completion_tokens), (None, None));
    }

    #[tokio::test]
    async fn thoughts_are_not_part_of_the_answer() {
        let f = fixture(
            vec![FakeReply::Json(
                200,
                json!({"candidates": [{"content": {"role": "model", "parts": [
                    {"text": "The user asks about hours...", "thought": true},
                    {"text": "De 9h à 18h."}
                ]}}]}),
            )],
            HttpTimeouts::LLM.total,
        )
        .await;

        assert_eq!(f.llm.complete(&request()).await.expect("answered").text, "De 9h à 18h.");
    }

    #[tokio::test]
    async fn quota_exhaustion_is_retried_then_retryable() {
        let (error, f) = refused_with(FakeReply::Json(
            429,
            json!({"error": {"code": 429, "message": "Quota exceeded for aiplatform.googleapis.com", "status": "RESOURCE_EXHAUSTED"}}),
        ))
        .await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("RESOURCE_EXHAUSTED"));
        assert_eq!(f.vertex.requests().len(), 3);
        let retried = f.events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 2);
        assert_eq!(retried[0].field("service"), Some(&json!("vertex")));
        assert_eq!(retried[0].field("model"), Some(&json!("gemini-1.5-pro")));
    }

    #[tokio::test]
    async fn an_unknown_model_is_permanent_and_asked_once() {
        let (error, f) = refused_with(FakeReply::Json(
            404,
            json!({"error": {"code": 404, "message": "Publisher Model `gemini-9` was not found", "status": "NOT_FOUND"}}),
        ))
        .await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("NOT_FOUND"));
        assert!(error.message.contains("was not found"), "{error}");
        assert_eq!(f.vertex.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_rejected_token_is_replaced_and_the_call_retried() {
        let f = fixture(
            vec![
                FakeReply::Json(401, json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}})),
                FakeReply::Json(200, answer("Bonjour")),
            ],
            HttpTimeouts::LLM.total,
        )
        .await;

        f.llm.complete(&request()).await.expect("answered with a new token");

        assert_eq!(f.oauth.requests().len(), 2, "the rejected token was replaced");
        assert_eq!(f.vertex.requests().len(), 2);
    }

    #[tokio::test]
    async fn a_blocked_question_or_a_withheld_answer_is_permanent() {
        for reply in [
            json!({"promptFeedback": {"blockReason": "SAFETY"}}),
            json!({"candidates": [{"content": {"parts": []}, "finishReason": "SAFETY"}]}),
        ] {
            let (error, f) = refused_with(FakeReply::Json(200, reply)).await;
            assert_eq!(error.kind, PortErrorKind::Permanent);
            assert_eq!(error.code.as_deref(), Some("content_filter"));
            assert_eq!(f.vertex.requests().len(), 1);
        }
    }

    #[tokio::test]
    async fn no_candidates_is_retryable() {
        let (error, _) = refused_with(FakeReply::Json(200, json!({"usageMetadata": {}}))).await;

        assert!(error.is_retryable());
        assert_eq!(error.code.as_deref(), Some("no_candidates"));
    }

    #[tokio::test]
    async fn a_token_endpoint_refusal_fails_the_call_for_good_without_calling_vertex() {
        let vertex = FakeServer::start(FakeReply::Json(200, answer("never"))).await;
        let oauth = FakeServer::start(FakeReply::Json(
            400,
            json!({"error": "invalid_grant", "error_description": "account disabled"}),
        ))
        .await;
        let events = MemoryEvents::new();
        let llm = VertexLlm::new(
            client(&vertex, &oauth, &events),
            "gemini-1.5-pro".into(),
            Retries::new(RetryPolicy::fast(HttpTimeouts::LLM.total), Arc::new(events.clone())),
        );

        let error = llm.complete(&request()).await.expect_err("no token");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.service, "google_oauth");
        assert!(vertex.requests().is_empty());
    }

    #[tokio::test]
    async fn a_silent_vertex_times_out_as_retryable() {
        let (error, f) = {
            let f = fixture(vec![FakeReply::Hang], Duration::from_millis(300)).await;
            (f.llm.complete(&request()).await.expect_err("timeout"), f)
        };

        assert!(error.is_retryable());
        assert_eq!(error.code.as_deref(), Some("timeout"));
        assert_eq!(f.vertex.requests().len(), 1);
    }
}
