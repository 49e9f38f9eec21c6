//! Google service-account authentication for Vertex AI: the key file named by
//! `GOOGLE_APPLICATION_CREDENTIALS`, and a token source that trades a signed assertion for an
//! OAuth access token at the file's `token_uri` (the JWT bearer grant, RFC 7523), caches it, and
//! refreshes it shortly before it expires — once, however many calls are waiting.
//!
//! Why not the `gcp_auth` crate: it honours the file's `token_uri`, but under concurrency every
//! caller that finds the token expired fetches a new one (it does not check again after taking its
//! lock), its HTTP client has no timeouts and bypasses Parley's one client builder, its errors do
//! not tell a revoked key (permanent) from an unreachable endpoint (retryable), and it retries
//! refused grants. The part that needs a maintained crate — the RS256 signature — is done by
//! `jsonwebtoken` (ring underneath); the rest is one form POST.

use std::{
    path::Path,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use engine::{events::Event, masking::mask_phones_in, ports::PortError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use super::{
    http_client::{transport_error, truncate},
    retry::{AttemptError, Retries},
};

/// The service name in this module's errors and events.
pub const SERVICE: &str = "google_oauth";

/// The scope Vertex AI accepts.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Google's token endpoint, for a key file that names none.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Google accepts assertions valid for at most an hour.
const ASSERTION_LIFETIME_SECS: i64 = 3600;

/// A token is replaced this long before it expires: calls in flight never carry an expired one,
/// and the replacement is fetched in the background while the current one still serves.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The key file could not be used. Messages name the file and the problem, never the key.
#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    #[error("GOOGLE_APPLICATION_CREDENTIALS: cannot read `{path}`: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("GOOGLE_APPLICATION_CREDENTIALS: `{path}` is not a usable service-account key file: {reason}")]
    Invalid { path: String, reason: String },
}

/// The fields of a service-account key file that the token flow uses.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

/// A parsed service-account key: who signs, with what key, and where tokens come from.
pub struct ServiceAccount {
    client_email: String,
    key_id: Option<String>,
    key: EncodingKey,
    token_uri: Url,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri.as_str())
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Reads and checks a key file, signing a first assertion so that a broken key is reported at
    /// start-up rather than on the first message.
    pub fn from_file(path: &Path) -> Result<Self, ServiceAccountError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServiceAccountError::Unreadable { path: shown.clone(), reason: e.to_string() })?;
        Self::from_json(&text).map_err(|reason| ServiceAccountError::Invalid { path: shown, reason })
    }

    /// Parses a key file's content; the error says what is wrong, without quoting the content.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let file: KeyFile = serde_json::from_str(text).map_err(|e| {
            // serde's message may quote a value: keep only where it failed.
            format!("not valid JSON (line {}, column {})", e.line(), e.column())
        })?;
        if let Some(kind) = file.kind.as_deref().filter(|k| *k != "service_account") {
            return Err(format!("its type is `{kind}`, expected `service_account`"));
        }
        if file.client_email.trim().is_empty() {
            return Err("`client_email` is missing".into());
        }
        if file.private_key.trim().is_empty() {
            return Err("`private_key` is missing".into());
        }
        let key = EncodingKey::from_rsa_pem(file.private_key.as_bytes())
            .map_err(|_| "`private_key` is not an RSA private key in PEM form".to_owned())?;
        let token_uri = file.token_uri.as_deref().filter(|u| !u.trim().is_empty()).unwrap_or(DEFAULT_TOKEN_URI);
        let token_uri = Url::parse(token_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| format!("`token_uri` is not an http(s) URL: `{token_uri}`"))?;
        let account = Self { client_email: file.client_email, key_id: file.private_key_id, key, token_uri };
        account
            .assertion(chrono::Utc::now().timestamp())
            .map_err(|_| "`private_key` cannot sign (RS256)".to_owned())?;
        Ok(account)
    }

    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    pub fn token_uri(&self) -> &Url {
        &self.token_uri
    }

    /// The signed JWT that the token endpoint trades for an access token.
    fn assertion(&self, now: i64) -> Result<String, jsonwebtoken::errors::Error> {
        #[derive(Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            scope: &'a str,
            aud: &'a str,
            iat: i64,
            exp: i64,
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: CLOUD_PLATFORM_SCOPE,
            aud: self.token_uri.as_str(),
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
    }
}

/// Hands out an access token for a service account. Cheap to clone: clones share the token.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    account: ServiceAccount,
    client: reqwest::Client,
    retries: Retries,
    refresh_margin: Duration,
    current: RwLock<Option<CachedToken>>,
    /// Held by whoever fetches a token, so that only one fetch runs at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// A background refresh is scheduled or running.
    background_refresh: AtomicBool,
}

#[derive(Clone)]
struct CachedToken {
    token: SecretString,
    expires_at: Instant,
}

impl CachedToken {
    fn valid(&self) -> bool {
        // A token about to expire would expire on its way.
        self.expires_at.saturating_duration_since(Instant::now()) > Duration::from_secs(10)
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("account", &self.inner.account).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct TokenRefusal {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

impl TokenSource {
    /// `client` should come from [`super::http_client::build`] with [`super::http_client::HttpTimeouts::OAUTH`].
    pub fn new(account: ServiceAccount, client: reqwest::Client, retries: Retries) -> Self {
        Self::with_refresh_margin(account, client, retries, DEFAULT_REFRESH_MARGIN)
    }

    pub fn with_refresh_margin(
        account: ServiceAccount,
        client: reqwest::Client,
        retries: Retries,
        refresh_margin: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                account,
                client,
                retries,
                refresh_margin,
                current: RwLock::new(None),
                refreshing: tokio::sync::Mutex::new(()),
                background_refresh: AtomicBool::new(false),
            }),
        }
    }

    /// A valid access token. The cached one while it is not due for refresh; when it is due but
    /// still valid, the cached one too, while one background task fetches the next; without a
    /// valid one, the caller waits for the one fetch in progress (or starts it).
    pub async fn token(&self) -> Result<SecretString, PortError> {
        if let Some(cached) = self.cached() {
            if cached.expires_at.saturating_duration_since(Instant::now()) > self.inner.refresh_margin {
                return Ok(cached.token);
            }
            if cached.valid() {
                self.refresh_in_background();
                return Ok(cached.token);
            }
        }
        let _one_fetch = self.inner.refreshing.lock().await;
        // Another caller may have fetched it while this one waited.
        if let Some(cached) = self.cached().filter(CachedToken::valid) {
            return Ok(cached.token);
        }
        self.fetch_and_store().await
    }

    /// Forgets `rejected` (a token the API answered 401 to), so that the next call fetches a new
    /// one; a token fetched since by another caller is kept.
    pub fn invalidate(&self, rejected: &SecretString) {
        let mut current = self.inner.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| c.token.expose_secret() == rejected.expose_secret()) {
            *current = None;
        }
    }

    fn cached(&self) -> Option<CachedToken> {
        self.inner.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts one background refresh unless one is already under way. In a task of its own, so
    /// that a caller cancelled by its stage's timeout does not cancel the refresh with it.
    fn refresh_in_background(&self) {
        if self.inner.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _one_fetch = this.inner.refreshing.lock().await;
            // A caller without a valid token may have fetched one while this task waited.
            let due = this
                .cached()
                .is_none_or(|c| c.expires_at.saturating_duration_since(Instant::now()) <= this.inner.refresh_margin);
            if due && let Err(error) = this.fetch_and_store().await {
                // The current token still serves; the next call schedules another try.
                tracing::warn!(%error, "the Vertex AI access token could not be refreshed in advance");
            }
            this.inner.background_refresh.store(false, Ordering::Release);
        });
    }

    async fn fetch_and_store(&self) -> Result<SecretString, PortError> {
        let fetched = self
            .inner
            .retries
            .run(&|event: Event| event.with("tokenUri", self.inner.account.token_uri.as_str()), |timeout| async move {
                self.fetch(timeout).await.map_err(AttemptError::idempotent)
            })
            .await?;
        *self.inner.current.write().unwrap_or_else(|p| p.into_inner()) = Some(fetched.clone());
        Ok(fetched.token)
    }

    async fn fetch(&self, timeout: Duration) -> Result<CachedToken, PortError> {
        let account = &self.inner.account;
        let assertion = account.assertion(chrono::Utc::now().timestamp()).map_err(|_| {
            PortError::permanent(SERVICE, Some("signing_failed".into()), "the service-account key cannot sign")
        })?;
        let asked_at = Instant::now();
        let response = self
            .inner
            .client
            .post(account.token_uri.clone())
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", assertion.as_str())])
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport_error(SERVICE, e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| transport_error(SERVICE, e))?;
        if !(200..300).contains(&status) {
            return Err(refusal(status, &bytes));
        }
        let answer: TokenAnswer = serde_json::from_slice(&bytes).map_err(|_| PortError {
            code: Some("invalid_response".into()),
            ..PortError::unavailable(SERVICE, "the token endpoint's answer has no access_token")
        })?;
        if answer.access_token.is_empty() {
            return Err(PortError {
                code: Some("invalid_response".into()),
                ..PortError::unavailable(SERVICE, "the token endpoint answered an empty access_token")
            });
        }
        // Counted from the request, so that the time on the wire shortens the life, never extends it.
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        Ok(CachedToken { token: SecretString::from(answer.access_token), expires_at: asked_at + lifetime })
    }
}

/// A refused grant (400/401/403: a revoked or deleted key, a wrong clock, a disabled account) is
/// permanent; throttling and server errors are retryable.
fn refusal(status: u16, body: &[u8]) -> PortError {
    let parsed = serde_json::from_slice::<TokenRefusal>(body).ok();
    let code = parsed.as_ref().and_then(|r| r.error.clone()).filter(|c| !c.is_empty());
    let text = match parsed.as_ref().and_then(|r| r.error_description.clone()) {
        Some(description) => description,
        None => truncate(&String::from_utf8_lossy(body), 200),
    };
    let message =
        if text.trim().is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {}", text.trim()) };
    let message = truncate(&mask_phones_in(&message), 400);
    let code = Some(code.unwrap_or_else(|| format!("http_{status}")));
    match status {
        408 | 429 | 500..=599 => PortError { code, ..PortError::unavailable(SERVICE, message) },
        _ => PortError::permanent(SERVICE, code, message),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use engine::{
        events::{MemoryEvents, names},
        ports::PortErrorKind,
    };
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::{Value, json};

    use super::*;
    use crate::providers::{
        fake_http::{FakeReply, FakeServer, Recorded},
        http_client::{self, HttpTimeouts},
        retry::RetryPolicy,
    };

    /// A key generated for these tests only (`openssl genpkey -algorithm RSA`); it authenticates
    /// nothing anywhere.
    pub(crate) const TEST_ONLY_PRIVATE_KEY: &str = include_str!("testdata/test-only-service-account-key.pem");
    const TEST_ONLY_PUBLIC_KEY: &str = include_str!("testdata/test-only-service-account-key.pub.pem");
    pub(crate) const CLIENT_EMAIL: &str = "parley-test@parley-test-project.iam.gserviceaccount.com";

    /// A key file as Google issues them, pointing at `token_uri`.
    pub(crate) fn key_file(token_uri: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": "parley-test-project",
            "private_key_id": "test-key-id-1",
            "private_key": TEST_ONLY_PRIVATE_KEY,
            "client_email": CLIENT_EMAIL,
            "client_id": "123456789",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })
        .to_string()
    }

    pub(crate) fn granted(token: &str, expires_in: u64) -> FakeReply {
        FakeReply::Json(200, json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}))
    }

    pub(crate) fn source_for(server: &FakeServer, margin: Duration, events: &MemoryEvents) -> TokenSource {
        let account = ServiceAccount::from_json(&key_file(server.base("/token").as_str())).expect("test key file");
        TokenSource::with_refresh_margin(
            account,
            http_client::build(HttpTimeouts::OAUTH).expect("client"),
            Retries::new(RetryPolicy::fast(HttpTimeouts::OAUTH.total), Arc::new(events.clone())),
            margin,
        )
    }

    fn source(server: &FakeServer) -> TokenSource {
        source_for(server, DEFAULT_REFRESH_MARGIN, &MemoryEvents::new())
    }

    fn form(request: &Recorded) -> HashMap<String, String> {
        url::form_urlencoded::parse(request.raw.as_bytes()).into_owned().collect()
    }

    #[tokio::test]
    async fn a_signed_assertion_is_traded_for_a_token_at_the_files_token_uri() {
        let server = FakeServer::start(granted("ya29.first", 3600)).await;

        let token = source(&server).token().await.expect("token");

        assert_eq!(token.expose_secret(), "ya29.first");
        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/token");
        assert_eq!(request.header("content-type"), Some("application/x-www-form-urlencoded"));
        let form = form(&request);
        assert_eq!(form.get("grant_type").map(String::as_str), Some("urn:ietf:params:oauth:grant-type:jwt-bearer"));

        // The assertion verifies with the account's public key and says who asks for what.
        let token_uri = server.base("/token").to_string();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&token_uri]);
        validation.set_issuer(&[CLIENT_EMAIL]);
        let key = DecodingKey::from_rsa_pem(TEST_ONLY_PUBLIC_KEY.as_bytes()).expect("public key");
        let decoded = jsonwebtoken::decode::<Value>(&form["assertion"], &key, &validation).expect("valid RS256 JWT");
        assert_eq!(decoded.header.kid.as_deref(), Some("test-key-id-1"));
        assert_eq!(decoded.claims["scope"], CLOUD_PLATFORM_SCOPE);
        let (iat, exp) = (decoded.claims["iat"].as_i64().unwrap(), decoded.claims["exp"].as_i64().unwrap());
        assert_eq!(exp - iat, 3600, "Google accepts at most an hour");
    }

    #[tokio::test]
    async fn the_token_is_reused_until_it_is_due_for_refresh() {
        let server = FakeServer::start(granted("ya29.cached", 3600)).await;
        let source = source(&server);

        for _ in 0..5 {
            assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.cached");
        }

        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let server = FakeServer::start(granted("ya29.shared", 3600)).await;
        let source = source(&server);

        let calls = (0..20).map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.token().await })
        });
        for call in calls {
            assert_eq!(call.await.expect("task").expect("token").expose_secret(), "ya29.shared");
        }

        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_token_due_for_refresh_still_serves_while_the_next_is_fetched_once() {
        // Due at once (an hour of life, a two-hour margin); the next one lasts long enough.
        let server = FakeServer::start_sequence(vec![granted("ya29.old", 3600), granted("ya29.new", 100_000)]).await;
        let source = source_for(&server, Duration::from_secs(7200), &MemoryEvents::new());
        assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.old");

        for _ in 0..5 {
            let token = source.token().await.expect("token");
            assert!(["ya29.old", "ya29.new"].contains(&token.expose_secret()), "never waits for the refresh");
        }
        let mut polls = 0;
        while source.cached().is_none_or(|c| c.token.expose_secret() != "ya29.new") {
            assert!(polls < 500, "the background refresh never landed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            polls += 1;
        }

        assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.new");
        assert_eq!(server.requests().len(), 2, "one fetch, one background refresh");
    }

    #[tokio::test]
    async fn an_expired_token_is_replaced_before_use() {
        // 5 s of life is below the 10 s safety margin: never used, fetched again each time.
        let server = FakeServer::start_sequence(vec![granted("ya29.short", 5), granted("ya29.next", 3600)]).await;
        let source = source(&server);

        assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.short");
        assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.next");
    }

    #[tokio::test]
    async fn a_rejected_token_is_forgotten_and_the_next_call_fetches_another() {
        let server =
            FakeServer::start_sequence(vec![granted("ya29.rejected", 3600), granted("ya29.fresh", 3600)]).await;
        let source = source(&server);
        let rejected = source.token().await.expect("token");

        source.invalidate(&rejected);

        assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.fresh");
        source.invalidate(&SecretString::from("ya29.some-older-token"));
        assert_eq!(source.token().await.expect("token").expose_secret(), "ya29.fresh", "a newer token is kept");
    }

    #[tokio::test]
    async fn a_revoked_key_is_a_permanent_error_that_says_why() {
        let server = FakeServer::start(FakeReply::Json(
            400,
            json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        ))
        .await;

        let error = source(&server).token().await.expect_err("refused");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.service, SERVICE);
        assert_eq!(error.code.as_deref(), Some("invalid_grant"));
        assert!(error.message.contains("Invalid JWT Signature"), "{error}");
        assert_eq!(server.requests().len(), 1, "a refused grant is not asked again");
        let text = format!("{error:?}");
        assert!(!text.contains("PRIVATE KEY") && !text.contains("eyJ"), "no key, no assertion: {text}");
    }

    #[tokio::test]
    async fn an_unavailable_token_endpoint_is_retried_then_retryable() {
        let server = FakeServer::start(FakeReply::Text(503, "unavailable".into())).await;
        let events = MemoryEvents::new();

        let error = source_for(&server, DEFAULT_REFRESH_MARGIN, &events).token().await.expect_err("down");

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(server.requests().len(), 3);
        assert_eq!(events.count(names::PROVIDER_CALL_RETRIED), 2);
    }

    #[test]
    fn a_key_file_without_a_token_uri_uses_googles() {
        let mut file: Value = serde_json::from_str(&key_file("https://unused")).unwrap();
        file.as_object_mut().unwrap().remove("token_uri");

        let account = ServiceAccount::from_json(&file.to_string()).expect("valid");

        assert_eq!(account.token_uri().as_str(), DEFAULT_TOKEN_URI);
        assert_eq!(account.client_email(), CLIENT_EMAIL);
        assert!(!format!("{account:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn broken_key_files_are_refused_with_the_reason_and_without_the_key() {
        let good: Value = serde_json::from_str(&key_file("https://oauth2.googleapis.com/token")).unwrap();
        let with = |key: &str, value: Value| {
            let mut file = good.clone();
            file[key] = value;
            file.to_string()
        };
        let cases = [
            ("{not json".to_owned(), "not valid JSON"),
            (with("type", json!("authorized_user")), "expected `service_account`"),
            (with("client_email", json!("")), "`client_email` is missing"),
            (with("private_key", json!("")), "`private_key` is missing"),
            (
                with("private_key", json!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")),
                "`private_key`",
            ),
            (with("token_uri", json!("ftp://tokens")), "`token_uri` is not an http(s) URL"),
        ];
        for (text, expected) in cases {
            let error = ServiceAccount::from_json(&text).expect_err(expected);
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
            assert!(!error.contains("MII"), "no key material in {error:?}");
        }
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let error = ServiceAccount::from_file(Path::new("/nonexistent/parley-sa.json")).expect_err("missing");

        assert!(
            error.to_string().starts_with("GOOGLE_APPLICATION_CREDENTIALS: cannot read `/nonexistent/parley-sa.json`")
        );
    }
}
