//! Settings from the environment, validated once at start-up: every missing or invalid variable is
//! reported at once, by name, with what is expected — never with a secret's value.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// Where Parley runs. Production refuses the embedded stand-ins (sandbox sender, local LLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhatsAppProvider {
    /// Records replies in the database and prints them: for development and tests.
    Sandbox,
    /// Meta's WhatsApp Cloud API.
    Meta,
    /// The BSP 360dialog.
    Dialog360,
}

impl WhatsAppProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Meta => "meta",
            Self::Dialog360 => "360dialog",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmProvider {
    /// Answers from the retrieved knowledge, deterministically, without a model.
    Local,
    /// Any OpenAI-compatible `/chat/completions` server.
    OpenAi,
    /// Gemini on Google Cloud's Vertex AI (`generateContent`).
    Vertex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingProvider {
    /// Feature-hashing embeddings (768 dimensions), no model needed.
    Hash,
    /// Any OpenAI-compatible `/embeddings` server, asked for 768 dimensions.
    OpenAi,
    /// Vertex AI's text embeddings (`text-embedding-004`, 768 dimensions).
    Vertex,
}

/// The level of the logs: the checklist's names (`fatal` is logged as `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Fatal,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Every setting Parley reads from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub app_env: AppEnv,
    pub host: IpAddr,
    pub port: u16,
    pub database_url: SecretString,
    pub redis_url: SecretString,
    pub pipeline_file: PathBuf,
    pub migrate_on_start: bool,

    pub whatsapp_provider: WhatsAppProvider,
    pub whatsapp_api_url: Url,
    pub whatsapp_api_key: Option<SecretString>,
    pub whatsapp_verify_token: SecretString,
    pub whatsapp_app_secret: Option<SecretString>,
    /// 360dialog webhooks carry this shared token in a header instead of a signature.
    pub whatsapp_webhook_token: Option<SecretString>,
    pub whatsapp_webhook_token_header: String,
    /// Messages per second per business number (token bucket; a full bucket waits).
    pub whatsapp_send_rate: std::num::NonZeroU32,
    /// A cap on the size of every inbound media file, below WhatsApp's own per-type limits.
    pub media_max_bytes: Option<std::num::NonZeroU64>,

    pub llm_provider: LlmProvider,
    pub llm_base_url: Option<Url>,
    pub llm_api_key: Option<SecretString>,
    pub llm_model: Option<String>,
    pub embedding_provider: EmbeddingProvider,
    /// `{EMBEDDING_BASE_URL}/embeddings` with EMBEDDING_PROVIDER=openai.
    pub embedding_base_url: Option<Url>,
    pub embedding_api_key: Option<SecretString>,
    pub embedding_model: Option<String>,

    /// Google Cloud, for LLM_PROVIDER=vertex and EMBEDDING_PROVIDER=vertex.
    pub gcp_project_id: Option<String>,
    /// The service-account JSON file the Vertex AI token is obtained with.
    pub google_application_credentials: Option<PathBuf>,
    pub vertex_ai_location: String,
    /// Defaults to `https://{VERTEX_AI_LOCATION}-aiplatform.googleapis.com`; the clients append
    /// `/v1/projects/...`.
    pub vertex_ai_base_url: Url,
    pub vertex_ai_model: String,
    pub vertex_embedding_model: String,

    /// The knowledge originals' local directory (when no GCS bucket is set).
    pub knowledge_dir: PathBuf,
    /// The knowledge originals in this GCS bucket instead (credentials: GOOGLE_APPLICATION_CREDENTIALS).
    pub gcs_bucket_name: Option<String>,
    /// Another GCS endpoint (a proxy, an emulator).
    pub gcs_base_url: Option<Url>,

    pub jwt_secret: SecretString,
    pub jwt_expires_in: Duration,

    pub log_level: LogLevel,
    pub log_pretty: bool,
    pub enable_swagger: bool,
    pub enable_cors: bool,
    pub enable_helmet: bool,
    /// Per-IP limit on the admin API (never on the webhook).
    pub rate_limit_max: u32,
    pub rate_limit_window: Duration,

    /// Threads of the HTTP server, each with a runtime and a Redis connection of its own, sharing
    /// the port (`SO_REUSEPORT`); 0: the server runs on the process's runtime. `None` (`auto`):
    /// one per CPU in `parley api`, 0 in `parley serve`, whose workers use that runtime.
    pub http_threads: Option<usize>,
    /// Jobs in flight per worker process.
    pub worker_concurrency: usize,
    /// Number of queue shards (streams). Changing it on a running system moves conversations
    /// between shards; drain the queue first.
    pub queue_shards: u32,
    /// Prefix of the queue's Redis keys, so that deployments can share a Redis.
    pub queue_prefix: String,
    pub job_max_attempts: u32,
    /// How long a worker's shard leases last without renewal: a dead worker's shards are taken
    /// over after at most this long.
    pub worker_lease_ttl: Duration,
    pub job_backoff_base: Duration,
    pub job_backoff_max: Duration,
}

/// Every problem found in the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct SettingsError {
    pub problems: Vec<String>,
}

const DEV_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/parley";
const DEV_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Development stand-ins, refused in production: they are public.
pub const DEV_JWT_SECRET: &str = "parley-development-jwt-secret-not-for-production";
pub const DEV_APP_SECRET: &str = "parley-development-app-secret";
pub const DEV_VERIFY_TOKEN: &str = "parley-development-verify-token";

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(std::env::vars().collect())
    }

    /// Reads the given variables (for tests).
    pub fn from_vars(vars: BTreeMap<String, String>) -> Result<Self, SettingsError> {
        let mut r = Reader { vars, problems: Vec::new() };
        let app_env = r.choice(
            "APP_ENV",
            "development",
            &[("development", AppEnv::Development), ("production", AppEnv::Production)],
        );
        let dev = app_env == AppEnv::Development;

        let host = r.parse::<IpAddr>("HOST", Some("0.0.0.0"), "an IP address such as 0.0.0.0");
        let port = r.parse::<u16>("PORT", Some("3000"), "a port number (1-65535)");
        let database_url = r.secret_url("DATABASE_URL", dev.then_some(DEV_DATABASE_URL), &["postgres", "postgresql"]);
        // TLS (`rediss://`) is not compiled in: put a TLS-terminating proxy in front, or ask for it.
        let redis_url = r.secret_url("REDIS_URL", dev.then_some(DEV_REDIS_URL), &["redis"]);
        let pipeline_file = PathBuf::from(r.get("PIPELINE_FILE").unwrap_or_else(|| "pipelines/whatsapp.toml".into()));
        let migrate_on_start = r.flag("MIGRATE_ON_START", true);

        let whatsapp_provider = r.choice(
            "WHATSAPP_PROVIDER",
            "sandbox",
            &[
                ("sandbox", WhatsAppProvider::Sandbox),
                ("meta", WhatsAppProvider::Meta),
                ("360dialog", WhatsAppProvider::Dialog360),
            ],
        );
        let default_api_url = match whatsapp_provider {
            WhatsAppProvider::Dialog360 => "https://waba-v2.360dialog.io",
            _ => "https://graph.facebook.com/v21.0",
        };
        let whatsapp_api_url = r.url("WHATSAPP_API_URL", Some(default_api_url));
        let real_provider = whatsapp_provider != WhatsAppProvider::Sandbox;
        let whatsapp_api_key = r.secret("WHATSAPP_API_KEY", real_provider, None);
        let whatsapp_verify_token = r
            .secret("WHATSAPP_VERIFY_TOKEN", !dev, dev.then_some(DEV_VERIFY_TOKEN))
            .unwrap_or_else(|| SecretString::from(DEV_VERIFY_TOKEN));
        let whatsapp_app_secret =
            r.secret("WHATSAPP_APP_SECRET", whatsapp_provider == WhatsAppProvider::Meta, dev.then_some(DEV_APP_SECRET));
        let whatsapp_webhook_token =
            r.secret("WHATSAPP_WEBHOOK_TOKEN", whatsapp_provider == WhatsAppProvider::Dialog360, None);
        let whatsapp_webhook_token_header =
            r.get("WHATSAPP_WEBHOOK_TOKEN_HEADER").unwrap_or_else(|| "X-Webhook-Token".into());
        if reqwest::header::HeaderName::from_bytes(whatsapp_webhook_token_header.as_bytes()).is_err() {
            r.problem(format!(
                "WHATSAPP_WEBHOOK_TOKEN_HEADER: expected an HTTP header name such as X-Webhook-Token, got `{whatsapp_webhook_token_header}`"
            ));
        }

        let whatsapp_send_rate = r.parse::<std::num::NonZeroU32>(
            "WHATSAPP_SEND_RATE",
            Some("80"),
            "a whole number of messages per second (at least 1)",
        );
        let media_max_bytes = r.get("MEDIA_MAX_BYTES").and_then(|_| {
            r.parse::<std::num::NonZeroU64>("MEDIA_MAX_BYTES", None, "a whole number of bytes (at least 1)")
        });
        let llm_provider = r.choice(
            "LLM_PROVIDER",
            "local",
            &[("local", LlmProvider::Local), ("openai", LlmProvider::OpenAi), ("vertex", LlmProvider::Vertex)],
        );
        let llm_needs_server = llm_provider == LlmProvider::OpenAi;
        let llm_base_url =
            if llm_needs_server || r.get("LLM_BASE_URL").is_some() { Some(r.url("LLM_BASE_URL", None)) } else { None };
        let llm_api_key = r.secret("LLM_API_KEY", false, None);
        let llm_model = r.get("LLM_MODEL");
        if llm_needs_server && llm_model.is_none() {
            r.problem("LLM_MODEL: required with LLM_PROVIDER=openai (the model name the server expects)");
        }
        let embedding_provider = r.choice(
            "EMBEDDING_PROVIDER",
            "hash",
            &[
                ("hash", EmbeddingProvider::Hash),
                ("openai", EmbeddingProvider::OpenAi),
                ("vertex", EmbeddingProvider::Vertex),
            ],
        );
        let embeddings_need_server = embedding_provider == EmbeddingProvider::OpenAi;
        let embedding_base_url = if embeddings_need_server || r.get("EMBEDDING_BASE_URL").is_some() {
            Some(r.url("EMBEDDING_BASE_URL", None))
        } else {
            None
        };
        let embedding_api_key = r.secret("EMBEDDING_API_KEY", false, None);
        let embedding_model = r.get("EMBEDDING_MODEL");
        if embeddings_need_server && embedding_model.is_none() {
            r.problem("EMBEDDING_MODEL: required with EMBEDDING_PROVIDER=openai (the model name the server expects)");
        }

        let vertex_for = match (llm_provider == LlmProvider::Vertex, embedding_provider == EmbeddingProvider::Vertex) {
            (true, _) => Some("LLM_PROVIDER=vertex"),
            (false, true) => Some("EMBEDDING_PROVIDER=vertex"),
            (false, false) => None,
        };
        let gcp_project_id = r.get("GCP_PROJECT_ID");
        match (&gcp_project_id, vertex_for) {
            (None, Some(provider)) => {
                r.problem(format!("GCP_PROJECT_ID: required with {provider} (the Google Cloud project id)"))
            }
            // It becomes a path segment of every Vertex AI URL.
            (Some(id), _) if !id.chars().all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c)) => r.problem(format!(
                "GCP_PROJECT_ID: expected a Google Cloud project id (letters, digits, '-', '.', ':'), got `{id}`"
            )),
            _ => {}
        }
        let google_application_credentials = r.get("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from);
        match (&google_application_credentials, vertex_for) {
            (None, Some(provider)) => r.problem(format!(
                "GOOGLE_APPLICATION_CREDENTIALS: required with {provider} (the path of a service-account JSON key file)"
            )),
            // Only the path is shown: the file holds a private key.
            (Some(path), Some(_)) if !path.is_file() => r.problem(format!(
                "GOOGLE_APPLICATION_CREDENTIALS: `{}` is not a readable file (expected a service-account JSON key file)",
                path.display()
            )),
            _ => {}
        }
        let vertex_ai_location = r.get("VERTEX_AI_LOCATION").unwrap_or_else(|| "us-central1".into()).to_lowercase();
        // It becomes part of the default host name.
        let location_ok =
            !vertex_ai_location.is_empty() && vertex_ai_location.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !location_ok {
            r.problem(format!(
                "VERTEX_AI_LOCATION: expected a Google Cloud region such as us-central1 or europe-west1, got `{vertex_ai_location}`"
            ));
        }
        let default_vertex_url = match vertex_ai_location.as_str() {
            // The global endpoint has no regional prefix.
            "global" => "https://aiplatform.googleapis.com".to_owned(),
            _ if location_ok => format!("https://{vertex_ai_location}-aiplatform.googleapis.com"),
            _ => "https://us-central1-aiplatform.googleapis.com".to_owned(),
        };
        let vertex_ai_base_url = r.url("VERTEX_AI_BASE_URL", Some(&default_vertex_url));
        let vertex_ai_model = r.get("VERTEX_AI_MODEL").unwrap_or_else(|| "gemini-1.5-pro".into());
        let vertex_embedding_model = r.get("VERTEX_EMBEDDING_MODEL").unwrap_or_else(|| "text-embedding-004".into());

        let knowledge_dir = PathBuf::from(
            r.get("KNOWLEDGE_DIR").unwrap_or_else(|| crate::knowledge::storage::DEFAULT_KNOWLEDGE_DIR.into()),
        );
        let gcs_bucket_name = r.get("GCS_BUCKET_NAME");
        if let Some(bucket) = &gcs_bucket_name {
            let valid = (3..=222).contains(&bucket.len())
                && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
                && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
                && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !valid {
                r.problem(format!(
                    "GCS_BUCKET_NAME: expected a bucket name (lowercase letters, digits, '-', '_', '.'), got `{bucket}`"
                ));
            }
        }
        let gcs_base_url = r.get("GCS_BASE_URL").map(|_| r.url("GCS_BASE_URL", None));

        let jwt_set = r.get("JWT_SECRET").is_some() || dev;
        let jwt_secret = r
            .secret("JWT_SECRET", !dev, dev.then_some(DEV_JWT_SECRET))
            .unwrap_or_else(|| SecretString::from(DEV_JWT_SECRET));
        if jwt_set && jwt_secret.expose_secret().chars().count() < 32 {
            r.problem("JWT_SECRET: must be at least 32 characters long");
        }
        let jwt_expires_in = r.duration("JWT_EXPIRES_IN", "7d");

        let log_level = r.choice(
            "LOG_LEVEL",
            "info",
            &[
                ("fatal", LogLevel::Fatal),
                ("error", LogLevel::Error),
                ("warn", LogLevel::Warn),
                ("info", LogLevel::Info),
                ("debug", LogLevel::Debug),
                ("trace", LogLevel::Trace),
            ],
        );
        let log_pretty = r.flag("LOG_PRETTY", false);
        let enable_swagger = r.flag("ENABLE_SWAGGER", false);
        let enable_cors = r.flag("ENABLE_CORS", true);
        let enable_helmet = r.flag("ENABLE_HELMET", true);
        let rate_limit_max = r.parse::<u32>("RATE_LIMIT_MAX", Some("100"), "a whole number of requests");
        let rate_limit_window = r.duration("RATE_LIMIT_WINDOW", "1m");

        let http_threads = match r.get("HTTP_THREADS") {
            None => None,
            Some(raw) if raw.eq_ignore_ascii_case("auto") => None,
            Some(raw) => match raw.parse::<usize>() {
                Ok(n) if n <= 64 => Some(n),
                _ => {
                    r.problem(format!(
                        "HTTP_THREADS: expected `auto` or a whole number of threads (0-64), got `{raw}`"
                    ));
                    None
                }
            },
        };
        let worker_concurrency =
            r.parse::<usize>("WORKER_CONCURRENCY", Some("64"), "a whole number of jobs (at least 1)");
        if worker_concurrency == Some(0) {
            r.problem("WORKER_CONCURRENCY: must be at least 1");
        }
        let queue_shards = r.parse::<u32>("QUEUE_SHARDS", Some("16"), "a whole number of shards (1-1024)");
        if queue_shards.is_some_and(|n| n == 0 || n > 1024) {
            r.problem("QUEUE_SHARDS: must be between 1 and 1024");
        }
        let queue_prefix = r.get("QUEUE_PREFIX").unwrap_or_else(|| "parley".into());
        if !queue_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            r.problem(format!("QUEUE_PREFIX: expected letters, digits, '-', '_' or '.', got `{queue_prefix}`"));
        }
        let job_max_attempts = r.parse::<u32>("JOB_MAX_ATTEMPTS", Some("8"), "a whole number of attempts (at least 1)");
        if job_max_attempts == Some(0) {
            r.problem("JOB_MAX_ATTEMPTS: must be at least 1");
        }
        let worker_lease_ttl = r.duration("WORKER_LEASE_TTL", "15s");
        let job_backoff_base = r.duration("JOB_BACKOFF_BASE", "1s");
        let job_backoff_max = r.duration("JOB_BACKOFF_MAX", "5m");

        if app_env == AppEnv::Production {
            if whatsapp_provider == WhatsAppProvider::Sandbox {
                r.problem("WHATSAPP_PROVIDER: `sandbox` is refused with APP_ENV=production; choose meta or 360dialog");
            }
            if llm_provider == LlmProvider::Local {
                r.problem("LLM_PROVIDER: `local` is refused with APP_ENV=production; choose openai or vertex");
            }
            if jwt_set && jwt_secret.expose_secret() == DEV_JWT_SECRET {
                r.problem("JWT_SECRET: the development secret is refused with APP_ENV=production");
            }
            // The only thing that authenticates a 360dialog webhook: it must not be guessable.
            if whatsapp_webhook_token.as_ref().is_some_and(|t| t.expose_secret().chars().count() < 16) {
                r.problem("WHATSAPP_WEBHOOK_TOKEN: must be at least 16 characters long with APP_ENV=production");
            }
        }

        if !r.problems.is_empty() {
            return Err(SettingsError { problems: r.problems });
        }
        // Every value below was checked above; `None` can only mean a problem was recorded.
        let missing = || SettingsError { problems: vec!["internal: a checked setting is missing".into()] };
        Ok(Self {
            app_env,
            host: host.ok_or_else(missing)?,
            port: port.ok_or_else(missing)?,
            database_url: database_url.ok_or_else(missing)?,
            redis_url: redis_url.ok_or_else(missing)?,
            pipeline_file,
            migrate_on_start,
            whatsapp_provider,
            whatsapp_api_url: whatsapp_api_url.ok_or_else(missing)?,
            whatsapp_api_key,
            whatsapp_verify_token,
            whatsapp_app_secret,
            whatsapp_webhook_token,
            whatsapp_webhook_token_header,
            whatsapp_send_rate: whatsapp_send_rate.ok_or_else(missing)?,
            media_max_bytes,
            llm_provider,
            llm_base_url: llm_base_url.flatten(),
            llm_api_key,
            llm_model,
            embedding_provider,
            embedding_base_url: embedding_base_url.flatten(),
            embedding_api_key,
            embedding_model,
            gcp_project_id,
            google_application_credentials,
            vertex_ai_location,
            vertex_ai_base_url: vertex_ai_base_url.ok_or_else(missing)?,
            vertex_ai_model,
            vertex_embedding_model,
            knowledge_dir,
            gcs_bucket_name,
            gcs_base_url: gcs_base_url.flatten(),
            jwt_secret,
            jwt_expires_in: jwt_expires_in.ok_or_else(missing)?,
            log_level,
            log_pretty,
            enable_swagger,
            enable_cors,
            enable_helmet,
            rate_limit_max: rate_limit_max.ok_or_else(missing)?,
            rate_limit_window: rate_limit_window.ok_or_else(missing)?,
            http_threads,
            worker_concurrency: worker_concurrency.ok_or_else(missing)?,
            queue_shards: queue_shards.ok_or_else(missing)?,
            queue_prefix,
            job_max_attempts: job_max_attempts.ok_or_else(missing)?,
            worker_lease_ttl: worker_lease_ttl.ok_or_else(missing)?,
            job_backoff_base: job_backoff_base.ok_or_else(missing)?,
            job_backoff_max: job_backoff_max.ok_or_else(missing)?,
        })
    }

    /// The key of the sender pseudonyms in Redis keys, derived from JWT_SECRET so that no other
    /// secret has to be managed; rotating it only restarts the rate-limit windows.
    pub fn pseudonym_key(&self) -> Vec<u8> {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(self.jwt_secret.expose_secret().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(b"parley sender pseudonym");
        mac.finalize().into_bytes().to_vec()
    }
}

struct Reader {
    vars: BTreeMap<String, String>,
    problems: Vec<String>,
}

impl Reader {
    fn get(&self, name: &str) -> Option<String> {
        self.vars.get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    fn choice<T: Copy>(&mut self, name: &str, default: &str, options: &[(&str, T)]) -> T {
        let raw = self.get(name).unwrap_or_else(|| default.to_owned()).to_lowercase();
        match options.iter().find(|(k, _)| *k == raw) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
                self.problem(format!("{name}: expected one of {}, got `{raw}`", names.join(", ")));
                options.iter().find(|(k, _)| *k == default).map(|(_, v)| *v).unwrap_or(options[0].1)
            }
        }
    }

    fn parse<T: FromStr>(&mut self, name: &str, default: Option<&str>, expected: &str) -> Option<T> {
        let raw = self.get(name).or_else(|| default.map(str::to_owned));
        match raw {
            None => {
                self.problem(format!("{name}: required; expected {expected}"));
                None
            }
            Some(raw) => match raw.parse::<T>() {
                Ok(v) => Some(v),
                Err(_) => {
                    self.problem(format!("{name}: expected {expected}, got `{raw}`"));
                    None
                }
            },
        }
    }

    fn flag(&mut self, name: &str, default: bool) -> bool {
        match self.get(name).map(|v| v.to_lowercase()) {
            None => default,
            Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => true,
            Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => false,
            Some(v) => {
                self.problem(format!("{name}: expected true or false, got `{v}`"));
                default
            }
        }
    }

    fn duration(&mut self, name: &str, default: &str) -> Option<Duration> {
        let raw = self.get(name).unwrap_or_else(|| default.to_owned());
        match humantime::parse_duration(&raw) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => {
                self.problem(format!("{name}: expected a duration such as 30s, 1m or 7d, got `{raw}`"));
                None
            }
        }
    }

    fn url(&mut self, name: &str, default: Option<&str>) -> Option<Url> {
        let raw = self.get(name).or_else(|| default.map(str::to_owned));
        match raw {
            None => {
                self.problem(format!("{name}: required; expected an http(s) URL"));
                None
            }
            Some(raw) => match Url::parse(&raw) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
                _ => {
                    self.problem(format!("{name}: expected an http(s) URL, got `{raw}`"));
                    None
                }
            },
        }
    }

    /// A URL that may hold a password: never echoed.
    fn secret_url(&mut self, name: &str, default: Option<&str>, schemes: &[&str]) -> Option<SecretString> {
        let raw = self.get(name).or_else(|| default.map(str::to_owned));
        match raw {
            None => {
                self.problem(format!("{name}: required; expected a {}:// URL", schemes[0]));
                None
            }
            Some(raw) => match Url::parse(&raw) {
                Ok(u) if schemes.contains(&u.scheme()) => Some(SecretString::from(raw)),
                _ => {
                    self.problem(format!("{name}: expected a {}:// URL (value not shown)", schemes[0]));
                    None
                }
            },
        }
    }

    fn secret(&mut self, name: &str, required: bool, default: Option<&str>) -> Option<SecretString> {
        match self.get(name).or_else(|| default.map(str::to_owned)) {
            Some(v) => Some(SecretString::from(v)),
            None if required => {
                self.problem(format!("{name}: required and not set"));
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn development_runs_with_no_variable_at_all() {
        let s = Settings::from_vars(BTreeMap::new()).unwrap();
        assert_eq!(s.port, 3000);
        assert_eq!(s.whatsapp_provider, WhatsAppProvider::Sandbox);
        assert_eq!(s.llm_provider, LlmProvider::Local);
        assert_eq!(s.worker_concurrency, 64);
        assert_eq!(s.database_url.expose_secret(), DEV_DATABASE_URL);
    }

    #[test]
    fn every_problem_is_reported_at_once_without_secret_values() {
        let err = Settings::from_vars(vars(&[
            ("APP_ENV", "production"),
            ("PORT", "http"),
            ("DATABASE_URL", "mysql://user:hunter2@db/parley"),
            ("JWT_SECRET", "short-but-secret"),
            ("WHATSAPP_PROVIDER", "meta"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "PORT: expected a port number",
            "DATABASE_URL: expected a postgres:// URL (value not shown)",
            "REDIS_URL: required",
            "JWT_SECRET: must be at least 32 characters",
            "WHATSAPP_API_KEY: required",
            "WHATSAPP_APP_SECRET: required",
            "WHATSAPP_VERIFY_TOKEN: required",
            "LLM_PROVIDER: `local` is refused with APP_ENV=production",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(!text.contains("hunter2") && !text.contains("short-but-secret"), "{text}");
    }

    #[test]
    fn http_threads_are_auto_unless_a_count_is_given() {
        assert_eq!(Settings::from_vars(BTreeMap::new()).unwrap().http_threads, None);
        assert_eq!(Settings::from_vars(vars(&[("HTTP_THREADS", "auto")])).unwrap().http_threads, None);
        assert_eq!(Settings::from_vars(vars(&[("HTTP_THREADS", "0")])).unwrap().http_threads, Some(0));
        assert_eq!(Settings::from_vars(vars(&[("HTTP_THREADS", "4")])).unwrap().http_threads, Some(4));
        for bad in ["-1", "two", "65"] {
            let err = Settings::from_vars(vars(&[("HTTP_THREADS", bad)])).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "HTTP_THREADS: expected `auto` or a whole number of threads (0-64), got `{bad}`"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn production_refuses_the_sandbox_sender() {
        let err = Settings::from_vars(vars(&[
            ("APP_ENV", "production"),
            ("DATABASE_URL", "postgres://db/parley"),
            ("REDIS_URL", "redis://cache"),
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef-prod"),
            ("WHATSAPP_VERIFY_TOKEN", "v"),
            ("LLM_PROVIDER", "openai"),
            ("LLM_BASE_URL", "http://127.0.0.1:9/v1"),
            ("LLM_MODEL", "m"),
        ]))
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].starts_with("WHATSAPP_PROVIDER: `sandbox` is refused"));
    }

    #[test]
    fn vertex_needs_a_project_and_a_service_account_file() {
        let err = Settings::from_vars(vars(&[
            ("LLM_PROVIDER", "vertex"),
            ("EMBEDDING_PROVIDER", "vertex"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/sa.json"),
            ("GCP_PROJECT_ID", "my project/../x"),
            ("VERTEX_AI_LOCATION", "europe west1"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "GCP_PROJECT_ID: expected a Google Cloud project id",
            "GOOGLE_APPLICATION_CREDENTIALS: `/nonexistent/sa.json` is not a readable file",
            "VERTEX_AI_LOCATION: expected a Google Cloud region",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }

        let err = Settings::from_vars(vars(&[("EMBEDDING_PROVIDER", "vertex")])).unwrap_err();
        assert!(err.to_string().contains("GCP_PROJECT_ID: required with EMBEDDING_PROVIDER=vertex"), "{err}");
        assert!(err.to_string().contains("GOOGLE_APPLICATION_CREDENTIALS: required with EMBEDDING_PROVIDER=vertex"));
    }

    #[test]
    fn vertex_url_follows_the_location_unless_set() {
        let key = tempfile::NamedTempFile::new().unwrap();
        let key_path = key.path().display().to_string();
        let with = |extra: &[(&str, &str)]| {
            let mut pairs = vec![
                ("LLM_PROVIDER", "vertex"),
                ("GCP_PROJECT_ID", "my-project"),
                ("GOOGLE_APPLICATION_CREDENTIALS", key_path.as_str()),
            ];
            pairs.extend_from_slice(extra);
            Settings::from_vars(vars(&pairs)).unwrap()
        };

        let default = with(&[]);
        assert_eq!(default.vertex_ai_location, "us-central1");
        assert_eq!(default.vertex_ai_base_url.as_str(), "https://us-central1-aiplatform.googleapis.com/");
        assert_eq!(default.vertex_ai_model, "gemini-1.5-pro");
        assert_eq!(default.vertex_embedding_model, "text-embedding-004");
        let europe = with(&[("VERTEX_AI_LOCATION", "europe-west1")]);
        assert_eq!(europe.vertex_ai_base_url.as_str(), "https://europe-west1-aiplatform.googleapis.com/");
        let global = with(&[("VERTEX_AI_LOCATION", "global")]);
        assert_eq!(global.vertex_ai_base_url.as_str(), "https://aiplatform.googleapis.com/");
        let proxy = with(&[("VERTEX_AI_BASE_URL", "http://127.0.0.1:8080/vertex")]);
        assert_eq!(proxy.vertex_ai_base_url.as_str(), "http://127.0.0.1:8080/vertex");
        assert_eq!(proxy.llm_provider, LlmProvider::Vertex);
    }

    #[test]
    fn openai_embeddings_need_a_url_and_a_model() {
        let err = Settings::from_vars(vars(&[("EMBEDDING_PROVIDER", "openai"), ("EMBEDDING_API_KEY", "sk-hidden")]))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("EMBEDDING_BASE_URL: required"), "{text}");
        assert!(text.contains("EMBEDDING_MODEL: required with EMBEDDING_PROVIDER=openai"), "{text}");
        assert!(!text.contains("sk-hidden"));

        let s = Settings::from_vars(vars(&[
            ("EMBEDDING_PROVIDER", "openai"),
            ("EMBEDDING_BASE_URL", "https://api.openai.com/v1"),
            ("EMBEDDING_MODEL", "text-embedding-3-small"),
        ]))
        .unwrap();
        assert_eq!(s.embedding_provider, EmbeddingProvider::OpenAi);
        assert!(s.embedding_api_key.is_none());
    }

    #[test]
    fn production_refuses_a_short_webhook_token() {
        let production = |token: &str| {
            Settings::from_vars(vars(&[
                ("APP_ENV", "production"),
                ("DATABASE_URL", "postgres://db/parley"),
                ("REDIS_URL", "redis://cache"),
                ("JWT_SECRET", "0123456789abcdef0123456789abcdef-prod"),
                ("WHATSAPP_VERIFY_TOKEN", "v"),
                ("WHATSAPP_PROVIDER", "360dialog"),
                ("WHATSAPP_API_KEY", "k"),
                ("WHATSAPP_WEBHOOK_TOKEN", token),
                ("LLM_PROVIDER", "openai"),
                ("LLM_BASE_URL", "http://127.0.0.1:9/v1"),
                ("LLM_MODEL", "m"),
            ]))
        };

        let err = production("short-tok").unwrap_err();
        assert_eq!(
            err.problems,
            ["WHATSAPP_WEBHOOK_TOKEN: must be at least 16 characters long with APP_ENV=production"]
        );
        assert!(!err.to_string().contains("short-tok"));
        assert!(production("a-long-enough-webhook-token").is_ok());
    }

    #[test]
    fn dialog360_needs_its_key_and_webhook_token_and_a_valid_header_name() {
        let err = Settings::from_vars(vars(&[
            ("WHATSAPP_PROVIDER", "360dialog"),
            ("WHATSAPP_WEBHOOK_TOKEN_HEADER", "X Webhook: Token"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "WHATSAPP_API_KEY: required",
            "WHATSAPP_WEBHOOK_TOKEN: required",
            "WHATSAPP_WEBHOOK_TOKEN_HEADER: expected an HTTP header name",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }

        let s = Settings::from_vars(vars(&[
            ("WHATSAPP_PROVIDER", "360dialog"),
            ("WHATSAPP_API_KEY", "k"),
            ("WHATSAPP_WEBHOOK_TOKEN", "t"),
        ]))
        .unwrap();
        assert_eq!(s.whatsapp_api_url.as_str(), "https://waba-v2.360dialog.io/");
        assert_eq!(s.whatsapp_webhook_token_header, "X-Webhook-Token");
    }
}
