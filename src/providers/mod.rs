//! The providers behind the engine's ports: the WhatsApp senders, the LLMs and the embedders, the
//! one HTTP client they share, and [`build`], which picks them from the settings.

pub mod embeddings;
#[cfg(test)]
mod fake_http;
pub mod http_client;
pub mod llm;
pub mod whatsapp;

use std::sync::Arc;

use engine::{
    events::EventSink,
    ports::{Embedder, Llm, OutboundSender},
};

use crate::settings::{EmbeddingProvider, LlmProvider, Settings, WhatsAppProvider};
use embeddings::HashEmbedder;
use http_client::{HttpClientError, HttpTimeouts};
use llm::{LocalLlm, OpenAiLlm};
use whatsapp::{GlobalApiKey, MetaSender, SandboxSender};

/// The adapters of the three provider ports, as the settings chose them. Cheap to clone.
#[derive(Clone)]
pub struct Providers {
    pub sender: Arc<dyn OutboundSender>,
    pub llm: Arc<dyn Llm>,
    pub embedder: Arc<dyn Embedder>,
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
    #[error("WHATSAPP_PROVIDER: `{0}` is not available in this version; choose sandbox or meta")]
    NotYetAvailable(&'static str),
    #[error(transparent)]
    HttpClient(#[from] HttpClientError),
}

/// Builds the sender, the LLM and the embedder that `WHATSAPP_PROVIDER`, `LLM_PROVIDER` and
/// `EMBEDDING_PROVIDER` name, from the settings' URLs and keys. `events` is where the sandbox
/// prints the replies it accepts.
///
/// Meta sends with `WHATSAPP_API_KEY` for every channel ([`GlobalApiKey`]); a key per channel
/// plugs in through [`whatsapp::CredentialSource`] and [`MetaSender::new`].
pub fn build(settings: &Settings, events: Arc<dyn EventSink>) -> Result<Providers, ProviderError> {
    let sender: Arc<dyn OutboundSender> = match settings.whatsapp_provider {
        WhatsAppProvider::Sandbox => Arc::new(SandboxSender::new(events)),
        WhatsAppProvider::Meta => {
            let key = settings.whatsapp_api_key.clone().ok_or(ProviderError::MissingSetting {
                setting: "WHATSAPP_API_KEY",
                provider: "WHATSAPP_PROVIDER=meta",
            })?;
            Arc::new(MetaSender::new(
                http_client::build(HttpTimeouts::WHATSAPP)?,
                settings.whatsapp_api_url.clone(),
                Arc::new(GlobalApiKey::new(Some(key))),
            ))
        }
        WhatsAppProvider::Dialog360 => return Err(ProviderError::NotYetAvailable("360dialog")),
    };

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
            )?)
        }
    };

    let embedder: Arc<dyn Embedder> = match settings.embedding_provider {
        EmbeddingProvider::Hash => Arc::new(HashEmbedder::default()),
    };

    Ok(Providers { sender, llm, embedder })
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

    #[test]
    fn dialog360_is_refused_until_its_sender_lands() {
        let error = build(
            &settings(&[
                ("WHATSAPP_PROVIDER", "360dialog"),
                ("WHATSAPP_API_KEY", "k"),
                ("WHATSAPP_WEBHOOK_TOKEN", "t"),
            ]),
            Arc::new(MemoryEvents::new()),
        )
        .expect_err("not yet");

        assert!(error.to_string().starts_with("WHATSAPP_PROVIDER: `360dialog`"), "{error}");
    }
}
