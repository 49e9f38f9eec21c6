//! The PostgreSQL store: the connection pool, the migrations, and every query Parley makes —
//! channel → tenant resolution, conversations and messages, delivery statuses, quotas, knowledge
//! search, the inbound spool and seeding. [`PgStore`] is also the engine's
//! [`engine::ports::RelationalStore`].
//!
//! Queries are checked at run time (`sqlx::query`), and each hot-path operation is one round trip
//! (a CTE where several rows change together) so that a message costs few trips to the database.

mod channels;
mod hot;
mod knowledge;
mod media;
mod messages;
mod ports;
mod quota;
mod seed;
mod spool;
pub mod testing;

use std::{fmt, str::FromStr, time::Duration};

use engine::{
    masking::mask_phones_in,
    message::{ChannelInfo, TenantInfo},
    ports::PortError,
};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

pub use knowledge::vector_literal;
pub use media::{InboundMedia, StoredMedia};
pub use messages::{InboundOutcome, NewInbound, OutboundView, RecordedInbound};
pub use seed::{SeedReport, SeedTenant, SeededTenant};
pub use spool::SpoolRow;

/// The monthly message limit of a tenant without a plan (the base pipeline) and without an
/// override of its own.
pub const DEFAULT_MONTHLY_MESSAGES: i64 = 1000;
/// The knowledge-base limits of a tenant without a plan.
pub const DEFAULT_MAX_DOCUMENTS: i32 = 100;
pub const DEFAULT_MAX_STORAGE_BYTES: i64 = 50 * 1024 * 1024;
/// The embedding dimension of `knowledge_chunks.embedding`.
pub const EMBEDDING_DIMENSIONS: usize = 768;

/// The service name in port errors.
const SERVICE: &str = "postgres";

/// How a store operation failed. Messages never contain secrets, SQL parameters or unmasked phone
/// numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL could not be reached, timed out, or failed transiently: retry later.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (unknown plan, malformed id…): retrying cannot help.
    #[error("{0}")]
    Invalid(String),
    /// Anything else PostgreSQL refused.
    #[error("postgres error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => {
                Self::Unavailable(mask_phones_in(&error.to_string()))
            }
            E::Database(db) => {
                // The message only: the detail may quote row values (a user's number).
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let text = mask_phones_in(&format!("{} (SQLSTATE {code})", db.message()));
                if is_transient_sqlstate(&code) { Self::Unavailable(text) } else { Self::Other(text) }
            }
            // May echo the connection string.
            E::Configuration(_) => Self::Invalid("invalid database configuration".into()),
            _ => Self::Other(mask_phones_in(&error.to_string())),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(e) => e.into(),
            other => Self::Other(format!("migrations: {other}")),
        }
    }
}

impl From<StoreError> for PortError {
    fn from(error: StoreError) -> Self {
        match error {
            // A bug or a schema problem may also heal (a migration applied, a deploy rolled back):
            // retried like an outage, the job reaches the dead-letter stream if it does not.
            StoreError::Unavailable(m) | StoreError::Other(m) => PortError::unavailable(SERVICE, m),
            StoreError::Invalid(m) => PortError::permanent(SERVICE, None, m),
        }
    }
}

/// Connection failures (08), resources (53), operator intervention and timeouts (57: shutdown,
/// statement timeout), and the serialisation failures and deadlocks worth retrying (40001, 40P01).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || code.starts_with("57") || code == "40001" || code == "40P01"
}

/// Parses a row id that the store handed out earlier.
fn parse_id(what: &str, id: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(id).map_err(|_| StoreError::Invalid(format!("{what} id {id:?} is not a UUID")))
}

/// A count or limit stored as `bigint` (non-negative by the schema's checks).
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn connect_options(database_url: &SecretString) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(database_url.expose_secret())
        .map_err(|_| StoreError::Invalid("DATABASE_URL is not a valid PostgreSQL URL".into()))?;
    Ok(options.application_name("parley"))
}

/// The pool's size, and how many of its connections the per-message statements may keep between
/// uses (the rest stay free for everything else).
const MAX_CONNECTIONS: u32 = 10;
const HOT_CONNECTIONS: usize = 6;

fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(600))
        // The default pings every connection on every acquire: a round trip per query. A
        // connection idle for a while is checked instead (a restarted server, a NAT that forgot
        // it); a failure on a busy connection fails that one job, which is retried.
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // Filtered HNSW searches (one tenant among many) keep scanning the index until
                // enough rows pass the filter, instead of returning fewer than `top_k`. Once per
                // connection; a server whose pgvector predates 0.8 refuses the setting, and
                // searches there simply work as before.
                let _ = sqlx::Executor::execute(&mut *conn, "SET hnsw.iterative_scan = relaxed_order").await;
                Ok(())
            })
        })
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > Duration::from_secs(30) {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Opens the pool and one connection, so that a wrong URL or an unreachable server is reported at
/// start-up.
pub async fn connect(database_url: &SecretString) -> Result<PgPool, StoreError> {
    Ok(pool_options().connect_with(connect_options(database_url)?).await?)
}

/// The pool without connecting yet: for processes that must start while PostgreSQL is down (the
/// webhook keeps accepting into Redis) and connect when it is back.
pub fn connect_lazy(database_url: &SecretString) -> Result<PgPool, StoreError> {
    Ok(pool_options().connect_lazy_with(connect_options(database_url)?))
}

/// Applies the migrations in `migrations/` (embedded in the binary) that the database lacks.
/// Safe to run concurrently from several processes (an advisory lock serialises them) and again
/// on an up-to-date database (a no-op).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// The provider secrets a channel overrides (`channels.credentials`). `Debug` says only which are
/// set.
#[derive(Clone, Default)]
pub struct ChannelCredentials {
    pub api_key: Option<SecretString>,
    pub webhook_token: Option<SecretString>,
}

impl fmt::Debug for ChannelCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &Option<SecretString>| if s.is_some() { "[set]" } else { "[unset]" };
        f.debug_struct("ChannelCredentials")
            .field("api_key", &set(&self.api_key))
            .field("webhook_token", &set(&self.webhook_token))
            .finish()
    }
}

/// Everything a webhook event's `phone_number_id` resolves to.
#[derive(Debug, Clone)]
pub struct ChannelContext {
    pub channel: ChannelInfo,
    pub tenant: TenantInfo,
    pub credentials: ChannelCredentials,
}

/// The PostgreSQL store. Cheap to clone (the pool and the channel cache are shared).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    channels: std::sync::Arc<channels::ChannelCache>,
    /// Connections kept between the per-message statements (see `hot`).
    hot: std::sync::Arc<hot::Stash>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        let hot = hot::Stash::new(&pool, HOT_CONNECTIONS);
        Self { pool, channels: std::sync::Arc::new(channels::ChannelCache::new(channels::CHANNEL_CACHE_TTL)), hot }
    }

    /// A connection for one of the per-message statements (see `hot`): `keep()` it after the
    /// statement succeeded.
    async fn hot(&self) -> Result<hot::HotConnection, StoreError> {
        Ok(hot::HotConnection::acquire(&self.hot, &self.pool).await?)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One trivial query: for `/ready`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Records that a pipeline configuration was loaded (first and latest time per content).
    /// Returns true when this content was never loaded before.
    pub async fn record_pipeline_version(&self, content: &str) -> Result<bool, StoreError> {
        use sha2::{Digest, Sha256};
        let hash: String = Sha256::digest(content.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let first: bool = sqlx::query_scalar(
            "INSERT INTO pipeline_versions (content_hash, content) VALUES ($1, $2)
             ON CONFLICT (content_hash) DO UPDATE SET last_loaded_at = now()
             RETURNING (xmax = 0)",
        )
        .bind(hash)
        .bind(content)
        .fetch_one(&self.pool)
        .await?;
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::TestDatabase, *};

    #[tokio::test]
    async fn migrations_apply_twice_and_concurrently() {
        let db = TestDatabase::create().await;
        migrate(&db.pool).await.expect("second run is a no-op");
        let (a, b) = tokio::join!(migrate(&db.pool), migrate(&db.pool));
        a.expect("concurrent run");
        b.expect("concurrent run");

        let vector: Option<String> =
            sqlx::query_scalar("SELECT extname::text FROM pg_extension WHERE extname = 'vector'")
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        assert_eq!(vector.as_deref(), Some("vector"));
        let hnsw: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'knowledge_chunks' AND indexdef LIKE '%USING hnsw%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(hnsw, 1);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn an_unreachable_server_is_reported_as_unavailable_without_the_password() {
        let url = SecretString::from("postgres://parley:hunter2-secret@127.0.0.1:1/parley");
        let error = connect(&url).await.expect_err("nothing listens on port 1");
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert!(PortError::from(error).is_retryable());
    }

    #[tokio::test]
    async fn a_malformed_url_is_invalid_and_not_echoed() {
        let url = SecretString::from("postgres://user:hunter2@host:port/db");
        let error = connect(&url).await.expect_err("not a valid url");
        assert!(matches!(error, StoreError::Invalid(_)), "{error:?}");
        assert!(!error.to_string().contains("hunter2"));
    }

    #[tokio::test]
    async fn ping_and_pipeline_versions() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store.ping().await.unwrap();
        let scan: String = sqlx::query_scalar("SHOW hnsw.iterative_scan").fetch_one(&db.pool).await.unwrap();
        assert_eq!(scan, "relaxed_order", "set on every connection for filtered vector searches");
        assert!(store.record_pipeline_version("[[stages]]\nkind = \"send\"\n").await.unwrap());
        assert!(!store.record_pipeline_version("[[stages]]\nkind = \"send\"\n").await.unwrap());
        assert!(store.record_pipeline_version("[[stages]]\nkind = \"llm\"\n").await.unwrap());
        db.drop_database().await;
    }
}
