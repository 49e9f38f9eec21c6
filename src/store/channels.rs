//! Channel → tenant resolution: the business number of a webhook event to its channel, tenant,
//! plan limits and default assistant, in one query — and [`PgStore::resolve_channel_cached`], the
//! same kept for [`CHANNEL_CACHE_TTL`] per process, which the worker uses for every message.
//!
//! Channels, plans and assistants change rarely; reading them again for every message would be a
//! PostgreSQL round trip per message for nothing. A change (a new plan, a monthly limit override, a
//! new system prompt, rotated credentials) reaches the workers within the TTL. Numbers that no
//! channel owns are not cached, so a channel created for a new number works at once.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use engine::{
    ids::{ChannelId, TenantId},
    message::{AssistantSettings, ChannelInfo, TenantInfo},
};
use secrecy::SecretString;
use uuid::Uuid;

use super::{ChannelContext, ChannelCredentials, DEFAULT_MONTHLY_MESSAGES, PgStore, StoreError, to_u64};

#[derive(sqlx::FromRow)]
struct ChannelRow {
    channel_id: Uuid,
    provider: String,
    phone_number_id: String,
    credentials: serde_json::Value,
    tenant_id: Uuid,
    tier: Option<String>,
    monthly_message_limit: Option<i64>,
    system_prompt: Option<String>,
    model: Option<String>,
    temperature: Option<f32>,
}

/// How long a resolved channel is used before it is read again.
pub const CHANNEL_CACHE_TTL: Duration = Duration::from_secs(30);

/// The resolved channels of one process (see the module's documentation).
#[derive(Debug)]
pub(super) struct ChannelCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, ChannelContext)>>,
}

/// The cache stops growing here; it is emptied and refilled from the store (more channels than
/// this in one deployment only cost a read per message once it is full).
const CHANNEL_CACHE_CAPACITY: usize = 100_000;

impl ChannelCache {
    pub(super) fn new(ttl: Duration) -> Self {
        Self { ttl, entries: Mutex::new(HashMap::new()) }
    }

    fn get(&self, phone_number_id: &str) -> Option<ChannelContext> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(phone_number_id) {
            Some((read_at, context)) if read_at.elapsed() < self.ttl => Some(context.clone()),
            _ => None,
        }
    }

    fn put(&self, phone_number_id: &str, context: &ChannelContext) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CHANNEL_CACHE_CAPACITY && !entries.contains_key(phone_number_id) {
            entries.retain(|_, (read_at, _)| read_at.elapsed() < self.ttl);
            if entries.len() >= CHANNEL_CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(phone_number_id.to_owned(), (Instant::now(), context.clone()));
    }

    fn forget(&self, phone_number_id: &str) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(phone_number_id);
    }
}

impl PgStore {
    /// [`Self::resolve_channel`] through this process's cache: read from PostgreSQL at most once
    /// per [`CHANNEL_CACHE_TTL`] per known number.
    pub async fn resolve_channel_cached(&self, phone_number_id: &str) -> Result<Option<ChannelContext>, StoreError> {
        if let Some(context) = self.channels.get(phone_number_id) {
            return Ok(Some(context));
        }
        let found = self.resolve_channel(phone_number_id).await?;
        match &found {
            Some(context) => self.channels.put(phone_number_id, context),
            None => self.channels.forget(phone_number_id),
        }
        Ok(found)
    }

    /// The channel of `phone_number_id` with its tenant; `None` for a number no tenant owns.
    pub async fn resolve_channel(&self, phone_number_id: &str) -> Result<Option<ChannelContext>, StoreError> {
        // The limit: the tenant's override, else its plan's (NULL = unlimited), else — without a
        // plan — the default of the base pipeline.
        let mut conn = self.hot().await?;
        let row: Option<ChannelRow> = sqlx::query_as(
            "SELECT ch.id AS channel_id, ch.provider, ch.phone_number_id, ch.credentials,
                    t.id AS tenant_id, p.tier,
                    CASE WHEN t.monthly_message_limit_override IS NOT NULL THEN t.monthly_message_limit_override
                         WHEN p.id IS NOT NULL THEN p.monthly_message_limit
                         ELSE $2 END AS monthly_message_limit,
                    a.system_prompt, a.model, a.temperature
             FROM channels ch
             JOIN tenants t ON t.id = ch.tenant_id
             LEFT JOIN plans p ON p.id = t.plan_id
             LEFT JOIN LATERAL (
                 SELECT system_prompt, model, temperature FROM assistants
                 WHERE tenant_id = t.id ORDER BY is_default DESC, created_at LIMIT 1
             ) a ON true
             WHERE ch.phone_number_id = $1",
        )
        .bind(phone_number_id)
        .bind(DEFAULT_MONTHLY_MESSAGES)
        .fetch_optional(&mut *conn)
        .await?;
        conn.keep();
        Ok(row.map(ChannelRow::into_context))
    }
}

impl ChannelRow {
    fn into_context(self) -> ChannelContext {
        ChannelContext {
            channel: ChannelInfo {
                id: ChannelId::new(self.channel_id.to_string()),
                provider: self.provider,
                phone_number_id: self.phone_number_id,
            },
            tenant: TenantInfo {
                id: TenantId::new(self.tenant_id.to_string()),
                tier: self.tier,
                monthly_message_limit: self.monthly_message_limit.map(to_u64),
                assistant: AssistantSettings {
                    system_prompt: self.system_prompt.unwrap_or_default(),
                    model: self.model,
                    temperature: self.temperature,
                },
            },
            credentials: credentials_from(&self.credentials),
        }
    }
}

/// `{"api_key": "...", "webhook_token": "..."}`; anything else in the document is ignored, and an
/// empty string counts as unset (the global setting applies).
fn credentials_from(json: &serde_json::Value) -> ChannelCredentials {
    let secret =
        |key: &str| json.get(key).and_then(serde_json::Value::as_str).filter(|s| !s.is_empty()).map(SecretString::from);
    ChannelCredentials { api_key: secret("api_key"), webhook_token: secret("webhook_token") }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::store::{SeedTenant, testing::TestDatabase};

    #[tokio::test]
    async fn resolve_channel_returns_tenant_plan_assistant_and_credentials() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store.seed_defaults().await.unwrap();
        let seeded = store
            .seed_tenant(&SeedTenant {
                name: "Boulangerie".into(),
                phone_number_id: "PNID-1".into(),
                plan: Some("pro".into()),
                monthly_messages: None,
                provider: "meta".into(),
            })
            .await
            .unwrap();
        sqlx::query(
            "UPDATE channels SET credentials = '{\"api_key\": \"sk-channel-secret\", \"webhook_token\": \"\"}'
             WHERE phone_number_id = 'PNID-1'",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("UPDATE assistants SET model = 'gpt-4o-mini', temperature = 0.5 WHERE tenant_id = $1")
            .bind(seeded.tenant_id)
            .execute(&db.pool)
            .await
            .unwrap();

        let ctx = store.resolve_channel("PNID-1").await.unwrap().expect("known number");

        assert_eq!(ctx.channel.id.as_str(), seeded.channel_id.to_string());
        assert_eq!(ctx.channel.provider, "meta");
        assert_eq!(ctx.channel.phone_number_id, "PNID-1");
        assert_eq!(ctx.tenant.id.as_str(), seeded.tenant_id.to_string());
        assert_eq!(ctx.tenant.tier.as_deref(), Some("pro"));
        assert_eq!(ctx.tenant.monthly_message_limit, Some(10_000));
        assert!(ctx.tenant.assistant.system_prompt.contains("Boulangerie"));
        assert_eq!(ctx.tenant.assistant.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(ctx.tenant.assistant.temperature, Some(0.5));
        assert_eq!(ctx.credentials.api_key.as_ref().map(|s| s.expose_secret()), Some("sk-channel-secret"));
        assert!(ctx.credentials.webhook_token.is_none(), "an empty token is unset");
        let debug = format!("{ctx:?}");
        assert!(!debug.contains("sk-channel-secret"), "credentials in Debug: {debug}");

        assert!(store.resolve_channel("UNKNOWN").await.unwrap().is_none());
        db.drop_database().await;
    }

    #[tokio::test]
    async fn tenant_override_beats_the_plan_and_an_unlimited_plan_has_no_limit() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store.seed_defaults().await.unwrap();
        let tenant = |name: &str, pnid: &str, plan: Option<&str>, monthly: Option<i64>| SeedTenant {
            name: name.into(),
            phone_number_id: pnid.into(),
            plan: plan.map(Into::into),
            monthly_messages: monthly,
            provider: "sandbox".into(),
        };
        store.seed_tenant(&tenant("A", "P-A", Some("enterprise"), None)).await.unwrap();
        store.seed_tenant(&tenant("B", "P-B", Some("starter"), Some(5))).await.unwrap();
        store.seed_tenant(&tenant("C", "P-C", None, None)).await.unwrap();

        let limit = |ctx: Option<ChannelContext>| ctx.expect("known").tenant.monthly_message_limit;
        assert_eq!(limit(store.resolve_channel("P-A").await.unwrap()), None);
        assert_eq!(limit(store.resolve_channel("P-B").await.unwrap()), Some(5));
        assert_eq!(limit(store.resolve_channel("P-C").await.unwrap()), Some(1000));
        db.drop_database().await;
    }

    #[tokio::test]
    async fn cached_resolution_reads_a_known_number_once_per_ttl_and_never_caches_unknown_numbers() {
        let db = TestDatabase::create().await;
        let mut store = PgStore::new(db.pool.clone());
        store.channels = std::sync::Arc::new(ChannelCache::new(Duration::from_millis(300)));
        store.seed_defaults().await.unwrap();
        let seed = |pnid: &str, monthly: i64| SeedTenant {
            name: format!("Tenant {pnid}"),
            phone_number_id: pnid.into(),
            plan: None,
            monthly_messages: Some(monthly),
            provider: "meta".into(),
        };
        store.seed_tenant(&seed("PNID-C1", 10)).await.unwrap();
        let limit = |c: Option<ChannelContext>| c.expect("known number").tenant.monthly_message_limit;

        assert_eq!(limit(store.resolve_channel_cached("PNID-C1").await.unwrap()), Some(10));
        sqlx::query("UPDATE tenants SET monthly_message_limit_override = 20").execute(&db.pool).await.unwrap();
        assert_eq!(
            limit(store.resolve_channel_cached("PNID-C1").await.unwrap()),
            Some(10),
            "within the TTL the cached channel is used"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(limit(store.resolve_channel_cached("PNID-C1").await.unwrap()), Some(20), "read again after it");

        assert!(store.resolve_channel_cached("PNID-NEW").await.unwrap().is_none());
        store.seed_tenant(&seed("PNID-NEW", 5)).await.unwrap();
        assert_eq!(
            limit(store.resolve_channel_cached("PNID-NEW").await.unwrap()),
            Some(5),
            "an unknown number is not cached: its new channel works at once"
        );
        db.drop_database().await;
    }
}
