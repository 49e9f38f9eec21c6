//! The WhatsApp webhook, `GET|POST /api/v1/whatsapp/webhook`: Meta's subscription check, and the
//! intake of message and status notifications.
//!
//! A POST is answered 200 only once every event of the body is durable (the [`Intake`] returned),
//! so that a 500 makes the provider deliver again; the work itself happens in the workers. The
//! webhook never rate-limits: limits are applied per conversation by the pipeline (the checklist:
//! always 200, even over the limits).
//!
//! [`Intake`]: crate::queue::Intake

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
    let settings = &state.settings;

    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }

    // What can be checked from the headers is checked before reading the body.
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let signed = match settings.whatsapp_provider {
        WhatsAppProvider::Meta | WhatsAppProvider::Sandbox => {
            if let Err(e) = signature::parse_signature_header(header(signature::META_SIGNATURE_HEADER)) {
                return unauthenticated(&e, "invalid signature");
            }
            true
        }
        WhatsAppProvider::Dialog360 => {
            let provided = header(&settings.whatsapp_webhook_token_header);
            if let Err(e) = signature::verify_header_token(settings.whatsapp_webhook_token.as_ref(), provided) {
                return unauthenticated(&e, "invalid token");
            }
            false
        }
    };

    // Also enforced while reading: a chunked body declares no length.
    let body = match body.into_bytes_limit(MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(poem::error::ReadBodyError::PayloadTooLarge) => return too_large(),
        Err(e) => {
            tracing::debug!(error = %e, "webhook body could not be read");
            return json_error(StatusCode::BAD_REQUEST, "body could not be read");
        }
    };

    if signed {
        let secret = settings.whatsapp_app_secret.as_ref();
        if let Err(e) = signature::verify_meta_signature(secret, &body, header(signature::META_SIGNATURE_HEADER)) {
            return unauthenticated(&e, "invalid signature");
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
            metrics::counter!(WEBHOOK_EVENTS_TOTAL, "kind" => "message").increment(messages);
            metrics::counter!(WEBHOOK_EVENTS_TOTAL, "kind" => "status").increment(statuses);
            ok()
        }
        Err(e) => {
            metrics::counter!(WEBHOOK_REJECTED_TOTAL, "reason" => "intake_failed").increment(1);
            tracing::error!(error = %e, events = parsed.events.len(), "webhook events could not be made durable");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "temporarily unable to accept the events")
        }
    }
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
