//! End-to-end test bench: a fresh PostgreSQL database and Redis key prefix per test, fake Meta
//! Cloud API and fake OpenAI-compatible LLM servers on loopback, and Parley started on port 0 —
//! in-process (`TestApp`) or as the real binary (`ParleyProcess`). Servers of their own
//! (`RedisServer`, `PgServer`) for the tests that stop them.
#![allow(dead_code)]

pub mod servers;

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use engine::events::{JsonLinesSink, Level};
use parley::{
    app::{self, App, Role, Running},
    settings::Settings,
    store::{PgStore, SeedTenant, SeededTenant, testing::TestDatabase},
    whatsapp::{meta_signature, signature::META_SIGNATURE_HEADER},
};
use poem::{
    EndpointExt, Route, Server, handler,
    listener::TcpAcceptor,
    post,
    web::{Data, Json, Path},
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

pub const APP_SECRET: &str = "e2e-app-secret";
pub const VERIFY_TOKEN: &str = "e2e-verify-token";
pub const API_KEY: &str = "e2e-meta-api-key";
pub const PHONE_NUMBER_ID: &str = "E2E_PHONE_ID";
/// The test users' numbers: none of them may appear unmasked in the logs.
pub const USER: &str = "33612345678";
pub const OTHER_USER: &str = "33698765432";

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve(route: impl poem::Endpoint + 'static) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
    let task = tokio::spawn(async move {
        let _ = Server::new_with_acceptor(acceptor).run(route).await;
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------------
// Fake Meta Cloud API

#[derive(Default)]
pub struct MetaState {
    /// Every accepted send: (phone_number_id, body).
    pub sent: Mutex<Vec<(String, Value)>>,
    /// Sends refused so far.
    pub refused: Mutex<usize>,
    /// While set, sends answer this (status, Meta error code).
    pub fail_with: Mutex<Option<(u16, i64)>>,
    pub authorization: Mutex<Vec<String>>,
    /// Read receipts (`"status": "read"` bodies), apart from the sends.
    pub read_receipts: Mutex<Vec<Value>>,
    /// Files served by the media API, by media id: (mime type, bytes).
    pub media: Mutex<BTreeMap<String, (String, Vec<u8>)>>,
    /// Every media API request: (path, `Authorization` header).
    pub media_requests: Mutex<Vec<(String, String)>>,
    /// How many of the next media lookups answer 503.
    pub media_unavailable: Mutex<usize>,
}

#[handler]
async fn meta_send(
    Path(phone_number_id): Path<String>,
    req: &poem::Request,
    Json(body): Json<Value>,
    state: Data<&Arc<MetaState>>,
) -> poem::Response {
    let auth = req.header("authorization").unwrap_or_default().to_owned();
    state.authorization.lock().unwrap().push(auth);
    if body["status"] == "read" {
        state.read_receipts.lock().unwrap().push(body);
        return poem::Response::builder().content_type("application/json").body(json!({"success": true}).to_string());
    }
    if let Some((status, code)) = *state.fail_with.lock().unwrap() {
        *state.refused.lock().unwrap() += 1;
        return poem::Response::builder()
            .status(poem::http::StatusCode::from_u16(status).unwrap())
            .content_type("application/json")
            .body(
                json!({"error": {"message": "refused by the fake", "type": "OAuthException", "code": code}})
                    .to_string(),
            );
    }
    let mut sent = state.sent.lock().unwrap();
    sent.push((phone_number_id, body));
    let id = format!("wamid.fake-out-{}", sent.len());
    poem::Response::builder()
        .content_type("application/json")
        .body(json!({"messaging_product": "whatsapp", "contacts": [], "messages": [{"id": id}]}).to_string())
}

impl MetaState {
    /// Records a media API request and returns the file `media_id`, if served.
    fn media_request(&self, req: &poem::Request, media_id: &str) -> Option<(String, Vec<u8>)> {
        let auth = req.header("authorization").unwrap_or_default().to_owned();
        self.media_requests.lock().unwrap().push((req.uri().path().to_owned(), auth));
        self.media.lock().unwrap().get(media_id).cloned()
    }
}

/// Meta's media lookup: `GET /{media_id}` → where to download it, with its type, size and hash.
#[handler]
async fn meta_media_lookup(
    Path(media_id): Path<String>,
    req: &poem::Request,
    state: Data<&Arc<MetaState>>,
) -> poem::Response {
    let media = state.media_request(req, &media_id);
    {
        let mut unavailable = state.media_unavailable.lock().unwrap();
        if *unavailable > 0 {
            *unavailable -= 1;
            return poem::Response::builder().status(poem::http::StatusCode::SERVICE_UNAVAILABLE).body("busy");
        }
    }
    let host = req.header("host").unwrap_or_default().to_owned();
    let Some((mime_type, bytes)) = media else {
        return poem::Response::builder()
            .status(poem::http::StatusCode::BAD_REQUEST)
            .content_type("application/json")
            .body(
                json!({"error": {"message": "Unsupported get request", "type": "GraphMethodException", "code": 100}})
                    .to_string(),
            );
    };
    let sha256 = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    poem::Response::builder().content_type("application/json").body(
        json!({
            "messaging_product": "whatsapp",
            "url": format!("http://{host}/lookaside/{media_id}?ext=1"),
            "mime_type": mime_type,
            "sha256": sha256,
            "file_size": bytes.len(),
            "id": media_id
        })
        .to_string(),
    )
}

/// The download (Meta's `lookaside` host, here the same server).
#[handler]
async fn meta_media_download(
    Path(media_id): Path<String>,
    req: &poem::Request,
    state: Data<&Arc<MetaState>>,
) -> poem::Response {
    match state.media_request(req, &media_id) {
        Some((mime_type, bytes)) => poem::Response::builder().content_type(mime_type).body(bytes),
        None => poem::Response::builder().status(poem::http::StatusCode::NOT_FOUND).finish(),
    }
}

pub struct FakeMeta {
    pub addr: SocketAddr,
    pub state: Arc<MetaState>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeMeta {
    pub async fn start() -> Self {
        let state = Arc::new(MetaState::default());
        let (addr, task) = serve(
            Route::new()
                .at("/:phone_number_id/messages", post(meta_send))
                .at("/:media_id", poem::get(meta_media_lookup))
                .at("/lookaside/:media_id", poem::get(meta_media_download))
                .data(state.clone()),
        )
        .await;
        Self { addr, state, _task: task }
    }

    /// Serves `bytes` as the media `media_id`.
    pub fn add_media(&self, media_id: &str, mime_type: &str, bytes: &[u8]) {
        self.state.media.lock().unwrap().insert(media_id.to_owned(), (mime_type.to_owned(), bytes.to_vec()));
    }

    /// Makes the next `n` media lookups answer 503.
    pub fn media_unavailable_for(&self, n: usize) {
        *self.state.media_unavailable.lock().unwrap() = n;
    }

    /// The media API requests: (path, `Authorization` header).
    pub fn media_requests(&self) -> Vec<(String, String)> {
        self.state.media_requests.lock().unwrap().clone()
    }

    pub fn read_receipts(&self) -> Vec<Value> {
        self.state.read_receipts.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Texts sent, in the order the fake accepted them.
    pub fn texts(&self) -> Vec<String> {
        self.sent().iter().map(|b| b["text"]["body"].as_str().unwrap_or_default().to_owned()).collect()
    }

    pub fn sent(&self) -> Vec<Value> {
        self.state.sent.lock().unwrap().iter().map(|(_, b)| b.clone()).collect()
    }

    pub fn fail_with(&self, failure: Option<(u16, i64)>) {
        *self.state.fail_with.lock().unwrap() = failure;
    }

    pub async fn wait_for_sends(&self, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(timeout, &format!("{n} message(s) sent to Meta"), || async {
            let sent = self.sent();
            (sent.len() >= n).then_some(sent)
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Fake OpenAI-compatible LLM

#[derive(Default)]
pub struct LlmState {
    pub requests: Mutex<Vec<Value>>,
    pub delay: Mutex<Duration>,
}

#[handler]
async fn chat_completions(Json(body): Json<Value>, state: Data<&Arc<LlmState>>) -> Json<Value> {
    state.requests.lock().unwrap().push(body.clone());
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let question = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    Json(json!({
        "id": "chatcmpl-e2e",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": format!("Réponse à « {question} »")}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    }))
}

pub struct FakeLlm {
    pub addr: SocketAddr,
    pub state: Arc<LlmState>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeLlm {
    pub async fn start() -> Self {
        let state = Arc::new(LlmState::default());
        let (addr, task) =
            serve(Route::new().at("/v1/chat/completions", post(chat_completions)).data(state.clone())).await;
        Self { addr, state, _task: task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
}

// ---------------------------------------------------------------------------------------------
// Captured event lines

#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Every JSON line with an `event` field, in order.
    pub fn events(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("event").is_some())
            .collect()
    }

    pub fn named(&self, name: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == name).collect()
    }

    /// The events about one inbound message, by name, in order.
    pub fn names_for(&self, provider_message_id: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e["providerMessageId"] == provider_message_id)
            .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub async fn wait_for(&self, name: &str, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(timeout, &format!("{n} `{name}` event(s)"), || async {
            let found = self.named(name);
            (found.len() >= n).then_some(found)
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Webhook bodies

/// A Meta webhook body with the given messages `(from, wamid, text)`, all to one business number.
pub fn webhook_body(phone_number_id: &str, messages: &[(&str, &str, &str)]) -> String {
    let msgs: Vec<Value> = messages
        .iter()
        .map(|(from, id, text)| {
            json!({"from": from, "id": id, "timestamp": chrono::Utc::now().timestamp().to_string(), "type": "text", "text": {"body": text}})
        })
        .collect();
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "WABA_ID",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone_number_id},
                    "contacts": messages.iter().map(|(from, _, _)| json!({"profile": {"name": "Client"}, "wa_id": from})).collect::<Vec<_>>(),
                    "messages": msgs
                }
            }]
        }]
    })
    .to_string()
}

/// A body with delivery statuses only.
pub fn status_body(phone_number_id: &str, statuses: &[(&str, &str)]) -> String {
    let st: Vec<Value> = statuses
        .iter()
        .map(|(id, status)| json!({"id": id, "status": status, "timestamp": chrono::Utc::now().timestamp().to_string(), "recipient_id": USER}))
        .collect();
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA_ID", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone_number_id},
            "statuses": st
        }}]}]
    })
    .to_string()
}

pub fn sign(body: &str) -> String {
    meta_signature(&SecretString::from(APP_SECRET), body.as_bytes())
}

/// Posts a body to a webhook URL, signed unless `signature` overrides it.
pub async fn post_webhook(base: &str, body: &str, signature: Option<&str>) -> (u16, String) {
    let sig = signature.map(str::to_owned).unwrap_or_else(|| sign(body));
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/whatsapp/webhook"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if !sig.is_empty() {
        req = req.header(META_SIGNATURE_HEADER, sig);
    }
    let resp = req.send().await.expect("webhook reachable");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Parley under test

/// What a test changes from the defaults.
pub struct Options {
    pub pipeline: String,
    /// The tenant's monthly message limit.
    pub monthly_messages: Option<i64>,
    pub plan: Option<String>,
    pub redis_url: String,
    /// Use this database instead of a fresh one on the shared server (for a server of the test's own).
    pub database: Option<(SecretString, PgStore)>,
    pub extra_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pipeline: std::fs::read_to_string("pipelines/whatsapp.toml").expect("the shipped pipeline"),
            monthly_messages: None,
            plan: None,
            redis_url: "redis://127.0.0.1:6379".into(),
            database: None,
            extra_env: Vec::new(),
        }
    }
}

/// The shared set-up of in-process and subprocess runs.
pub struct Environment {
    pub meta: FakeMeta,
    pub llm: FakeLlm,
    pub db: Option<TestDatabase>,
    pub database_url: SecretString,
    pub store: PgStore,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub pipeline_path: PathBuf,
    pub tenant: SeededTenant,
    pub vars: BTreeMap<String, String>,
}

impl Environment {
    pub async fn new(options: &Options) -> Self {
        stages::link();
        let meta = FakeMeta::start().await;
        let llm = FakeLlm::start().await;
        let (db, database_url, store) = match &options.database {
            Some((url, store)) => (None, url.clone(), store.clone()),
            None => {
                let db = TestDatabase::create().await;
                let url = db.url.clone();
                let store = PgStore::new(db.pool.clone());
                (Some(db), url, store)
            }
        };
        let tenant = store
            .seed_tenant(&SeedTenant {
                name: format!("e2e-{}", uuid::Uuid::new_v4()),
                phone_number_id: PHONE_NUMBER_ID.into(),
                plan: options.plan.clone(),
                monthly_messages: options.monthly_messages,
                provider: "meta".into(),
            })
            .await
            .expect("seed the test tenant");
        let dir = tempfile::tempdir().unwrap();
        let pipeline_path = dir.path().join("whatsapp.toml");
        std::fs::write(&pipeline_path, &options.pipeline).unwrap();
        let prefix = format!("parley-e2e-{}", uuid::Uuid::new_v4().simple());
        let mut vars: BTreeMap<String, String> = [
            ("DATABASE_URL", database_url.expose_secret().to_owned()),
            ("REDIS_URL", options.redis_url.clone()),
            ("QUEUE_PREFIX", prefix.clone()),
            ("QUEUE_SHARDS", "4".into()),
            ("PIPELINE_FILE", pipeline_path.display().to_string()),
            ("MIGRATE_ON_START", "false".into()),
            ("WHATSAPP_PROVIDER", "meta".into()),
            ("WHATSAPP_API_URL", meta.url()),
            ("WHATSAPP_API_KEY", API_KEY.into()),
            ("WHATSAPP_APP_SECRET", APP_SECRET.into()),
            ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into()),
            ("LLM_PROVIDER", "openai".into()),
            ("LLM_BASE_URL", llm.url()),
            ("LLM_MODEL", "e2e-model".into()),
            ("JOB_BACKOFF_BASE", "200ms".into()),
            ("JOB_BACKOFF_MAX", "1s".into()),
            ("JOB_MAX_ATTEMPTS", "30".into()),
            ("LOG_LEVEL", "debug".into()),
            ("HOST", "127.0.0.1".into()),
            ("PORT", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in &options.extra_env {
            vars.insert(k.clone(), v.clone());
        }
        Self { meta, llm, db, database_url, store, prefix, dir, pipeline_path, tenant, vars }
    }

    pub fn settings(&self) -> Settings {
        Settings::from_vars(self.vars.clone()).unwrap_or_else(|e| panic!("test settings: {e}"))
    }

    /// Deletes the queue's keys and the test database.
    pub async fn cleanup(self, redis_url: &str) {
        if let Ok(client) = redis::Client::open(redis_url)
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{}:*", self.prefix)).query_async(&mut conn).await.unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
        if let Some(db) = self.db {
            db.drop_database().await;
        }
    }
}

/// Parley started in-process (api and workers), its events captured.
pub struct TestApp {
    pub env: Environment,
    pub base: String,
    pub app: App,
    pub events: Captured,
    running: Option<Running>,
    redis_url: String,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let env = Environment::new(&options).await;
        let events = Captured::default();
        let sink = Arc::new(JsonLinesSink::new(Box::new(events.clone()), Level::Debug));
        // The HTTP server on threads of its own (`parley api`'s default), so that the scenarios run
        // through them too; the `serve` processes of the other tests use the process's runtime.
        let mut settings = env.settings();
        settings.http_threads = Some(2);
        let app = App::build(settings, sink).await.expect("build the app");
        let running = app::start(app.clone(), Role::Serve, "127.0.0.1:0".parse().unwrap(), format!("w-{}", env.prefix))
            .await
            .expect("start the app");
        let base = format!("http://{}", running.addr.expect("an HTTP address"));
        Self { env, base, app, events, running: Some(running), redis_url: options.redis_url }
    }

    pub async fn post(&self, body: &str) -> (u16, String) {
        post_webhook(&self.base, body, None).await
    }

    /// Sends one text message from `from` and returns the webhook's status.
    pub async fn send_text(&self, from: &str, wamid: &str, text: &str) -> u16 {
        self.post(&webhook_body(PHONE_NUMBER_ID, &[(from, wamid, text)])).await.0
    }

    pub fn meta(&self) -> &FakeMeta {
        &self.env.meta
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(self.env.store.pool()).await.expect(sql)
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        self.env.cleanup(&self.redis_url).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary

pub struct ParleyProcess {
    pub child: tokio::process::Child,
    pub output: Captured,
    pub addr: Option<SocketAddr>,
}

impl ParleyProcess {
    /// Starts `parley <role>` with the environment's variables (and a free port for roles with
    /// HTTP); its stdout and stderr are captured.
    pub async fn start(env: &Environment, role: &str) -> Self {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"));
        cmd.arg(role).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        cmd.env("PORT", port.to_string()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn parley");
        let output = Captured::default();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, output.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, output.clone()));
        }
        let addr: Option<SocketAddr> = (role != "worker").then(|| format!("127.0.0.1:{port}").parse().unwrap());
        if let Some(addr) = addr {
            eventually(Duration::from_secs(20), "parley to listen", || async {
                tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
            })
            .await;
        }
        Self { child, output, addr }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr.expect("a process with HTTP"))
    }

    /// SIGKILL: no chance to finish anything.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait for the exit.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await.ok().and_then(Result::ok)
    }
}

async fn pump<R: tokio::io::AsyncRead + Unpin>(mut from: R, mut into: Captured) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let _ = into.write_all(&buf[..n]);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
