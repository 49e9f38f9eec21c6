//! The provider secrets a channel overrides (`channels.credentials`: `api_key`, `webhook_token`),
//! read through [`ChannelCredentialLookup`] and kept in a short-lived cache
//! ([`ChannelCredentialCache`]) shared by the senders (the key to send with) and the webhook (the
//! token a 360dialog notification must carry).
//!
//! The cache keeps a channel's credentials for a minute, so that a rotated key takes effect
//! within a minute without a restart, and keeps serving the last known credentials while the
//! store cannot be read (PostgreSQL down), so that known channels keep working. Numbers that no
//! channel owns are not cached: unauthenticated callers cannot fill memory with made-up numbers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use engine::{
    async_trait,
    message::ChannelInfo,
    ports::{PortError, PortErrorKind},
};
use secrecy::SecretString;

use super::whatsapp::CredentialSource;
use crate::store::{ChannelCredentials, PgStore};

/// Where the credentials of a channel are stored.
#[async_trait]
pub trait ChannelCredentialLookup: Send + Sync {
    /// The credentials of the channel of `phone_number_id`; `Ok(None)` for a number no channel
    /// has. The error text names the failure, never a secret.
    async fn channel_credentials(&self, phone_number_id: &str) -> Result<Option<ChannelCredentials>, String>;
}

#[async_trait]
impl ChannelCredentialLookup for PgStore {
    async fn channel_credentials(&self, phone_number_id: &str) -> Result<Option<ChannelCredentials>, String> {
        self.resolve_channel(phone_number_id)
            .await
            .map(|found| found.map(|context| context.credentials))
            .map_err(|e| e.to_string())
    }
}

/// The service name in errors about reading credentials.
pub const SERVICE: &str = "channel_credentials";

/// How long a channel's credentials are used before they are read again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// Channel credentials, cached; falls back to `WHATSAPP_API_KEY` for a channel without its own key.
pub struct ChannelCredentialCache {
    lookup: Arc<dyn ChannelCredentialLookup>,
    global_api_key: Option<SecretString>,
    ttl: Duration,
    entries: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    read_at: Instant,
    credentials: ChannelCredentials,
}

impl std::fmt::Debug for ChannelCredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelCredentialCache").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl ChannelCredentialCache {
    pub fn new(lookup: Arc<dyn ChannelCredentialLookup>, global_api_key: Option<SecretString>) -> Self {
        Self { lookup, global_api_key, ttl: DEFAULT_TTL, entries: Mutex::new(HashMap::new()) }
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The credentials of the channel of `phone_number_id` (`None`: no channel has it, or the
    /// body named none), from the cache when fresh; the last known ones when the store fails.
    pub async fn credentials(&self, phone_number_id: &str) -> Result<Option<ChannelCredentials>, String> {
        if phone_number_id.is_empty() {
            return Ok(None);
        }
        let stale = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(phone_number_id) {
                Some(entry) if entry.read_at.elapsed() < self.ttl => return Ok(Some(entry.credentials.clone())),
                Some(entry) => Some(entry.credentials.clone()),
                None => None,
            }
        };
        match self.lookup.channel_credentials(phone_number_id).await {
            Ok(found) => {
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                match &found {
                    Some(credentials) => {
                        entries.insert(
                            phone_number_id.to_owned(),
                            Cached { read_at: Instant::now(), credentials: credentials.clone() },
                        );
                    }
                    None => {
                        entries.remove(phone_number_id);
                    }
                }
                Ok(found)
            }
            Err(error) => match stale {
                Some(credentials) => {
                    tracing::warn!(%error, "channel credentials cannot be read; using the last known ones");
                    Ok(Some(credentials))
                }
                None => Err(error),
            },
        }
    }

    /// The channel's own webhook token, when it has one (`channels.credentials.webhook_token`).
    pub async fn webhook_token(&self, phone_number_id: &str) -> Result<Option<SecretString>, String> {
        Ok(self.credentials(phone_number_id).await?.and_then(|c| c.webhook_token))
    }
}

#[async_trait]
impl CredentialSource for ChannelCredentialCache {
    async fn api_key(&self, channel: &ChannelInfo) -> Result<Option<SecretString>, PortError> {
        let own = self.credentials(&channel.phone_number_id).await.map_err(|error| PortError {
            service: SERVICE,
            kind: PortErrorKind::Unavailable,
            code: Some("credentials_unavailable".into()),
            message: format!("the channel's credentials cannot be read: {error}"),
        })?;
        Ok(own.and_then(|c| c.api_key).or_else(|| self.global_api_key.clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use engine::ids::ChannelId;
    use secrecy::ExposeSecret;

    use super::*;

    /// Channels in memory, with a switch that makes the store fail and a count of the reads.
    #[derive(Default)]
    pub(crate) struct FakeChannels {
        pub channels: Mutex<HashMap<String, ChannelCredentials>>,
        pub down: AtomicBool,
        pub reads: AtomicUsize,
    }

    impl FakeChannels {
        pub(crate) fn with(channels: &[(&str, Option<&str>, Option<&str>)]) -> Arc<Self> {
            let this = Self::default();
            for (pnid, key, token) in channels {
                this.channels.lock().unwrap().insert(
                    (*pnid).to_owned(),
                    ChannelCredentials {
                        api_key: key.map(SecretString::from),
                        webhook_token: token.map(SecretString::from),
                    },
                );
            }
            Arc::new(this)
        }
    }

    #[async_trait]
    impl ChannelCredentialLookup for FakeChannels {
        async fn channel_credentials(&self, phone_number_id: &str) -> Result<Option<ChannelCredentials>, String> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err("pool timed out".into());
            }
            Ok(self.channels.lock().unwrap().get(phone_number_id).cloned())
        }
    }

    fn channel(pnid: &str) -> ChannelInfo {
        ChannelInfo { id: ChannelId::new("c"), provider: "360dialog".into(), phone_number_id: pnid.into() }
    }

    fn exposed(key: Option<SecretString>) -> Option<String> {
        key.map(|k| k.expose_secret().to_owned())
    }

    #[tokio::test]
    async fn a_channel_sends_with_its_own_key_and_the_others_with_the_global_one() {
        let store = FakeChannels::with(&[("PN-OWN", Some("own-key"), None), ("PN-PLAIN", None, None)]);
        let cache = ChannelCredentialCache::new(store, Some(SecretString::from("global-key")));

        assert_eq!(exposed(cache.api_key(&channel("PN-OWN")).await.unwrap()).as_deref(), Some("own-key"));
        assert_eq!(exposed(cache.api_key(&channel("PN-PLAIN")).await.unwrap()).as_deref(), Some("global-key"));
        assert_eq!(exposed(cache.api_key(&channel("PN-UNKNOWN")).await.unwrap()).as_deref(), Some("global-key"));
    }

    #[tokio::test]
    async fn credentials_are_read_once_per_ttl() {
        let store = FakeChannels::with(&[("PN", Some("k"), Some("t"))]);
        let cache = ChannelCredentialCache::new(store.clone(), None);

        for _ in 0..3 {
            assert_eq!(exposed(cache.webhook_token("PN").await.unwrap()).as_deref(), Some("t"));
        }

        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_rotated_key_is_used_once_the_ttl_passed() {
        let store = FakeChannels::with(&[("PN", Some("old"), None)]);
        let cache = ChannelCredentialCache::new(store.clone(), None).with_ttl(Duration::ZERO);
        assert_eq!(exposed(cache.api_key(&channel("PN")).await.unwrap()).as_deref(), Some("old"));

        store.channels.lock().unwrap().get_mut("PN").unwrap().api_key = Some(SecretString::from("new"));

        assert_eq!(exposed(cache.api_key(&channel("PN")).await.unwrap()).as_deref(), Some("new"));
    }

    #[tokio::test]
    async fn known_channels_keep_their_credentials_while_the_store_is_down() {
        let store = FakeChannels::with(&[("PN", Some("k"), Some("t"))]);
        let cache =
            ChannelCredentialCache::new(store.clone(), Some(SecretString::from("global"))).with_ttl(Duration::ZERO);
        cache.webhook_token("PN").await.unwrap();

        store.down.store(true, Ordering::SeqCst);

        assert_eq!(exposed(cache.webhook_token("PN").await.unwrap()).as_deref(), Some("t"));
        assert_eq!(exposed(cache.api_key(&channel("PN")).await.unwrap()).as_deref(), Some("k"));
        let error = cache.api_key(&channel("PN-NEVER-SEEN")).await.expect_err("cannot tell");
        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("credentials_unavailable"));
    }

    #[tokio::test]
    async fn unknown_numbers_are_not_cached() {
        let store = FakeChannels::with(&[]);
        let cache = ChannelCredentialCache::new(store.clone(), None);

        for n in 0..3 {
            assert!(cache.credentials(&format!("MADE-UP-{n}")).await.unwrap().is_none());
        }

        assert!(cache.entries.lock().unwrap().is_empty());
        assert!(cache.credentials("").await.unwrap().is_none(), "no number: nothing to read");
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);
    }
}
