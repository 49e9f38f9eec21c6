//! The WhatsApp webhook, `GET|POST /api/v1/whatsapp/webhook`: Meta's subscription check, and the
//! intake of message and status notifications.
//!
//! A POST is answered 200 only once every event of the body is durable (the [`Intake`] returned),
//! so that a 500 makes the provider deliver again; the work itself happens in the workers. The
//! webhook never rate-limits: limits are applied per conversation by the pipeline (the checklist:
//! always 200, even over the limits).
//!
//! Authentication comes first. Meta signs the body: the signature header is parsed before the
//! body is read, and checked once it is. 360dialog sends a shared token in a header
//! (`WHATSAPP_WEBHOOK_TOKEN_HEADER`), which a channel may override with its own
//! (`channels.credentials.webhook_token`, read through the [`ChannelCredentialCache`] found in the
//! request's data). The body names its channels, so the order is:
//!
//! 1. no token header → 401, before the body is read;
//! 2. the body is read (3 MiB at most) and the business numbers it names are listed
//!    ([`signature::channels_named`]; a body that names none, or is not a webhook, stands for
//!    "no channel");
//! 3. the token must match, for every number named, that channel's own token when it has one, else
//!    `WHATSAPP_WEBHOOK_TOKEN` — so one tenant's token never authenticates another tenant's events,
//!    and a body mixing channels passes only if it holds the token of each; the first mismatch
//!    answers 401 (at most one store read for a caller without a valid token);
//! 4. only then is the body judged (400 for a malformed one): a caller without a valid token learns
//!    nothing about what the webhook accepts.
//!
//! When a channel's token cannot be read (PostgreSQL down and the channel not in the cache), the
//! answer is 500, so that the provider delivers again later rather than the event being accepted
//! unauthenticated or dropped.
//!
//! [`Intake`]: crate::queue::Intake
//! [`ChannelCredentialCache`]: crate::providers::credentials::ChannelCredentialCache

use std::sync::Arc;

use chrono::Utc;
use engine::{
    events::{Event, names},
    masking::mask_phone,
};
use poem::{
    Body, Request, Response, handler,
    http::{StatusCode, header},
    web::Data,
};
use secrecy::ExposeSecret;

use super::{HttpState, json_error, metrics::WEBHOOK_EVENTS_TOTAL, metrics::WEBHOOK_REJECTED_TOTAL};
use crate::{
    providers::credentials::ChannelCredentialCache,
    queue::QueuedEvent,
    settings::WhatsAppProvider,
    whatsapp::{SignatureError, parse_webhook, signature},
};

pub const WEBHOOK_PATH: &str = "/api/v1/whatsapp/webhook";

/// The largest body accepted; Meta's bodies are a few kilobytes.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

const OK_BODY: &str = r#"{"status":"ok"}"#;

/// Meta's subscription check: echo `hub.challenge` when `hub.mode=subscribe` and
/// `hub.verify_token` is ours.
#[handler]
pub async fn verify(state: Data<&HttpState>, req: &Request) -> Response {
    let (mut mode, mut token, mut challenge) = (None, None, None);
    for (key, value) in url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "hub.mode" => mode = Some(value),
            "hub.verify_token" => token = Some(value),
            "hub.challenge" => challenge = Some(value),
            _ => {}
        }
    }
    let token_ok = token.is_some_and(|t| {
        signature::constant_time_eq(state.settings.whatsapp_verify_token.expose_secret().as_bytes(), t.as_bytes())
    });
    if mode.as_deref() != Some("subscribe") || !token_ok {
        tracing::warn!("webhook verification refused: wrong mode or verify token");
        return json_error(StatusCode::FORBIDDEN, "verification failed");
    }
    match challenge {
        Some(challenge) => Response::builder().content_type("text/plain; charset=utf-8").body(challenge.into_owned()),
        None => json_error(StatusCode::BAD_REQUEST, "missing hub.challenge"),
    }
}

/// A notification: authenticate, parse every entry, change, message and status, make them durable.
#[handler]
pub async fn receive(state: Data<&HttpState>, req: &Request, body: Body) -> Response {
    accept_notification(&state, req, body).await
}

/// What [`receive`] does, callable without poem's extractors: the front endpoint
/// ([`super::routes`]) serves the webhook's POST with it ahead of the router.
pub(crate) async fn accept_notification(state: &HttpState, req: &Request, body: Body) -> Response {
    let settings = &state.settings;

    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        drain(&mut body.into()).await;
        return too_large();
    }

    // What can be checked from the headers is checked before reading the body.
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    // 360dialog: the token, checked once the body says which channels it is for.
    let mut header_token = None;
    let meta_digest = match settings.whatsapp_provider {
        WhatsAppProvider::Meta | WhatsAppProvider::Sandbox => {
            match signature::parse_signature_header(header(signature::META_SIGNATURE_HEADER)) {
                Ok(digest) => Some(digest),
                Err(e) => return unauthenticated(&e, "invalid signature"),
            }
        }
        WhatsAppProvider::Dialog360 => {
            match header(&settings.whatsapp_webhook_token_header).filter(|t| !t.is_empty()) {
                Some(token) => header_token = Some(token.to_owned()),
                None => return unauthenticated(&SignatureError::MissingToken, "invalid token"),
            }
            None
        }
    };

    // Also enforced while reading: a chunked body declares no length.
    let body = match read_body(body).await {
        Ok(bytes) => bytes,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Unreadable(e)) => {
            tracing::debug!(error = %e, "webhook body could not be read");
            return json_error(StatusCode::BAD_REQUEST, "body could not be read");
        }
    };

    if let Some(digest) = &meta_digest
        && let Err(e) = signature::verify_meta_digest(settings.whatsapp_app_secret.as_ref(), &body, digest)
    {
        return unauthenticated(&e, "invalid signature");
    }
    if let Some(token) = &header_token {
        // Boxed: a rare path (360dialog only) that would otherwise enlarge every request's future.
        match Box::pin(authenticate_channels(state, state.channel_credentials.as_ref(), &body, token)).await {
            Ok(()) => {}
            Err(ChannelAuthError::Refused(e)) => return unauthenticated(&e, "invalid token"),
            Err(ChannelAuthError::Unavailable(error)) => {
                metrics::counter!(WEBHOOK_REJECTED_TOTAL, "reason" => "auth_unavailable").increment(1);
                tracing::error!(%error, "webhook not authenticated: the channel's token cannot be read now");
                return json_error(StatusCode::INTERNAL_SERVER_ERROR, "temporarily unable to authenticate");
            }
        }
    }

    let parsed = match parse_webhook(&body, Utc::now()) {
        Ok(parsed) => parsed,
        Err(e) => {
            metrics::counter!(WEBHOOK_REJECTED_TOTAL, "reason" => "invalid").increment(1);
            tracing::info!(reason = %e, "webhook body refused");
            return json_error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    for skipped in &parsed.skipped {
        // The location names the item by index; its content (a phone number, a text) stays out.
        tracing::warn!(location = %skipped.location, reason = skipped.reason, "webhook item skipped");
    }
    if parsed.ignored_changes > 0 {
        tracing::debug!(changes = parsed.ignored_changes, "webhook changes of other fields ignored");
    }
    if parsed.events.is_empty() {
        return ok();
    }

    for message in parsed.messages() {
        state.events.emit(
            Event::info(names::MESSAGE_RECEIVED)
                .with("providerMessageId", &message.provider_message_id)
                .with("phoneNumberId", &message.phone_number_id)
                .with("from", mask_phone(&message.from))
                .with("messageType", &message.message_type),
        );
    }

    match state.intake.accept(&parsed.events).await {
        Ok(jobs) => {
            let (mut messages, mut statuses) = (0u64, 0u64);
            for (event, job) in parsed.events.iter().zip(&jobs) {
                match event {
                    QueuedEvent::Message(m) => {
                        messages += 1;
                        state.events.emit(
                            Event::info(names::JOB_ADDED)
                                .with("providerMessageId", &m.provider_message_id)
                                .with("jobId", &job.job_id)
                                .with("shard", job.shard)
                                .with("durableIn", job.durable_in),
                        );
                    }
                    QueuedEvent::Status(s) => {
                        statuses += 1;
                        tracing::debug!(
                            provider_message_id = %s.provider_message_id,
                            status = %s.status,
                            job_id = %job.job_id,
                            "delivery status queued"
                        );
                    }
                }
            }
            for (kind, count) in [("message", messages), ("status", statuses)] {
                if count > 0 {
                    metrics::counter!(WEBHOOK_EVENTS_TOTAL, "kind" => kind).increment(count);
                }
            }
            ok()
        }
        Err(e) => {
            metrics::counter!(WEBHOOK_REJECTED_TOTAL, "reason" => "intake_failed").increment(1);
            tracing::error!(error = %e, events = parsed.events.len(), "webhook events could not be made durable");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "temporarily unable to accept the events")
        }
    }
}

enum BodyError {
    TooLarge,
    Unreadable(String),
}

/// The whole body, refused past [`MAX_BODY_BYTES`] while it is read. A body that arrived in one
/// frame (the usual case) is returned without a copy; poem's `into_bytes_limit` copies every chunk
/// twice through a zeroed 4 KiB buffer that also made each request's future 4 KiB larger.
async fn read_body(body: Body) -> Result<bytes::Bytes, BodyError> {
    use http_body_util::{BodyExt, LengthLimitError, Limited};

    let mut body: RawBody = body.into();
    match Limited::new(&mut body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => {
            drain(&mut body).await;
            Err(BodyError::TooLarge)
        }
        Err(e) => Err(BodyError::Unreadable(e.to_string())),
    }
}

type RawBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// How much of a refused body is still read, and thrown away, before the 413 is sent.
const DRAIN_BYTES: usize = 16 * 1024 * 1024;
/// How long that reading may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards what is left of a body refused for its size (up to [`DRAIN_BYTES`], for
/// [`DRAIN_TIME`]): a connection closed with unread data is reset, and a sender still writing its
/// body would get a broken pipe instead of the 413 (seen in the webhook edges test, and what Meta
/// would get too). Past either bound the connection is dropped as before.
async fn drain(body: &mut RawBody) {
    use http_body_util::BodyExt;

    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let read = frame.data_ref().map_or(0, bytes::Bytes::len);
            if read >= left {
                return;
            }
            left -= read;
        }
    })
    .await;
}

enum ChannelAuthError {
    Refused(SignatureError),
    Unavailable(String),
}

/// Checks a 360dialog header token against every channel the body names: the channel's own token
/// when it has one (`channels` reads them; without it, only the global token exists), else
/// `WHATSAPP_WEBHOOK_TOKEN`. Stops at the first mismatch.
async fn authenticate_channels(
    state: &HttpState,
    channels: Option<&Arc<ChannelCredentialCache>>,
    body: &[u8],
    provided: &str,
) -> Result<(), ChannelAuthError> {
    for number in signature::channels_named(body) {
        let own = match channels {
            Some(channels) if !number.is_empty() => {
                channels.webhook_token(&number).await.map_err(ChannelAuthError::Unavailable)?
            }
            _ => None,
        };
        let expected = own.as_ref().or(state.settings.whatsapp_webhook_token.as_ref());
        signature::verify_header_token(expected, Some(provided)).map_err(ChannelAuthError::Refused)?;
    }
    Ok(())
}

fn ok() -> Response {
    Response::builder().content_type("application/json").body(OK_BODY)
}

fn too_large() -> Response {
    metrics::counter!(WEBHOOK_REJECTED_TOTAL, "reason" => "too_large").increment(1);
    json_error(StatusCode::PAYLOAD_TOO_LARGE, "body larger than 3 MiB")
}

fn unauthenticated(e: &SignatureError, answer: &str) -> Response {
    metrics::counter!(WEBHOOK_REJECTED_TOTAL, "reason" => "unauthenticated").increment(1);
    if matches!(e, SignatureError::NotConfigured) {
        tracing::error!(
            "webhook refused: no secret is configured to authenticate it (WHATSAPP_APP_SECRET or WHATSAPP_WEBHOOK_TOKEN)"
        );
    } else {
        tracing::warn!(reason = %e, "webhook refused: not authenticated");
    }
    json_error(StatusCode::UNAUTHORIZED, answer)
}

/// 360dialog's header token, as 360dialog and an attacker see it: the global token, a channel's
/// own token, bodies naming several channels, and the store being down.
#[cfg(test)]
mod dialog360_auth_tests {
    use std::{
        collections::BTreeMap,
        sync::{Mutex, atomic::Ordering},
    };

    use engine::events::MemoryEvents;
    use poem::{endpoint::BoxEndpoint, test::TestClient};
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        http::{DependencyState, Readiness, ReadyReport, routes},
        providers::credentials::tests::FakeChannels,
        queue::{AcceptedJob, Intake, IntakeError},
        settings::Settings,
    };

    const TOKEN_HEADER: &str = "X-Webhook-Token";
    const GLOBAL: &str = "global-webhook-token";

    #[derive(Default)]
    struct RecordingIntake(Mutex<Vec<QueuedEvent>>);

    #[async_trait::async_trait]
    impl Intake for RecordingIntake {
        async fn accept(&self, events: &[QueuedEvent]) -> Result<Vec<AcceptedJob>, IntakeError> {
            let mut accepted = self.0.lock().unwrap_or_else(|p| p.into_inner());
            accepted.extend_from_slice(events);
            Ok(events
                .iter()
                .map(|e| AcceptedJob { job_id: "stream:0:1-0".into(), durable_in: "redis", shard: e.shard(16) })
                .collect())
        }
    }

    struct Ready;

    #[async_trait::async_trait]
    impl Readiness for Ready {
        async fn check(&self) -> ReadyReport {
            ReadyReport {
                postgres: DependencyState::Up,
                redis: DependencyState::Up,
                redis_eviction_policy: None,
                pipeline_generation: None,
                live_workers: None,
                spool_backlog: None,
            }
        }
    }

    struct Webhook {
        client: TestClient<BoxEndpoint<'static>>,
        intake: Arc<RecordingIntake>,
    }

    impl Webhook {
        fn accepted_ids(&self) -> Vec<String> {
            let accepted = self.intake.0.lock().unwrap_or_else(|p| p.into_inner());
            accepted.iter().map(|e| e.provider_message_id().to_owned()).collect()
        }

        async fn post(&self, token: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
            let mut request = self.client.post(WEBHOOK_PATH).content_type("application/json").body(body);
            if let Some(token) = token {
                request = request.header(TOKEN_HEADER, token);
            }
            let response = request.send().await.0;
            let status = response.status();
            let text = response.into_body().into_string().await.unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }
    }

    /// A 360dialog webhook; with `channels`, their own tokens are read from it.
    fn webhook(channels: Option<Arc<FakeChannels>>) -> Webhook {
        let vars: BTreeMap<String, String> =
            [("WHATSAPP_PROVIDER", "360dialog"), ("WHATSAPP_API_KEY", "d360-key"), ("WHATSAPP_WEBHOOK_TOKEN", GLOBAL)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let intake = Arc::new(RecordingIntake::default());
        let state = HttpState {
            settings: Arc::new(Settings::from_vars(vars).expect("settings")),
            intake: intake.clone(),
            events: Arc::new(MemoryEvents::new()),
            readiness: Arc::new(Ready),
            reloader: None,
            metrics: None,
            reload_broadcast: None,
            channel_credentials: channels.map(|channels| Arc::new(ChannelCredentialCache::new(channels, None))),
            knowledge: None,
        };
        Webhook { client: TestClient::new(routes(state)), intake }
    }

    fn change(phone_number_id: &str, wamid: &str) -> Value {
        json!({"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15551234567", "phone_number_id": phone_number_id},
            "messages": [{"from": "33612345678", "id": wamid, "timestamp": "1699999999", "type": "text",
                          "text": {"body": "Bonjour"}}]
        }})
    }

    fn body(changes: Vec<Value>) -> Vec<u8> {
        json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": changes}]})
            .to_string()
            .into_bytes()
    }

    fn stores() -> Arc<FakeChannels> {
        FakeChannels::with(&[("PN-OWN", None, Some("tenant-a-token")), ("PN-PLAIN", None, None)])
    }

    #[tokio::test]
    async fn the_global_token_authenticates_a_channel_without_its_own() {
        let webhook = webhook(Some(stores()));

        let (status, answer) = webhook.post(Some(GLOBAL), body(vec![change("PN-PLAIN", "wamid.1")])).await;

        assert_eq!((status, answer), (StatusCode::OK, json!({"status": "ok"})));
        assert_eq!(webhook.accepted_ids(), ["wamid.1"]);
    }

    #[tokio::test]
    async fn a_channel_with_its_own_token_is_authenticated_by_it_and_only_by_it() {
        let webhook = webhook(Some(stores()));

        let (status, _) = webhook.post(Some("tenant-a-token"), body(vec![change("PN-OWN", "wamid.own")])).await;
        assert_eq!(status, StatusCode::OK);

        // The global token does not stand in for a channel's own: it is overridden.
        let (status, answer) = webhook.post(Some(GLOBAL), body(vec![change("PN-OWN", "wamid.global")])).await;
        assert_eq!((status, answer), (StatusCode::UNAUTHORIZED, json!({"error": "invalid token"})));

        assert_eq!(webhook.accepted_ids(), ["wamid.own"]);
    }

    #[tokio::test]
    async fn one_tenants_token_does_not_authenticate_another_channel() {
        let webhook = webhook(Some(stores()));

        for number in ["PN-PLAIN", "PN-UNKNOWN"] {
            let (status, _) = webhook.post(Some("tenant-a-token"), body(vec![change(number, "wamid.x")])).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{number}");
        }
        assert!(webhook.accepted_ids().is_empty());
    }

    #[tokio::test]
    async fn a_body_naming_several_channels_needs_the_token_of_each() {
        let webhook = webhook(Some(stores()));
        let mixed = body(vec![change("PN-OWN", "wamid.a"), change("PN-PLAIN", "wamid.b")]);

        for token in ["tenant-a-token", GLOBAL] {
            let (status, _) = webhook.post(Some(token), mixed.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token} alone covers only one of the channels");
        }
        assert!(webhook.accepted_ids().is_empty(), "nothing of a refused body is queued");
    }

    #[tokio::test]
    async fn a_missing_or_wrong_token_is_refused() {
        let webhook = webhook(Some(stores()));

        for token in [None, Some(""), Some("wrong"), Some("global-webhook-token-")] {
            let (status, answer) = webhook.post(token, body(vec![change("PN-PLAIN", "wamid.1")])).await;
            assert_eq!((status, answer), (StatusCode::UNAUTHORIZED, json!({"error": "invalid token"})), "{token:?}");
        }
        assert!(webhook.accepted_ids().is_empty());
    }

    #[tokio::test]
    async fn a_malformed_body_is_judged_only_for_an_authenticated_caller() {
        let webhook = webhook(Some(stores()));

        let (status, _) = webhook.post(Some("wrong"), b"not json".to_vec()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "an unauthenticated caller learns nothing about the body");

        let (status, _) = webhook.post(Some(GLOBAL), b"not json".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn without_the_store_only_the_global_token_exists() {
        let webhook = webhook(None);

        let (status, _) = webhook.post(Some(GLOBAL), body(vec![change("PN-OWN", "wamid.1")])).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = webhook.post(Some("tenant-a-token"), body(vec![change("PN-OWN", "wamid.2")])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn store_down_keeps_known_channels_working_and_asks_for_a_redelivery_otherwise() {
        let channels = stores();
        let webhook = webhook(Some(channels.clone()));
        let (status, _) = webhook.post(Some("tenant-a-token"), body(vec![change("PN-OWN", "wamid.1")])).await;
        assert_eq!(status, StatusCode::OK);

        channels.down.store(true, Ordering::SeqCst);

        // Read a moment ago: the cached token still authenticates.
        let (status, _) = webhook.post(Some("tenant-a-token"), body(vec![change("PN-OWN", "wamid.2")])).await;
        assert_eq!(status, StatusCode::OK);
        // Never read: it cannot be told whether the channel has its own token, so 500 and the
        // provider delivers again later.
        let (status, answer) = webhook.post(Some(GLOBAL), body(vec![change("PN-PLAIN", "wamid.3")])).await;
        assert_eq!(
            (status, answer),
            (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "temporarily unable to authenticate"}))
        );
        assert_eq!(webhook.accepted_ids(), ["wamid.1", "wamid.2"]);
    }
}
