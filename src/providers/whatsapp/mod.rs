//! The WhatsApp senders behind the engine's `OutboundSender` port: Meta's Cloud API, and the
//! `sandbox` that accepts everything for development; where a sender finds a channel's API key.
//!
//! Adding a provider that speaks the Cloud API (360dialog) takes a sender that builds its URL and
//! its authentication header and hands the rest to [`cloud_api::send_text`].

pub(crate) mod cloud_api;
pub mod meta;
pub mod sandbox;

use engine::message::ChannelInfo;
use secrecy::SecretString;

pub use meta::MetaSender;
pub use sandbox::SandboxSender;

/// Where a sender finds the API key of the channel it sends from.
///
/// The send port only carries [`ChannelInfo`] (id, provider, phone number id), not the channel's
/// stored credentials, so a key per channel goes through this hook: an implementation that knows
/// the channels' keys (filled from the store when channels are resolved) returns the channel's own
/// and falls back to the global one. Until then [`GlobalApiKey`] serves every channel with
/// `WHATSAPP_API_KEY`.
pub trait CredentialSource: Send + Sync {
    /// The key to send from `channel`; `None` when there is none, which fails the send for good.
    fn api_key(&self, channel: &ChannelInfo) -> Option<SecretString>;
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

impl CredentialSource for GlobalApiKey {
    fn api_key(&self, _channel: &ChannelInfo) -> Option<SecretString> {
        self.0.clone()
    }
}
