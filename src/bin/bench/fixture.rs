//! What a run works against, and its cleanup: a fresh migrated database (`parley_test_<uuid>`,
//! dropped at the end) with one tenant on the base pipeline and a small knowledge base, its own
//! Redis key prefix for the queue (and the pipeline's keys, which live under the tenant's and
//! conversations' ids), and a directory for the processes' logs.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
};

use engine::embedding::hash_embedding;
use parley::{
    kv,
    store::{PgStore, SeedTenant, SeededTenant, testing::TestDatabase},
};
use redis::aio::ConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, PgConnection};

pub const PHONE_NUMBER_ID: &str = "PARLEY_BENCH";
pub const APP_SECRET: &str = "parley-bench-app-secret";
const API_KEY: &str = "parley-bench-api-key";
const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The knowledge base's documents each have this many chunks of a few sentences.
const CHUNKS_PER_DOCUMENT: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct Fixture {
    pub db: TestDatabase,
    pub tenant: SeededTenant,
    pub queue_prefix: String,
    pub redis_url: SecretString,
    pub redis: ConnectionManager,
    pub app_secret: SecretString,
    pub logs: PathBuf,
}

impl Fixture {
    /// `knowledge_chunks`: the size of the tenant's knowledge base (0: none).
    pub async fn create(knowledge_chunks: usize) -> Result<Self, FixtureError> {
        let db = TestDatabase::try_create().await.map_err(|e| {
            FixtureError::Postgres(format!("{e} (PostgreSQL with pgvector on 127.0.0.1:5432, or PARLEY_TEST_PG_URL)"))
        })?;
        let store = PgStore::new(db.pool.clone());
        let tenant = store
            .seed_tenant(&SeedTenant {
                name: "Boutique Bench".into(),
                phone_number_id: PHONE_NUMBER_ID.into(),
                plan: None,
                // The base pipeline, with a monthly quota no run reaches.
                monthly_messages: Some(1_000_000_000),
                provider: "meta".into(),
            })
            .await
            .map_err(|e| FixtureError::Postgres(e.to_string()))?;
        seed_knowledge(&db, &tenant, knowledge_chunks).await?;
        let redis_url =
            SecretString::from(std::env::var("PARLEY_BENCH_REDIS_URL").unwrap_or_else(|_| REDIS_URL.into()));
        let redis = kv::connect(&redis_url).await.map_err(|e| FixtureError::Redis(e.to_string()))?;
        let run = uuid::Uuid::now_v7().simple().to_string();
        let logs = std::env::temp_dir().join(format!("parley-bench-{run}"));
        std::fs::create_dir_all(&logs)?;
        Ok(Self {
            db,
            tenant,
            queue_prefix: format!("parley-bench-{}", &run[run.len() - 12..]),
            redis_url,
            redis,
            app_secret: SecretString::from(APP_SECRET),
            logs,
        })
    }

    /// Where PostgreSQL listens, for the round-trip counter to forward to.
    pub fn postgres_addr(&self) -> Result<SocketAddr, FixtureError> {
        let url = url::Url::parse(self.db.url.expose_secret()).map_err(|e| FixtureError::Postgres(e.to_string()))?;
        let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
        (host.as_str(), url.port().unwrap_or(5432))
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| FixtureError::Postgres(format!("{host} resolves to no address")))
    }

    /// The database's URL, through `via` (the round-trip counter) when given, without TLS so that
    /// the counter can read the protocol (Parley's sqlx has no TLS backend compiled in anyway).
    pub fn database_url(&self, via: Option<SocketAddr>) -> Result<String, FixtureError> {
        let mut url =
            url::Url::parse(self.db.url.expose_secret()).map_err(|e| FixtureError::Postgres(e.to_string()))?;
        if let Some(addr) = via {
            let _ = url.set_host(Some(&addr.ip().to_string()));
            let _ = url.set_port(Some(addr.port()));
        }
        url.set_query(Some("sslmode=disable"));
        Ok(url.to_string())
    }

    /// The environment of every Parley process of a run: Meta as the provider (signed webhooks),
    /// the run's database and queue prefix, JSON logs at `info` as in production.
    pub fn parley_env(&self, database_url: String, port: u16) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: &str| {
            env.insert(k.to_owned(), v.to_owned());
        };
        set("APP_ENV", "development");
        set("HOST", "127.0.0.1");
        set("PORT", &port.to_string());
        set("DATABASE_URL", &database_url);
        set("REDIS_URL", self.redis_url.expose_secret());
        set("QUEUE_PREFIX", &self.queue_prefix);
        set("LOG_LEVEL", "info");
        set("WHATSAPP_PROVIDER", "meta");
        set("WHATSAPP_API_KEY", API_KEY);
        set("WHATSAPP_APP_SECRET", APP_SECRET);
        set("WHATSAPP_VERIFY_TOKEN", "parley-bench-verify-token");
        set("PIPELINE_FILE", &workspace().join("pipelines/whatsapp.toml").display().to_string());
        env
    }

    /// Closes the fixture's own connections to the run's database, so that from then on only
    /// Parley's connections count in its statistics (a closing backend flushes its counters).
    pub async fn close_pool(&self) {
        self.db.pool.close().await;
    }

    /// `pg_stat_database.xact_commit` of the run's database, read from the `postgres` database so
    /// that reading it does not count.
    pub async fn committed_transactions(&self) -> Result<i64, FixtureError> {
        let mut admin =
            url::Url::parse(self.db.url.expose_secret()).map_err(|e| FixtureError::Postgres(e.to_string()))?;
        admin.set_path("/postgres");
        let mut conn =
            PgConnection::connect(admin.as_str()).await.map_err(|e| FixtureError::Postgres(e.to_string()))?;
        let commits = sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(self.db.name())
            .fetch_one(&mut conn)
            .await
            .map_err(|e| FixtureError::Postgres(e.to_string()));
        let _ = conn.close().await;
        commits
    }

    /// The Redis server's pid when it runs on this machine (its CPU is then measurable).
    pub async fn redis_pid(&self) -> Option<u32> {
        let mut conn = self.redis.clone();
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.ok()?;
        let pid: u32 = info.lines().find_map(|l| l.strip_prefix("process_id:"))?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// The pids of the PostgreSQL backends connected to the run's database (local server only).
    pub async fn postgres_backends(&self) -> Vec<u32> {
        let Ok(mut admin) = url::Url::parse(self.db.url.expose_secret()) else { return Vec::new() };
        admin.set_path("/postgres");
        let Ok(mut conn) = PgConnection::connect(admin.as_str()).await else { return Vec::new() };
        let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
            .bind(self.db.name())
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
        let _ = conn.close().await;
        pids.into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect()
    }

    /// Entries in the queue's streams (all shards).
    pub async fn queued_entries(&self, shards: u32) -> Result<u64, FixtureError> {
        let mut conn = self.redis.clone();
        let mut total = 0u64;
        for shard in 0..shards {
            let len: u64 = redis::cmd("XLEN")
                .arg(format!("{}:inbound:{shard}", self.queue_prefix))
                .query_async(&mut conn)
                .await
                .map_err(|e| FixtureError::Redis(e.to_string()))?;
            total += len;
        }
        Ok(total)
    }

    /// Removes every Redis key of the run, drops the database, and the logs unless `keep_logs`.
    pub async fn cleanup(self, keep_logs: bool) {
        let mut patterns = vec![
            format!("{}:*", self.queue_prefix),
            format!("idempotence:msg:{}:*", self.tenant.tenant_id),
            format!("ratelimit:sender:{}:*", self.tenant.tenant_id),
        ];
        // A connection of its own: the run may have closed the fixture's pool (see `close_pool`).
        let conversations: Vec<uuid::Uuid> = match PgConnection::connect(self.db.url.expose_secret()).await {
            Ok(mut conn) => {
                let ids = sqlx::query_scalar("SELECT id FROM conversations").fetch_all(&mut conn).await;
                let _ = conn.close().await;
                ids.unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        let mut keys: Vec<String> = conversations
            .iter()
            .flat_map(|c| [format!("ratelimit:conv:{c}"), format!("ratelimit:notified:{c}")])
            .collect();
        let mut conn = self.redis.clone();
        for pattern in patterns.drain(..) {
            keys.extend(scan(&mut conn, &pattern).await);
        }
        for batch in keys.chunks(500) {
            if let Err(e) = redis::cmd("DEL").arg(batch).query_async::<i64>(&mut conn).await {
                eprintln!("warning: some Redis keys of the run were not deleted: {e}");
            }
        }
        self.db.drop_database().await;
        if keep_logs {
            eprintln!("logs kept in {}", self.logs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

/// The repository root: the pipeline file and `target/` are found from there.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free port on loopback for a process to listen on.
pub fn free_port() -> Result<u16, FixtureError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let page: Result<(u64, Vec<String>), _> =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(conn).await;
        let Ok((next, found)) = page else { break };
        keys.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys
}

/// A shop's knowledge base: enough indexed chunks for the knowledge search to do real work.
async fn seed_knowledge(db: &TestDatabase, tenant: &SeededTenant, chunks: usize) -> Result<(), FixtureError> {
    const TOPICS: [&str; 8] = [
        "Horaires : la boutique est ouverte du lundi au samedi de 9 h à 19 h, fermée le dimanche.",
        "Livraison : gratuite dès 50 euros d'achat en France métropolitaine, sous 48 heures ouvrées.",
        "Retours : vous disposez de 30 jours pour retourner un article non porté, dans son emballage.",
        "Tailles : nos chaussures vont du 35 au 46 ; consultez le guide des tailles sur chaque fiche.",
        "Commandes : le suivi est envoyé par e-mail ; sans nouvelles après 5 jours, contactez-nous.",
        "Paiement : carte bancaire, PayPal, et paiement en trois fois sans frais dès 100 euros.",
        "Fidélité : un point par euro dépensé, 10 euros offerts tous les 200 points.",
        "Magasins : retrait gratuit en magasin à Paris, Lyon et Bordeaux sous 24 heures.",
    ];
    let store_err = |e: sqlx::Error| FixtureError::Postgres(e.to_string());
    for d in 0..chunks.div_ceil(CHUNKS_PER_DOCUMENT) {
        let document: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO knowledge_documents (tenant_id, title, source, content_hash, status, bytes)
             VALUES ($1, $2, $3, $4, 'indexed', 2000) RETURNING id",
        )
        .bind(tenant.tenant_id)
        .bind(format!("FAQ {d}"))
        .bind(format!("faq-{d}.md"))
        .bind(format!("bench-{d}"))
        .fetch_one(&db.pool)
        .await
        .map_err(store_err)?;
        for c in 0..CHUNKS_PER_DOCUMENT.min(chunks - d * CHUNKS_PER_DOCUMENT) {
            let text = format!(
                "{} {} (fiche {d}, section {c})",
                TOPICS[(d + c) % TOPICS.len()],
                TOPICS[(d * 3 + c + 1) % TOPICS.len()]
            );
            let vector = hash_embedding(&text, parley::store::EMBEDDING_DIMENSIONS)
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",");
            sqlx::query(
                "INSERT INTO knowledge_chunks (document_id, tenant_id, ordinal, text, embedding)
                 VALUES ($1, $2, $3, $4, $5::text::vector)",
            )
            .bind(document)
            .bind(tenant.tenant_id)
            .bind(c as i32)
            .bind(&text)
            .bind(format!("[{vector}]"))
            .execute(&db.pool)
            .await
            .map_err(store_err)?;
        }
    }
    // Planner statistics, as a knowledge base that has been in use for a while has them.
    sqlx::query("ANALYZE knowledge_documents, knowledge_chunks").execute(&db.pool).await.map_err(store_err)?;
    Ok(())
}
