//! The HTTP surface as a provider, an operator and an admin see it: requests in, status codes,
//! bodies, queued events and logged events out. The queue and the readiness checks are fakes;
//! the reload runs a real `Reloader` on a temporary pipeline file with the built-in stages.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use engine::{
    events::{JsonLinesSink, MemoryEvents, names},
    reload::Reloader,
    testing::TestBench,
};
use poem::{
    Body,
    endpoint::BoxEndpoint,
    http::StatusCode,
    listener::{Acceptor, Listener, TcpListener},
    test::{TestClient, TestResponse},
};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    DependencyState, HttpState, Readiness, ReadyReport,
    auth::{Claims, mint_token, sign},
    routes,
};
use crate::{
    queue::{AcceptedJob, Intake, IntakeError, QueuedEvent},
    settings::{DEV_APP_SECRET, DEV_JWT_SECRET, DEV_VERIFY_TOKEN, Settings},
    whatsapp::meta_signature,
};

const WEBHOOK: &str = "/api/v1/whatsapp/webhook";
const RELOAD: &str = "/api/v1/admin/pipelines/reload";
const USER_PHONE: &str = "33612345678";

#[derive(Default)]
struct FakeIntake {
    accepted: Mutex<Vec<QueuedEvent>>,
    failing: AtomicBool,
    calls: AtomicUsize,
}

impl FakeIntake {
    fn accepted(&self) -> Vec<QueuedEvent> {
        self.accepted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait::async_trait]
impl Intake for FakeIntake {
    async fn accept(&self, events: &[QueuedEvent]) -> Result<Vec<AcceptedJob>, IntakeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(IntakeError {
                redis: "connection refused (redis://:hunter2@cache)".into(),
                postgres: "pool timed out".into(),
            });
        }
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        let jobs = events
            .iter()
            .map(|e| {
                accepted.push(e.clone());
                let shard = e.shard(16);
                AcceptedJob { job_id: format!("stream:{shard}:{}-0", accepted.len()), durable_in: "redis", shard }
            })
            .collect();
        Ok(jobs)
    }
}

struct FakeReadiness(Mutex<ReadyReport>);

impl FakeReadiness {
    fn set(&self, f: impl FnOnce(&mut ReadyReport)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

#[async_trait::async_trait]
impl Readiness for FakeReadiness {
    async fn check(&self) -> ReadyReport {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn healthy() -> ReadyReport {
    ReadyReport {
        postgres: DependencyState::Up,
        redis: DependencyState::Up,
        redis_eviction_policy: Some("noeviction".into()),
        pipeline_generation: Some(3),
        live_workers: Some(2),
        spool_backlog: Some(0),
    }
}

struct Harness {
    client: TestClient<BoxEndpoint<'static>>,
    app: BoxEndpoint<'static>,
    intake: Arc<FakeIntake>,
    readiness: Arc<FakeReadiness>,
    events: MemoryEvents,
}

struct Setup {
    vars: Vec<(&'static str, &'static str)>,
    reloader: Option<Arc<Reloader>>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Setup {
    fn new() -> Self {
        Self { vars: Vec::new(), reloader: None, metrics: None }
    }

    fn var(mut self, name: &'static str, value: &'static str) -> Self {
        self.vars.push((name, value));
        self
    }

    fn reloader(mut self, reloader: Arc<Reloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }

    fn build(self) -> Harness {
        let vars: BTreeMap<String, String> = self.vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let settings = Settings::from_vars(vars).unwrap();
        let intake = Arc::new(FakeIntake::default());
        let readiness = Arc::new(FakeReadiness(Mutex::new(healthy())));
        let events = MemoryEvents::new();
        let state = HttpState {
            settings: Arc::new(settings),
            intake: intake.clone(),
            events: Arc::new(events.clone()),
            readiness: readiness.clone(),
            reloader: self.reloader,
            metrics: self.metrics,
            reload_broadcast: None,
            channel_credentials: None,
            knowledge: None,
        };
        let client = TestClient::new(routes(state.clone()));
        Harness { client, app: routes(state), intake, readiness, events }
    }
}

fn harness() -> Harness {
    Setup::new().build()
}

fn dev_app_secret() -> SecretString {
    SecretString::from(DEV_APP_SECRET.to_owned())
}

fn jwt_secret() -> SecretString {
    SecretString::from(DEV_JWT_SECRET.to_owned())
}

fn text_message(from: &str, id: &str, text: &str) -> Value {
    json!({"from": from, "id": id, "timestamp": "1699999999", "type": "text", "text": {"body": text}})
}

fn webhook_body(entries: Vec<Value>) -> Vec<u8> {
    json!({"object": "whatsapp_business_account", "entry": entries}).to_string().into_bytes()
}

fn entry(phone_number_id: &str, messages: Vec<Value>, statuses: Vec<Value>) -> Value {
    json!({"id": "WABA", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15551234567", "phone_number_id": phone_number_id},
        "contacts": [{"profile": {"name": "John Doe"}, "wa_id": USER_PHONE}],
        "messages": messages,
        "statuses": statuses
    }}]})
}

fn one_text_body(id: &str) -> Vec<u8> {
    webhook_body(vec![entry("PNID", vec![text_message(USER_PHONE, id, "Bonjour")], vec![])])
}

async fn post_signed(h: &Harness, body: Vec<u8>) -> TestResponse {
    let signature = meta_signature(&dev_app_secret(), &body);
    h.client
        .post(WEBHOOK)
        .header("X-Hub-Signature-256", signature)
        .content_type("application/json")
        .body(body)
        .send()
        .await
}

async fn status_and_json(resp: TestResponse) -> (StatusCode, Value) {
    let status = resp.0.status();
    let text = resp.0.into_body().into_string().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

// --- the subscription check ----------------------------------------------------------------

#[tokio::test]
async fn meta_verification_echoes_the_challenge_with_the_right_token() {
    let h = harness();
    let resp = h
        .client
        .get(WEBHOOK)
        .query("hub.mode", &"subscribe")
        .query("hub.verify_token", &DEV_VERIFY_TOKEN)
        .query("hub.challenge", &"test_challenge_123")
        .send()
        .await;
    resp.assert_status_is_ok();
    resp.assert_content_type("text/plain; charset=utf-8");
    resp.assert_text("test_challenge_123").await;
}

#[tokio::test]
async fn meta_verification_with_a_wrong_token_or_mode_is_forbidden() {
    let h = harness();
    for (mode, token) in [("subscribe", "wrong-token"), ("unsubscribe", DEV_VERIFY_TOKEN), ("subscribe", "")] {
        let resp = h
            .client
            .get(WEBHOOK)
            .query("hub.mode", &mode)
            .query("hub.verify_token", &token)
            .query("hub.challenge", &"c")
            .send()
            .await;
        resp.assert_status(StatusCode::FORBIDDEN);
    }
    h.client.get(WEBHOOK).send().await.assert_status(StatusCode::FORBIDDEN);
}

// --- authentication ------------------------------------------------------------------------

#[tokio::test]
async fn an_unsigned_notification_is_unauthorized_and_nothing_is_queued() {
    let h = harness();
    let resp = h.client.post(WEBHOOK).content_type("application/json").body(one_text_body("wamid.1")).send().await;
    let (status, body) = status_and_json(resp).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({"error": "invalid signature"}));
    assert_eq!(h.intake.calls.load(Ordering::SeqCst), 0);
    assert!(h.events.all().is_empty());
}

#[tokio::test]
async fn a_tampered_notification_is_unauthorized() {
    let h = harness();
    let body = one_text_body("wamid.1");
    let signature = meta_signature(&dev_app_secret(), &body);
    let tampered = String::from_utf8(body).unwrap().replace("Bonjour", "Bonsoir");
    let resp = h.client.post(WEBHOOK).header("X-Hub-Signature-256", signature).body(tampered).send().await;
    let (status, body) = status_and_json(resp).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({"error": "invalid signature"}));
    assert!(h.intake.accepted().is_empty());
}

#[tokio::test]
async fn a_signed_notification_is_accepted_and_its_message_queued() {
    let h = harness();
    let (status, body) = status_and_json(post_signed(&h, one_text_body("wamid.ok")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok"}));
    let accepted = h.intake.accepted();
    assert_eq!(accepted.len(), 1);
    let QueuedEvent::Message(m) = &accepted[0] else { panic!("expected a message: {accepted:?}") };
    assert_eq!(m.provider_message_id, "wamid.ok");
    assert_eq!(m.phone_number_id, "PNID");
    assert_eq!(m.text.as_deref(), Some("Bonjour"));
    assert_eq!(
        h.events.names(),
        [names::MESSAGE_RECEIVED, names::JOB_ADDED],
        "message_received comes before job_added"
    );
    let job = &h.events.named(names::JOB_ADDED)[0];
    assert_eq!(job.field("providerMessageId"), Some(&json!("wamid.ok")));
    assert_eq!(job.field("durableIn"), Some(&json!("redis")));
    assert_eq!(job.field("shard"), Some(&json!(accepted[0].shard(16))));
    assert!(job.field("jobId").and_then(Value::as_str).is_some_and(|id| id.starts_with("stream:")));
}

#[tokio::test]
async fn a_360dialog_notification_authenticates_with_the_shared_header_token() {
    let h = Setup::new()
        .var("WHATSAPP_PROVIDER", "360dialog")
        .var("WHATSAPP_API_KEY", "d360-key")
        .var("WHATSAPP_WEBHOOK_TOKEN", "shared-webhook-token")
        .var("WHATSAPP_WEBHOOK_TOKEN_HEADER", "X-Parley-Token")
        .build();
    let body = one_text_body("wamid.d360");
    for token in [None, Some("wrong-token")] {
        let mut req = h.client.post(WEBHOOK).body(body.clone());
        if let Some(token) = token {
            req = req.header("X-Parley-Token", token);
        }
        let (status, json) = status_and_json(req.send().await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(json, json!({"error": "invalid token"}));
    }
    // No signature needed: 360dialog does not sign with our secret.
    let resp = h.client.post(WEBHOOK).header("X-Parley-Token", "shared-webhook-token").body(body).send().await;
    resp.assert_status_is_ok();
    assert_eq!(h.intake.accepted().len(), 1);
}

// --- body size and shape -------------------------------------------------------------------

fn oversized_body() -> Vec<u8> {
    // A valid webhook just over the limit, so that only its size is wrong.
    let padding = "x".repeat(super::webhook::MAX_BODY_BYTES);
    webhook_body(vec![entry("PNID", vec![text_message(USER_PHONE, "wamid.big", &padding)], vec![])])
}

#[tokio::test]
async fn an_oversized_body_is_refused_from_its_content_length() {
    let h = harness();
    let body = oversized_body();
    let signature = meta_signature(&dev_app_secret(), &body);
    let resp = h
        .client
        .post(WEBHOOK)
        .header("X-Hub-Signature-256", signature)
        .header("Content-Length", body.len())
        .body(body)
        .send()
        .await;
    let (status, json) = status_and_json(resp).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json, json!({"error": "body larger than 3 MiB"}));
    assert!(h.intake.accepted().is_empty());
}

#[tokio::test]
async fn an_oversized_body_without_content_length_is_refused_while_reading() {
    let h = harness();
    let body = oversized_body();
    let signature = meta_signature(&dev_app_secret(), &body);
    let resp = h
        .client
        .post(WEBHOOK)
        .header("X-Hub-Signature-256", signature)
        .body(Body::from_async_read(std::io::Cursor::new(body)))
        .send()
        .await;
    resp.assert_status(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(h.intake.accepted().is_empty());
}

#[tokio::test]
async fn a_body_of_exactly_the_limit_is_read() {
    let h = harness();
    let mut body = one_text_body("wamid.edge");
    // JSON allows trailing whitespace: pad a valid body to exactly 3 MiB.
    body.resize(super::webhook::MAX_BODY_BYTES, b' ');
    post_signed(&h, body).await.assert_status_is_ok();
    assert_eq!(h.intake.accepted().len(), 1);
}

#[tokio::test]
async fn garbage_is_a_bad_request_with_the_reason() {
    let h = harness();
    let (status, json) = status_and_json(post_signed(&h, b"<xml>not json</xml>".to_vec()).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json, json!({"error": "body is not valid JSON"}));
}

#[tokio::test]
async fn json_without_an_entry_array_is_a_bad_request() {
    let h = harness();
    let body = json!({"object": "whatsapp_business_account"}).to_string().into_bytes();
    let (status, json) = status_and_json(post_signed(&h, body).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json, json!({"error": "`entry` is missing or not an array"}));
    let (status, _) = status_and_json(post_signed(&h, b"[]".to_vec()).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(h.intake.accepted().is_empty());
}

// --- every event of a body -----------------------------------------------------------------

#[tokio::test]
async fn three_messages_in_two_entries_are_three_queued_messages() {
    let h = harness();
    let body = webhook_body(vec![
        entry(
            "PNID",
            vec![text_message("33600000001", "wamid.1", "un"), text_message("33600000002", "wamid.2", "deux")],
            vec![],
        ),
        entry("PNID2", vec![text_message("33600000003", "wamid.3", "trois")], vec![]),
    ]);
    post_signed(&h, body).await.assert_status_is_ok();
    let ids: Vec<String> = h.intake.accepted().iter().map(|e| e.provider_message_id().to_owned()).collect();
    assert_eq!(ids, ["wamid.1", "wamid.2", "wamid.3"]);
    assert_eq!(h.events.count(names::MESSAGE_RECEIVED), 3);
    assert_eq!(h.events.count(names::JOB_ADDED), 3);
}

#[tokio::test]
async fn a_statuses_only_body_is_accepted_and_queues_status_events_only() {
    let h = harness();
    let statuses = vec![
        json!({"id": "wamid.out1", "status": "delivered", "timestamp": "1700000001", "recipient_id": USER_PHONE}),
        json!({"id": "wamid.out1", "status": "read", "timestamp": "1700000002", "recipient_id": USER_PHONE}),
    ];
    let (status, json) =
        status_and_json(post_signed(&h, webhook_body(vec![entry("PNID", vec![], statuses)])).await).await;
    assert_eq!((status, json), (StatusCode::OK, json!({"status": "ok"})));
    let accepted = h.intake.accepted();
    assert_eq!(accepted.len(), 2);
    assert!(accepted.iter().all(|e| matches!(e, QueuedEvent::Status(_))), "{accepted:?}");
    assert_eq!(h.events.count(names::MESSAGE_RECEIVED), 0, "a status is not a received message");
}

#[tokio::test]
async fn a_malformed_message_is_skipped_and_the_rest_of_the_body_accepted() {
    let h = harness();
    let body = webhook_body(vec![entry(
        "PNID",
        vec![
            json!({"from": USER_PHONE, "type": "text", "text": {"body": "no id"}}),
            text_message(USER_PHONE, "wamid.good", "ok"),
        ],
        vec![],
    )]);
    post_signed(&h, body).await.assert_status_is_ok();
    let ids: Vec<String> = h.intake.accepted().iter().map(|e| e.provider_message_id().to_owned()).collect();
    assert_eq!(ids, ["wamid.good"]);
}

#[tokio::test]
async fn a_body_with_nothing_to_do_is_accepted_without_touching_the_queue() {
    let h = harness();
    let body = webhook_body(vec![json!({"id": "WABA", "changes": [{"field": "account_update", "value": {}}]})]);
    post_signed(&h, body).await.assert_status_is_ok();
    assert_eq!(h.intake.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_intake_failure_is_a_500_that_reveals_nothing() {
    let h = harness();
    h.intake.failing.store(true, Ordering::SeqCst);
    let (status, json) = status_and_json(post_signed(&h, one_text_body("wamid.retry-me")).await).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(json, json!({"error": "temporarily unable to accept the events"}));
    assert_eq!(h.events.count(names::JOB_ADDED), 0);
}

#[tokio::test]
async fn message_received_names_the_sender_by_masked_number_only() {
    let h = harness();
    let body = webhook_body(vec![entry(
        "PNID",
        vec![json!({"from": USER_PHONE, "id": "wamid.audio", "type": "audio", "audio": {"id": "MEDIA"}})],
        vec![],
    )]);
    post_signed(&h, body).await.assert_status_is_ok();
    let received = h.events.named(names::MESSAGE_RECEIVED);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].field("from"), Some(&json!("3361XXXXX78")));
    assert_eq!(received[0].field("messageType"), Some(&json!("audio")));
    assert_eq!(received[0].field("phoneNumberId"), Some(&json!("PNID")));
    let lines: Vec<String> = h.events.all().iter().map(JsonLinesSink::render).collect();
    assert!(lines.iter().all(|l| !l.contains(USER_PHONE)), "{lines:#?}");
}

#[tokio::test]
async fn the_webhook_is_never_rate_limited() {
    let h = Setup::new().var("RATE_LIMIT_MAX", "2").build();
    for i in 0..6 {
        post_signed(&h, one_text_body(&format!("wamid.{i}"))).await.assert_status_is_ok();
    }
    assert_eq!(h.intake.accepted().len(), 6);
}

// --- legacy, health, readiness, metrics ----------------------------------------------------

#[tokio::test]
async fn the_legacy_webhook_url_is_gone_and_names_the_new_one() {
    let h = harness();
    for resp in [
        h.client.get("/whatsapp/webhook").send().await,
        h.client.post("/whatsapp/webhook").body(one_text_body("wamid.legacy")).send().await,
    ] {
        let (status, json) = status_and_json(resp).await;
        assert_eq!(status, StatusCode::GONE);
        assert_eq!(json["url"], WEBHOOK);
        assert!(json["error"].as_str().is_some_and(|e| e.contains(WEBHOOK)), "{json}");
    }
    assert!(h.intake.accepted().is_empty());
}

#[tokio::test]
async fn health_answers_ok_with_the_version_and_nothing_else() {
    let h = harness();
    let (status, json) = status_and_json(h.client.get("/health").send().await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}));
}

#[tokio::test]
async fn ready_reports_every_dependency_when_all_is_well() {
    let h = harness();
    let (status, json) = status_and_json(h.client.get("/ready").send().await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json,
        json!({
            "status": "ready",
            "checks": {"postgres": {"status": "up"}, "redis": {"status": "up", "evictionPolicy": "noeviction"}},
            "pipelineGeneration": 3,
            "liveWorkers": 2,
            "spoolBacklog": 0,
            "warnings": []
        })
    );
}

#[tokio::test]
async fn ready_stays_200_but_degraded_while_redis_is_down_because_webhooks_are_spooled() {
    let h = harness();
    h.readiness.set(|r| {
        r.redis = DependencyState::Down("connection refused".into());
        r.redis_eviction_policy = None;
    });
    let (status, json) = status_and_json(h.client.get("/ready").send().await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "degraded");
    assert_eq!(json["checks"]["redis"], json!({"status": "down", "error": "connection refused"}));
    assert!(json["warnings"][0].as_str().is_some_and(|w| w.contains("spooled to PostgreSQL")), "{json}");
    let strict = h.client.get("/ready").query("strict", &true).send().await;
    strict.assert_status(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn ready_is_503_when_no_dependency_can_hold_an_event() {
    let h = harness();
    h.readiness.set(|r| {
        r.redis = DependencyState::Down("connection refused".into());
        r.postgres = DependencyState::Down("pool timed out".into());
    });
    let (status, json) = status_and_json(h.client.get("/ready").send().await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["status"], "unavailable");
    assert_eq!(json["checks"]["postgres"]["status"], "down");
}

#[tokio::test]
async fn ready_warns_when_redis_may_evict_queued_jobs() {
    let h = harness();
    h.readiness.set(|r| r.redis_eviction_policy = Some("allkeys-lru".into()));
    let (status, json) = status_and_json(h.client.get("/ready").send().await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "ready");
    let warnings = json["warnings"].to_string();
    assert!(warnings.contains("allkeys-lru") && warnings.contains("noeviction"), "{warnings}");
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_when_a_recorder_is_installed() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || metrics::counter!("parley_test_total").increment(3));
    let h = Setup { metrics: Some(recorder.handle()), ..Setup::new() }.build();
    let resp = h.client.get("/metrics").send().await;
    resp.assert_status_is_ok();
    resp.assert_content_type("text/plain; version=0.0.4");
    let text = resp.0.into_body().into_string().await.unwrap();
    assert!(text.contains("parley_test_total 3"), "{text}");

    harness().client.get("/metrics").send().await.assert_status(StatusCode::NOT_FOUND);
}

// --- layers ------------------------------------------------------------------------------

#[tokio::test]
async fn security_headers_are_set_unless_helmet_is_disabled() {
    let resp = harness().client.get("/health").send().await;
    resp.assert_header("X-Content-Type-Options", "nosniff");
    resp.assert_header("X-Frame-Options", "DENY");
    resp.assert_header("Referrer-Policy", "no-referrer");
    resp.assert_header_exist("Strict-Transport-Security");

    let resp = Setup::new().var("ENABLE_HELMET", "false").build().client.get("/health").send().await;
    resp.assert_header_is_not_exist("X-Frame-Options");
}

/// The webhook's POST is served ahead of the router (`routes`): it must still get the layers every
/// route gets — security headers, CORS for a request with an `Origin`, the route's metrics.
#[tokio::test]
async fn the_webhook_post_gets_the_same_layers_as_every_route() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);

    let h = harness();
    let resp = post_signed(&h, one_text_body("wamid.layers")).await;
    resp.assert_status_is_ok();
    resp.assert_header("X-Content-Type-Options", "nosniff");
    resp.assert_header("X-Frame-Options", "DENY");
    resp.assert_header_exist("Strict-Transport-Security");
    resp.assert_header_is_not_exist("Access-Control-Allow-Origin");

    let body = one_text_body("wamid.cors");
    let resp = h
        .client
        .post(WEBHOOK)
        .header("X-Hub-Signature-256", meta_signature(&dev_app_secret(), &body))
        .header("Origin", "https://admin.example.com")
        .content_type("application/json")
        .body(body)
        .send()
        .await;
    resp.assert_status_is_ok();
    resp.assert_header("Access-Control-Allow-Origin", "https://admin.example.com");
    resp.assert_header("X-Frame-Options", "DENY");
    let ids: Vec<String> = h.intake.accepted().iter().map(|e| e.provider_message_id().to_owned()).collect();
    assert_eq!(ids, ["wamid.layers", "wamid.cors"]);

    let text = handle.render();
    assert!(
        text.lines().any(|l| l.starts_with("parley_http_requests_total{")
            && l.contains(r#"route="webhook""#)
            && l.contains(r#"status="200""#)
            && l.ends_with(" 2")),
        "{text}"
    );

    let h = Setup::new().var("ENABLE_HELMET", "false").build();
    let resp = post_signed(&h, one_text_body("wamid.plain")).await;
    resp.assert_status_is_ok();
    resp.assert_header_is_not_exist("X-Frame-Options");
}

#[tokio::test]
async fn cors_preflight_is_answered_when_enabled() {
    let preflight = |h: Harness| async move {
        h.client
            .options(RELOAD)
            .header("Origin", "https://admin.example.com")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
    };
    let resp = preflight(harness()).await;
    resp.assert_status_is_ok();
    resp.assert_header("Access-Control-Allow-Origin", "https://admin.example.com");
    let resp = preflight(Setup::new().var("ENABLE_CORS", "false").build()).await;
    resp.assert_header_is_not_exist("Access-Control-Allow-Origin");
}

#[tokio::test]
async fn the_openapi_document_and_swagger_ui_exist_only_when_enabled() {
    let h = Setup::new().var("ENABLE_SWAGGER", "true").build();
    let (status, spec) = status_and_json(h.client.get("/api/v1/docs/openapi.json").send().await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["paths"]["/pipelines/reload"]["post"].is_object(), "{spec}");
    assert_eq!(spec["servers"][0]["url"], "/api/v1/admin");
    h.client.get("/api/v1/docs").send().await.assert_status_is_ok();

    let h = harness();
    h.client.get("/api/v1/docs/openapi.json").send().await.assert_status(StatusCode::NOT_FOUND);
    h.client.get("/api/v1/docs").send().await.assert_status(StatusCode::NOT_FOUND);
}

// --- admin: pipeline reload ----------------------------------------------------------------

/// A real reloader over a copy of the shipped pipeline, with the built-in stages on in-memory
/// ports.
struct PipelineFixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    reloader: Arc<Reloader>,
    _bench: TestBench,
}

fn pipeline_fixture() -> PipelineFixture {
    stages::link();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("whatsapp.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/whatsapp.toml"), &path).unwrap();
    let bench = TestBench::new();
    let reloader = Arc::new(Reloader::start(&path, bench.resources()).unwrap());
    PipelineFixture { _dir: dir, path, reloader, _bench: bench }
}

fn admin_token() -> String {
    mint_token(&jwt_secret(), "admin", Some("tenant-1"), Duration::from_secs(600)).unwrap()
}

async fn reload(h: &Harness, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = h.client.post(RELOAD);
    if let Some(token) = token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    status_and_json(req.send().await).await
}

#[tokio::test]
async fn reload_without_a_valid_token_is_unauthorized() {
    let fixture = pipeline_fixture();
    let h = Setup::new().reloader(fixture.reloader.clone()).build();

    let resp = h.client.post(RELOAD).send().await;
    resp.assert_header("WWW-Authenticate", "Bearer");
    let (status, json) = status_and_json(resp).await;
    assert_eq!((status, json), (StatusCode::UNAUTHORIZED, json!({"error": "missing bearer token"})));

    let mut old = Claims::new("ops", "admin", None, Duration::from_secs(60));
    old.exp = old.iat - 3600;
    let expired = sign(&jwt_secret(), &old).unwrap();
    assert_eq!(reload(&h, Some(&expired)).await, (StatusCode::UNAUTHORIZED, json!({"error": "token expired"})));
    assert_eq!(reload(&h, Some("garbage")).await, (StatusCode::UNAUTHORIZED, json!({"error": "invalid token"})));
    let forged = mint_token(
        &SecretString::from("a-different-secret-0123456789abcdef".to_owned()),
        "admin",
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(reload(&h, Some(&forged)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(fixture.reloader.runtime().generation(), 1);
}

#[tokio::test]
async fn reload_with_a_user_token_is_forbidden() {
    let fixture = pipeline_fixture();
    let h = Setup::new().reloader(fixture.reloader.clone()).build();
    let token = mint_token(&jwt_secret(), "user", Some("tenant-1"), Duration::from_secs(600)).unwrap();
    let (status, json) = reload(&h, Some(&token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json, json!({"error": "role `user` may not use this endpoint"}));
}

#[tokio::test]
async fn an_admin_reloads_the_pipeline_and_a_refused_file_keeps_the_old_one_serving() {
    let fixture = pipeline_fixture();
    let h = Setup::new().reloader(fixture.reloader.clone()).build();
    let token = admin_token();

    assert_eq!(reload(&h, Some(&token)).await, (StatusCode::OK, json!({"status": "unchanged", "generation": 1})));

    let original = std::fs::read_to_string(&fixture.path).unwrap();
    let edited = original
        .replace("conversation = { limit = 5, window = \"30s\" }", "conversation = { limit = 7, window = \"30s\" }");
    assert_ne!(edited, original, "the fixture edit must change the file");
    std::fs::write(&fixture.path, &edited).unwrap();
    let (status, json) = reload(&h, Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "reloaded");
    assert_eq!(json["generation"], 2);

    std::fs::write(&fixture.path, format!("{edited}\n[[stages]]\nkind = \"no-such-stage\"\n")).unwrap();
    let (status, json) = reload(&h, Some(&token)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json["status"], "invalid");
    assert_eq!(json["generation"], 2, "the previous generation keeps serving");
    let errors = json["errors"].as_array().cloned().unwrap_or_default();
    assert!(!errors.is_empty() && errors.iter().any(|e| e.to_string().contains("no-such-stage")), "{json}");
    assert_eq!(fixture.reloader.runtime().generation(), 2);

    let super_admin = mint_token(&jwt_secret(), "super-admin", None, Duration::from_secs(600)).unwrap();
    assert_eq!(reload(&h, Some(&super_admin)).await.0, StatusCode::UNPROCESSABLE_ENTITY, "super-admins are admitted");
}

#[tokio::test]
async fn reload_in_a_process_without_pipeline_says_where_to_reload() {
    let h = harness();
    let (status, json) = reload(&h, Some(&admin_token())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(json["error"].as_str().is_some_and(|e| e.contains("runs no pipeline")), "{json}");
}

#[tokio::test]
async fn the_admin_api_is_rate_limited_per_client() {
    let h = Setup::new().var("RATE_LIMIT_MAX", "3").var("RATE_LIMIT_WINDOW", "1h").build();
    for _ in 0..3 {
        assert_eq!(reload(&h, Some(&admin_token())).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let resp = h.client.post(RELOAD).header("Authorization", format!("Bearer {}", admin_token())).send().await;
    resp.assert_header_exist("Retry-After");
    let (status, json) = status_and_json(resp).await;
    assert_eq!((status, json), (StatusCode::TOO_MANY_REQUESTS, json!({"error": "too many requests"})));
}

// --- over real TCP on loopback -------------------------------------------------------------

async fn serve(app: BoxEndpoint<'static>) -> SocketAddr {
    let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await.unwrap();
    let addr = acceptor.local_addr()[0].as_socket_addr().copied().unwrap();
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    addr
}

#[tokio::test]
async fn over_tcp_a_signed_webhook_is_accepted_while_the_admin_api_hits_its_limit() {
    let h = Setup::new().var("RATE_LIMIT_MAX", "2").var("RATE_LIMIT_WINDOW", "1h").build();
    let addr = serve(h.app).await;
    let http = reqwest::Client::new();

    let mut admin_statuses = Vec::new();
    for _ in 0..3 {
        let resp = http.post(format!("http://{addr}{RELOAD}")).send().await.unwrap();
        admin_statuses.push(resp.status().as_u16());
    }
    assert_eq!(admin_statuses, [401, 401, 429]);

    for i in 0..4 {
        let body = one_text_body(&format!("wamid.tcp{i}"));
        let resp = http
            .post(format!("http://{addr}{WEBHOOK}"))
            .header("X-Hub-Signature-256", meta_signature(&dev_app_secret(), &body))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.text().await.unwrap(), r#"{"status":"ok"}"#);
    }
    assert_eq!(h.intake.accepted().len(), 4);
}

#[tokio::test]
async fn over_tcp_a_chunked_body_over_the_limit_is_refused() {
    let h = harness();
    let addr = serve(h.app).await;
    let body = oversized_body();
    let signature = meta_signature(&dev_app_secret(), &body);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {WEBHOOK} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-Hub-Signature-256: {signature}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer and close before the whole body is sent: a failed write is expected.
    for chunk in body.chunks(64 * 1024) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(h.intake.accepted().is_empty());
}
