//! The WhatsApp senders behind the engine's `OutboundSender` port: Meta's Cloud API, 360dialog
//! (a proxy of it), and the `sandbox` that accepts everything for development; where a sender finds
//! a channel's API key; the inbound media those providers serve (`media`) and what the worker does
//! with it (`media_intake`).
//!
//! A provider that speaks the Cloud API names its URLs and the header its key goes in, and hands the
//! rest to `cloud_api::CloudApiClient`.

pub(crate) mod cloud_api;
pub mod dialog360;
pub mod media;
pub mod media_intake;
pub mod meta;
pub mod pacing;
pub mod sandbox;

use engine::{async_trait, message::ChannelInfo, ports::PortError};
use secrecy::SecretString;

pub use dialog360::Dialog360Sender;
pub use meta::MetaSender;
pub use sandbox::SandboxSender;

/// Where a sender finds the API key of the channel it sends from.
///
/// The send port only carries [`ChannelInfo`] (id, provider, phone number id), not the channel's
/// stored credentials, so a key per channel goes through this hook:
/// [`crate::providers::credentials::ChannelCredentialCache`] returns the channel's own key
/// (`channels.credentials.api_key`) and falls back to `WHATSAPP_API_KEY`; [`GlobalApiKey`] serves
/// every channel with `WHATSAPP_API_KEY`.
#[async_trait]
pub trait CredentialSource: Send + Sync {
    /// The key to send from `channel`; `Ok(None)` when there is none, which fails the send for
    /// good; an error when the stored credentials cannot be read now (retryable).
    async fn api_key(&self, channel: &ChannelInfo) -> Result<Option<SecretString>, PortError>;
}

/// One key for every channel: `WHATSAPP_API_KEY`.
#[derive(Clone)]
pub struct GlobalApiKey(Option<SecretString>);

impl GlobalApiKey {
    pub fn new(key: Option<SecretString>) -> Self {
        Self(key)
    }
}

impl std::fmt::Debug for GlobalApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("GlobalApiKey").field(&self.0.as_ref().map(|_| "[redacted]")).finish()
    }
}

#[async_trait]
impl CredentialSource for GlobalApiKey {
    async fn api_key(&self, _channel: &ChannelInfo) -> Result<Option<SecretString>, PortError> {
        Ok(self.0.clone())
    }
}
