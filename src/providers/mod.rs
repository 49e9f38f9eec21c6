//! The providers behind the engine's ports: the WhatsApp senders (Meta, 360dialog, sandbox), the
//! LLMs (OpenAI-compatible, Vertex AI, local) and the embedders (hash, OpenAI-compatible, Vertex
//! AI); what they share — the one HTTP client builder, the bounded retries, the channels' own
//! credentials, Google's service-account token; [`build_with`], which picks them from the settings,
//! and [`check_embedding_dimension`], the start-up check of the embedder against the database.

pub mod credentials;
pub mod embeddings;
#[cfg(test)]
mod fake_http;
pub mod google_auth;
pub mod http_client;
pub mod llm;
pub mod retry;
pub mod vertex;
pub mod whatsapp;

use std::sync::Arc;

use engine::{
    events::EventSink,
    ports::{Embedder, Llm, OutboundSender},
};

use crate::settings::{EmbeddingProvider, LlmProvider, Settings, WhatsAppProvider};
use credentials::{ChannelCredentialCache, ChannelCredentialLookup};
use embeddings::{HashEmbedder, OpenAiEmbedder, VertexEmbedder};
use google_auth::{ServiceAccount, ServiceAccountError, TokenSource};
use http_client::{HttpClientError, HttpTimeouts};
use llm::{LocalLlm, OpenAiLlm, VertexLlm};
use retry::{Retries, RetryPolicy};
use vertex::VertexClient;

pub use embeddings::check_embedding_dimension;
use whatsapp::{CredentialSource, Dialog360Sender, GlobalApiKey, MetaSender, SandboxSender};

/// The adapters of the three provider ports, as the settings chose them. Cheap to clone.
#[derive(Clone)]
pub struct Providers {
    pub sender: Arc<dyn OutboundSender>,
    pub llm: Arc<dyn Llm>,
    pub embedder: Arc<dyn Embedder>,
    /// The channels' own credentials, cached, when [`build_with`] was given where to read them:
    /// the sender's keys come from it, and the webhook checks 360dialog tokens with it.
    pub channel_credentials: Option<Arc<ChannelCredentialCache>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers").finish_non_exhaustive()
    }
}

/// The providers could not be built. Messages name the setting at fault, never its value.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{setting}: required with {provider}")]
    MissingSetting { setting: &'static str, provider: &'static str },
    #[error("{setting}: cannot be used as a base URL (it must be an http(s) URL with a host)")]
    InvalidBaseUrl { setting: &'static str },
    #[error(transparent)]
    ServiceAccount(#[from] ServiceAccountError),
    #[error(transparent)]
    HttpClient(#[from] HttpClientError),
}

/// [`build_with`] without per-channel credentials: every channel sends with `WHATSAPP_API_KEY`.
pub fn build(settings: &Settings, events: Arc<dyn EventSink>) -> Result<Providers, ProviderError> {
    build_with(settings, events, None)
}

/// Builds the sender, the LLM and the embedder that `WHATSAPP_PROVIDER`, `LLM_PROVIDER` and
/// `EMBEDDING_PROVIDER` name, from the settings' URLs and keys. `events` is where the sandbox
/// prints the replies it accepts and where every client logs its retried calls.
///
/// With `channels` (the store), a channel's own `api_key` replaces `WHATSAPP_API_KEY` for its
/// sends, and [`Providers::channel_credentials`] holds the cache for the webhook.
pub fn build_with(
    settings: &Settings,
    events: Arc<dyn EventSink>,
    channels: Option<Arc<dyn ChannelCredentialLookup>>,
) -> Result<Providers, ProviderError> {
    let channel_credentials =
        channels.map(|lookup| Arc::new(ChannelCredentialCache::new(lookup, settings.whatsapp_api_key.clone())));
    let credentials: Arc<dyn CredentialSource> = match &channel_credentials {
        Some(cache) => cache.clone(),
        None => Arc::new(GlobalApiKey::new(settings.whatsapp_api_key.clone())),
    };
    let send_retries = Retries::new(RetryPolicy::WHATSAPP, events.clone());

    let sender: Arc<dyn OutboundSender> = match settings.whatsapp_provider {
        WhatsAppProvider::Sandbox => Arc::new(SandboxSender::new(events.clone())),
        WhatsAppProvider::Meta => {
            require(settings.whatsapp_api_key.is_some(), "WHATSAPP_API_KEY", "WHATSAPP_PROVIDER=meta")?;
            Arc::new(MetaSender::new(
                http_client::build(HttpTimeouts::WHATSAPP)?,
                settings.whatsapp_api_url.clone(),
                credentials,
                send_retries,
            ))
        }
        WhatsAppProvider::Dialog360 => {
            require(settings.whatsapp_api_key.is_some(), "WHATSAPP_API_KEY", "WHATSAPP_PROVIDER=360dialog")?;
            Arc::new(Dialog360Sender::new(
                http_client::build(HttpTimeouts::WHATSAPP)?,
                &settings.whatsapp_api_url,
                credentials,
                send_retries,
            )?)
        }
    };

    let mut vertex = VertexSetup { settings, events: events.clone(), tokens: None };
    let llm: Arc<dyn Llm> = match settings.llm_provider {
        LlmProvider::Local => Arc::new(LocalLlm::new()),
        LlmProvider::OpenAi => {
            let base_url = settings
                .llm_base_url
                .as_ref()
                .ok_or(ProviderError::MissingSetting { setting: "LLM_BASE_URL", provider: "LLM_PROVIDER=openai" })?;
            let model = settings
                .llm_model
                .clone()
                .ok_or(ProviderError::MissingSetting { setting: "LLM_MODEL", provider: "LLM_PROVIDER=openai" })?;
            Arc::new(OpenAiLlm::new(
                http_client::build(HttpTimeouts::LLM)?,
                base_url,
                settings.llm_api_key.clone(),
                model,
                Retries::new(RetryPolicy::LLM, events.clone()),
            )?)
        }
        LlmProvider::Vertex => Arc::new(VertexLlm::new(
            vertex.client(HttpTimeouts::LLM, "LLM_PROVIDER=vertex")?,
            settings.vertex_ai_model.clone(),
            Retries::new(RetryPolicy::LLM, events.clone()),
        )),
    };

    let embedder: Arc<dyn Embedder> = match settings.embedding_provider {
        EmbeddingProvider::Hash => Arc::new(HashEmbedder::default()),
        EmbeddingProvider::OpenAi => {
            let provider = "EMBEDDING_PROVIDER=openai";
            let base_url = settings
                .embedding_base_url
                .as_ref()
                .ok_or(ProviderError::MissingSetting { setting: "EMBEDDING_BASE_URL", provider })?;
            let model = settings
                .embedding_model
                .clone()
                .ok_or(ProviderError::MissingSetting { setting: "EMBEDDING_MODEL", provider })?;
            Arc::new(OpenAiEmbedder::new(
                http_client::build(HttpTimeouts::EMBED_DOCUMENTS)?,
                base_url,
                settings.embedding_api_key.clone(),
                model,
                Retries::new(RetryPolicy::EMBED_DOCUMENTS, events.clone()),
            )?)
        }
        EmbeddingProvider::Vertex => Arc::new(VertexEmbedder::new(
            vertex.client(HttpTimeouts::EMBED_DOCUMENTS, "EMBEDDING_PROVIDER=vertex")?,
            settings.vertex_embedding_model.clone(),
            Retries::new(RetryPolicy::EMBED_DOCUMENTS, events.clone()),
        )),
    };

    Ok(Providers { sender, llm, embedder, channel_credentials })
}

/// The Vertex AI clients' shared part: one service account, one token for the chat and the
/// embeddings alike.
struct VertexSetup<'a> {
    settings: &'a Settings,
    events: Arc<dyn EventSink>,
    tokens: Option<TokenSource>,
}

impl VertexSetup<'_> {
    /// A client with its own connection pool and timeouts, sharing the token source.
    fn client(&mut self, timeouts: HttpTimeouts, provider: &'static str) -> Result<VertexClient, ProviderError> {
        let settings = self.settings;
        let project = settings
            .gcp_project_id
            .as_deref()
            .ok_or(ProviderError::MissingSetting { setting: "GCP_PROJECT_ID", provider })?;
        let tokens = match &self.tokens {
            Some(tokens) => tokens.clone(),
            None => {
                let key_file = settings
                    .google_application_credentials
                    .as_deref()
                    .ok_or(ProviderError::MissingSetting { setting: "GOOGLE_APPLICATION_CREDENTIALS", provider })?;
                let tokens = TokenSource::new(
                    ServiceAccount::from_file(key_file)?,
                    http_client::build(HttpTimeouts::OAUTH)?,
                    Retries::new(RetryPolicy::OAUTH, self.events.clone()),
                );
                self.tokens.insert(tokens).clone()
            }
        };
        VertexClient::new(
            http_client::build(timeouts)?,
            &settings.vertex_ai_base_url,
            project,
            &settings.vertex_ai_location,
            tokens,
        )
    }
}

fn require(set: bool, setting: &'static str, provider: &'static str) -> Result<(), ProviderError> {
    if set { Ok(()) } else { Err(ProviderError::MissingSetting { setting, provider }) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use engine::{
        events::MemoryEvents,
        ids::{ChannelId, PhoneNumber, ProviderMessageId},
        message::ChannelInfo,
        ports::{ChatMessage, ChatRole, EmbedPurpose, LlmRequest, OutboundText},
    };
    use serde_json::json;

    use super::*;
    use crate::providers::fake_http::{FakeReply, FakeServer};

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let vars: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_vars(vars).expect("valid settings")
    }

    fn reply() -> OutboundText {
        OutboundText {
            channel: ChannelInfo {
                id: ChannelId::new("channel-1"),
                provider: "meta".into(),
                phone_number_id: "PNID".into(),
            },
            to: PhoneNumber::new("33612345678"),
            text: "Bonjour !".into(),
            reply_to: Some(ProviderMessageId::new("wamid.IN")),
        }
    }

    fn question() -> LlmRequest {
        LlmRequest {
            model: None,
            messages: vec![ChatMessage { role: ChatRole::User, content: "Bonjour".into() }],
            temperature: None,
            max_tokens: None,
            knowledge: Vec::new(),
        }
    }

    #[tokio::test]
    async fn development_defaults_run_without_any_outside_service() {
        let events = MemoryEvents::new();
        let providers = build(&settings(&[]), Arc::new(events.clone())).expect("providers");

        let sent = providers.sender.send_text(&reply()).await.expect("sandbox accepts");
        let answer = providers.llm.complete(&question()).await.expect("local answers");
        let vectors = providers.embedder.embed(&["Bonjour".into()], EmbedPurpose::Query).await.expect("hash embeds");

        assert!(sent.as_str().starts_with(whatsapp::sandbox::SANDBOX_ID_PREFIX));
        assert_eq!(events.count(whatsapp::sandbox::SANDBOX_REPLY), 1);
        assert_eq!(answer.text, llm::local::GREETING);
        assert_eq!(providers.embedder.dimensions(), 768);
        assert_eq!(vectors[0].len(), 768);
    }

    #[tokio::test]
    async fn meta_and_openai_are_called_at_the_configured_urls() {
        let meta = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]}))).await;
        let openai = FakeServer::start(FakeReply::Json(
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": "Bonjour !"}}]}),
        ))
        .await;
        let meta_url = meta.base("/v21.0").to_string();
        let openai_url = openai.base("/v1").to_string();
        let providers = build(
            &settings(&[
                ("WHATSAPP_PROVIDER", "meta"),
                ("WHATSAPP_API_URL", &meta_url),
                ("WHATSAPP_API_KEY", "global-key"),
                ("LLM_PROVIDER", "openai"),
                ("LLM_BASE_URL", &openai_url),
                ("LLM_API_KEY", "llm-key"),
                ("LLM_MODEL", "my-model"),
            ]),
            Arc::new(MemoryEvents::new()),
        )
        .expect("providers");

        let sent = providers.sender.send_text(&reply()).await.expect("sent");
        let answer = providers.llm.complete(&question()).await.expect("answered");

        assert_eq!(sent.as_str(), "wamid.OUT");
        let to_meta = meta.only_request();
        assert_eq!(to_meta.path, "/v21.0/PNID/messages");
        assert_eq!(to_meta.header("authorization"), Some("Bearer global-key"));
        assert_eq!(answer.text, "Bonjour !");
        let to_llm = openai.only_request();
        assert_eq!(to_llm.path, "/v1/chat/completions");
        assert_eq!(to_llm.header("authorization"), Some("Bearer llm-key"));
        assert_eq!(to_llm.body["model"], "my-model");
    }

    #[tokio::test]
    async fn dialog360_sends_to_its_messages_endpoint_with_the_d360_key() {
        let d360 = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.D360"}]}))).await;
        let url = d360.url.to_string();
        let providers = build(
            &settings(&[
                ("WHATSAPP_PROVIDER", "360dialog"),
                ("WHATSAPP_API_URL", &url),
                ("WHATSAPP_API_KEY", "d360-key"),
                ("WHATSAPP_WEBHOOK_TOKEN", "t"),
            ]),
            Arc::new(MemoryEvents::new()),
        )
        .expect("providers");

        let sent = providers.sender.send_text(&reply()).await.expect("sent");

        assert_eq!(sent.as_str(), "wamid.D360");
        let request = d360.only_request();
        assert_eq!(request.path, "/messages");
        assert_eq!(request.header("d360-api-key"), Some("d360-key"));
    }

    #[tokio::test]
    async fn a_channel_with_its_own_key_sends_with_it() {
        let meta = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]}))).await;
        let url = meta.base("/v21.0").to_string();
        let channels = credentials::tests::FakeChannels::with(&[("PNID", Some("channel-key"), None)]);
        let providers = build_with(
            &settings(&[("WHATSAPP_PROVIDER", "meta"), ("WHATSAPP_API_URL", &url), ("WHATSAPP_API_KEY", "global-key")]),
            Arc::new(MemoryEvents::new()),
            Some(channels),
        )
        .expect("providers");

        providers.sender.send_text(&reply()).await.expect("sent");

        assert_eq!(meta.only_request().header("authorization"), Some("Bearer channel-key"));
        assert!(providers.channel_credentials.is_some(), "the webhook checks tokens with the same cache");
    }

    #[tokio::test]
    async fn vertex_chat_and_embeddings_share_one_service_account_token() {
        let oauth = FakeServer::start(google_auth::tests::granted("ya29.shared", 3600)).await;
        let vertex = FakeServer::start(FakeReply::Json(
            200,
            json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": "Bonjour !"}]}}],
                "predictions": [{"embeddings": {"values": vec![0.1; 768]}}]
            }),
        ))
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let key_path = dir.path().join("service-account.json");
        std::fs::write(&key_path, google_auth::tests::key_file(oauth.base("/token").as_str())).expect("key file");
        let (vertex_url, key_path) = (vertex.url.to_string(), key_path.display().to_string());
        let providers = build(
            &settings(&[
                ("LLM_PROVIDER", "vertex"),
                ("EMBEDDING_PROVIDER", "vertex"),
                ("GCP_PROJECT_ID", "my-project"),
                ("GOOGLE_APPLICATION_CREDENTIALS", &key_path),
                ("VERTEX_AI_LOCATION", "europe-west1"),
                ("VERTEX_AI_BASE_URL", &vertex_url),
            ]),
            Arc::new(MemoryEvents::new()),
        )
        .expect("providers");

        let answer = providers.llm.complete(&question()).await.expect("answered");
        let vectors = providers.embedder.embed(&["Bonjour".into()], EmbedPurpose::Query).await.expect("embedded");

        assert_eq!(answer.text, "Bonjour !");
        assert_eq!(vectors[0].len(), 768);
        let paths: Vec<String> = vertex.requests().into_iter().map(|r| r.path).collect();
        let models = "/v1/projects/my-project/locations/europe-west1/publishers/google/models";
        assert_eq!(
            paths,
            [format!("{models}/gemini-1.5-pro:generateContent"), format!("{models}/text-embedding-004:predict")]
        );
        assert_eq!(oauth.requests().len(), 1, "one token for both");
    }

    #[tokio::test]
    async fn openai_embeddings_are_called_at_the_configured_url_with_the_configured_model() {
        let server =
            FakeServer::start(FakeReply::Json(200, json!({"data": [{"index": 0, "embedding": vec![0.2; 768]}]}))).await;
        let url = server.base("/v1").to_string();
        let providers = build(
            &settings(&[
                ("EMBEDDING_PROVIDER", "openai"),
                ("EMBEDDING_BASE_URL", &url),
                ("EMBEDDING_API_KEY", "emb-key"),
                ("EMBEDDING_MODEL", "text-embedding-3-small"),
            ]),
            Arc::new(MemoryEvents::new()),
        )
        .expect("providers");

        let vectors = providers.embedder.embed(&["Bonjour".into()], EmbedPurpose::Document).await.expect("embedded");

        assert_eq!(vectors.len(), 1);
        let request = server.only_request();
        assert_eq!(request.path, "/v1/embeddings");
        assert_eq!(request.header("authorization"), Some("Bearer emb-key"));
        assert_eq!(request.body["model"], "text-embedding-3-small");
        assert_eq!(request.body["dimensions"], 768);
    }

    #[test]
    fn a_broken_service_account_file_stops_start_up_with_its_path_and_no_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key_path = dir.path().join("broken.json");
        std::fs::write(&key_path, r#"{"type": "service_account", "client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"}"#)
            .expect("file");
        let key_path = key_path.display().to_string();

        let error = build(
            &settings(&[
                ("LLM_PROVIDER", "vertex"),
                ("GCP_PROJECT_ID", "p"),
                ("GOOGLE_APPLICATION_CREDENTIALS", &key_path),
            ]),
            Arc::new(MemoryEvents::new()),
        )
        .expect_err("unusable key");

        let text = error.to_string();
        assert!(text.starts_with("GOOGLE_APPLICATION_CREDENTIALS: `"), "{text}");
        assert!(text.contains("broken.json") && text.contains("`private_key`"), "{text}");
        assert!(!text.contains("nope"), "{text}");
    }
}
