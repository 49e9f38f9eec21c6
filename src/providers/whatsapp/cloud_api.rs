//! The WhatsApp Cloud API wire format and calls, shared by every provider that speaks it (Meta
//! directly, 360dialog as a proxy of it): how a channel's key authenticates a call, the text
//! message and read-receipt bodies, the answer with the sent message's id, the error body with its
//! codes classified retryable or permanent, and the calls themselves with their retries. A
//! provider keeps only what differs: its URLs and the header its key goes in.
//!
//! A send is retried within the call only when the provider certainly did not accept the message,
//! since a retry after an acceptance delivers the reply twice: the connection could not be made
//! (nothing was sent), the answer is 429 (refused for throughput), or the provider itself answered
//! with a Cloud API error whose code is transient. A timeout, a cut connection, or a 5xx page from
//! a proxy (502/504 may hide an accepted send) is not retried here; it stays a retryable error for
//! the job, which decides with its own backoff. A read receipt is harmless to repeat: any
//! retryable failure of it is tried again, within a budget short enough for the `ack` stage.

use std::{sync::Arc, time::Duration};

use engine::{
    events::Event,
    ids::ProviderMessageId,
    masking::mask_phones_in,
    message::ChannelInfo,
    ports::{OutboundText, PortError, PortErrorKind},
};
use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::CredentialSource;
use crate::providers::{
    http_client::{transport_error, truncate},
    retry::{AttemptError, Retries, RetryPolicy},
};

/// Meta codes worth retrying: throttling, and the platform's own transient failures.
const RETRYABLE_CODES: &[i64] = &[
    1,      // API unknown (transient)
    2,      // API service temporarily unavailable
    4,      // application request limit reached: throttling, clears by itself
    80007,  // WhatsApp Business Account rate limit: throttling, clears by itself
    130429, // throughput limit of the business number
    131000, // something went wrong
    131016, // service unavailable
    131056, // too many messages to the same user in a short time
    131057, // business account in maintenance mode
    133004, // server temporarily unavailable
];

/// Meta codes that the same request will meet again: the recipient, the content or the
/// credentials are at fault.
const PERMANENT_CODES: &[i64] = &[
    0,      // authentication exception
    10,     // permission denied
    100,    // invalid parameter
    131008, // required parameter missing
    131009, // parameter value invalid
    131026, // message undeliverable (not on WhatsApp, old app, terms not accepted)
    131047, // more than 24 hours since the user's last message: a template is needed
    131048, // spam rate limit: Meta restricts this number's sending
    131049, // not delivered to keep the ecosystem healthy
    131051, // unsupported message type
    190,    // access token expired or invalid
];

/// A read receipt: within the `ack` stage's 2 s, which fails open.
pub(crate) const MARK_READ_POLICY: RetryPolicy = RetryPolicy {
    retries: 1,
    min_delay: Duration::from_millis(100),
    max_delay: Duration::from_millis(200),
    budget: Duration::from_millis(1500),
};

/// How a provider's error is to be treated, from Meta's code when it gave one, else from the
/// HTTP status.
pub(crate) fn classify(status: u16, meta_code: Option<i64>) -> PortErrorKind {
    if let Some(code) = meta_code {
        if RETRYABLE_CODES.contains(&code) {
            return PortErrorKind::Unavailable;
        }
        // 200-299: the permission family (e.g. 200 "permission error", 294 "managing apps").
        if PERMANENT_CODES.contains(&code) || (200..=299).contains(&code) {
            return PortErrorKind::Permanent;
        }
    }
    match status {
        // Throttled, timed out at a proxy, or the provider failed: the same request may pass later.
        408 | 429 | 500..=599 => PortErrorKind::Unavailable,
        // 401/403 (credentials) and every other refusal; 3xx means a misconfigured base URL
        // (redirects are not followed, so the token never leaves for another host).
        _ => PortErrorKind::Permanent,
    }
}

/// The body of a text message; `context` quotes the user's message when replying to it.
pub(crate) fn text_body(message: &OutboundText) -> Value {
    // Meta wants the number as digits, without `+` or spaces.
    let to: String = message.to.expose().chars().filter(char::is_ascii_digit).collect();
    let mut body = json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": { "preview_url": false, "body": message.text },
    });
    if let Some(reply_to) = &message.reply_to {
        body["context"] = json!({ "message_id": reply_to.as_str() });
    }
    body
}

/// The body that marks `message_id` read and, with `typing`, shows the typing indicator.
pub(crate) fn read_body(message_id: &ProviderMessageId, typing: bool) -> Value {
    let mut body = json!({
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": message_id.as_str(),
    });
    if typing {
        body["typing_indicator"] = json!({ "type": "text" });
    }
    body
}

#[derive(Debug, Deserialize)]
struct SentBody {
    #[serde(default)]
    messages: Vec<SentMessage>,
}

#[derive(Debug, Deserialize)]
struct SentMessage {
    id: String,
}

#[derive(Debug, Deserialize)]
struct ErrorEnvelope {
    error: CloudApiError,
}

/// Meta's error object: `{"error":{"message","type","code","error_subcode","error_data":{"details"},"fbtrace_id"}}`.
#[derive(Debug, Deserialize)]
struct CloudApiError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    error_subcode: Option<i64>,
    #[serde(default)]
    error_data: Option<ErrorData>,
    #[serde(default)]
    fbtrace_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorData {
    #[serde(default)]
    details: Option<String>,
}

/// The longest provider text kept in an error message.
const MAX_PROVIDER_TEXT: usize = 400;

/// Where a provider's calls carry the channel's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloudApiAuth {
    /// `Authorization: Bearer <token>` (Meta).
    Bearer,
    /// `D360-API-KEY: <key>` (360dialog).
    D360ApiKey,
}

/// A channel's key and the header that carries it, ready for a call.
pub(crate) struct ChannelAuth {
    /// Kept to scrub it from provider text that echoes it.
    pub key: SecretString,
    pub header: (HeaderName, HeaderValue),
}

/// Calls a Cloud API for every channel of a provider: one HTTP client (a connection pool), where
/// the keys come from and how they are sent, and the retry policy.
#[derive(Clone)]
pub(crate) struct CloudApiClient {
    client: reqwest::Client,
    /// Names the provider in errors and events (`meta`, `360dialog`).
    service: &'static str,
    auth: CloudApiAuth,
    credentials: Arc<dyn CredentialSource>,
    retries: Retries,
}

impl std::fmt::Debug for CloudApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudApiClient")
            .field("service", &self.service)
            .field("auth", &self.auth)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl CloudApiClient {
    pub(crate) fn new(
        client: reqwest::Client,
        service: &'static str,
        auth: CloudApiAuth,
        credentials: Arc<dyn CredentialSource>,
        retries: Retries,
    ) -> Self {
        Self { client, service, auth, credentials, retries }
    }

    pub(crate) fn service(&self) -> &'static str {
        self.service
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.client
    }

    pub(crate) fn retries(&self) -> &Retries {
        &self.retries
    }

    /// The key of `channel` in the provider's header. No key fails for good, without a call.
    pub(crate) async fn auth(&self, channel: &ChannelInfo) -> Result<ChannelAuth, PortError> {
        let service = self.service;
        let key = self.credentials.api_key(channel).await?.ok_or_else(|| {
            PortError::permanent(service, Some("no_api_key".into()), "no API key for this channel (WHATSAPP_API_KEY)")
        })?;
        let (name, value) = match self.auth {
            CloudApiAuth::Bearer => (AUTHORIZATION, format!("Bearer {}", key.expose_secret())),
            CloudApiAuth::D360ApiKey => (HeaderName::from_static("d360-api-key"), key.expose_secret().to_owned()),
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| PortError::permanent(service, None, "the API key is not a valid HTTP header value"))?;
        // Keeps the key out of any debug print of the request.
        value.set_sensitive(true);
        Ok(ChannelAuth { key, header: (name, value) })
    }

    /// Sends one text message to `url` and maps the answer to the sent message's id or a
    /// classified error.
    pub(crate) async fn send_text(&self, url: Url, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
        let auth = self.auth(&message.channel).await?;
        let body = text_body(message);
        let describe = |event: Event| {
            event
                .with("channelId", message.channel.id.as_str())
                .with("providerMessageId", message.reply_to.as_ref().map(ProviderMessageId::as_str))
        };
        self.retries.run(&describe, |timeout| self.attempt_send(&url, &auth, &body, timeout)).await
    }

    /// Marks `message_id` read (and shows the typing indicator with `typing`) through `url`.
    pub(crate) async fn mark_read(
        &self,
        url: Url,
        channel: &ChannelInfo,
        message_id: &ProviderMessageId,
        typing: bool,
    ) -> Result<(), PortError> {
        let auth = self.auth(channel).await?;
        let body = read_body(message_id, typing);
        let describe =
            |event: Event| event.with("channelId", channel.id.as_str()).with("providerMessageId", message_id.as_str());
        let retries = self.retries.with_policy(MARK_READ_POLICY);
        retries.run(&describe, |timeout| self.attempt_mark_read(&url, &auth, &body, timeout)).await
    }

    async fn attempt_mark_read(
        &self,
        url: &Url,
        auth: &ChannelAuth,
        body: &Value,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        let (status, bytes) =
            self.post(url, auth, body, timeout).await.map_err(|e| AttemptError::idempotent(e.error))?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        // Marking read twice changes nothing: any retryable refusal is worth another try.
        Err(AttemptError::idempotent(self.error_from_body(status, &bytes, &auth.key).0))
    }

    /// One POST of a JSON body: the status and the body of the answer. A failed call says whether
    /// it certainly carried nothing (the connection was never made).
    async fn post(
        &self,
        url: &Url,
        auth: &ChannelAuth,
        body: &Value,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), AttemptError> {
        let service = self.service;
        let (name, value) = &auth.header;
        let response =
            match self.client.post(url.clone()).header(name, value.clone()).json(body).timeout(timeout).send().await {
                Ok(response) => response,
                Err(e) => return Err(AttemptError { retry: e.is_connect(), error: transport_error(service, e) }),
            };
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| AttemptError::final_(transport_error(service, e)))?;
        Ok((status, bytes.to_vec()))
    }

    async fn attempt_send(
        &self,
        url: &Url,
        auth: &ChannelAuth,
        body: &Value,
        timeout: Duration,
    ) -> Result<ProviderMessageId, AttemptError> {
        let service = self.service;
        // Only a connection that was never made certainly carried nothing.
        let (status, bytes) = self.post(url, auth, body, timeout).await?;

        if (200..300).contains(&status) {
            return match serde_json::from_slice::<SentBody>(&bytes) {
                Ok(SentBody { messages }) if messages.first().is_some_and(|m| !m.id.is_empty()) => {
                    Ok(ProviderMessageId::new(messages[0].id.clone()))
                }
                // The provider accepted the message, so it is probably on its way: a retry could
                // deliver it twice. Permanent, so that the row is closed and an operator looks.
                _ => Err(AttemptError::final_(PortError::permanent(
                    service,
                    Some("invalid_response".into()),
                    format!(
                        "HTTP {status}: the provider accepted the message but its answer has no message id; \
                         not retried, to avoid a duplicate"
                    ),
                ))),
            };
        }
        let (error, answered_by_provider) = self.error_from_body(status, &bytes, &auth.key);
        let retry = error.is_retryable() && (status == 429 || answered_by_provider);
        Err(AttemptError { error, retry })
    }

    /// [`error_from_body`] for this provider.
    pub(crate) fn error_from_body(&self, status: u16, body: &[u8], secret: &SecretString) -> (PortError, bool) {
        error_from_body(self.service, status, body, secret)
    }
}

/// Builds the classified error for a non-2xx answer, and says whether the provider itself
/// answered (a Cloud API error with a code, rather than a proxy's page). The message never holds
/// the API key or an unmasked phone number, whatever the provider wrote.
pub(crate) fn error_from_body(
    service: &'static str,
    status: u16,
    body: &[u8],
    secret: &SecretString,
) -> (PortError, bool) {
    let parsed = serde_json::from_slice::<ErrorEnvelope>(body).ok().map(|e| e.error);
    let meta_code = parsed.as_ref().and_then(|e| e.code);
    let text = match &parsed {
        Some(error) => describe(error),
        None => truncate(&String::from_utf8_lossy(body), 200),
    };
    let message = if text.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {text}") };
    let message = truncate(&mask_phones_in(&redact(&message, secret)), MAX_PROVIDER_TEXT);
    let code = Some(meta_code.map_or_else(|| format!("http_{status}"), |c| c.to_string()));
    (PortError { service, kind: classify(status, meta_code), code, message }, meta_code.is_some())
}

fn describe(error: &CloudApiError) -> String {
    let mut out = error.message.clone().unwrap_or_default();
    if let Some(details) = error.error_data.as_ref().and_then(|d| d.details.as_deref()) {
        out.push_str(" — ");
        out.push_str(details);
    }
    if let Some(kind) = &error.kind {
        out.push_str(&format!(" [{kind}]"));
    }
    if let Some(subcode) = error.error_subcode {
        out.push_str(&format!(" subcode {subcode}"));
    }
    // Meta's support asks for it to trace a failed call.
    if let Some(trace) = &error.fbtrace_id {
        out.push_str(&format!(" fbtrace_id {trace}"));
    }
    out.trim().to_owned()
}

/// Removes the secret from provider text, in case a proxy echoes the request's headers.
pub(crate) fn redact(text: &str, secret: &SecretString) -> String {
    let secret = secret.expose_secret();
    if secret.is_empty() { text.to_owned() } else { text.replace(secret, "[redacted]") }
}

#[cfg(test)]
mod tests {
    use engine::{
        ids::{ChannelId, PhoneNumber},
        message::ChannelInfo,
    };

    use super::*;

    #[test]
    fn meta_codes_decide_before_the_http_status() {
        assert_eq!(classify(400, Some(131000)), PortErrorKind::Unavailable);
        assert_eq!(classify(400, Some(130429)), PortErrorKind::Unavailable);
        assert_eq!(classify(400, Some(131026)), PortErrorKind::Permanent);
        assert_eq!(classify(500, Some(131047)), PortErrorKind::Permanent);
        assert_eq!(classify(403, Some(200)), PortErrorKind::Permanent);
        assert_eq!(classify(401, Some(190)), PortErrorKind::Permanent);
    }

    #[test]
    fn unknown_codes_fall_back_to_the_http_status() {
        assert_eq!(classify(503, None), PortErrorKind::Unavailable);
        assert_eq!(classify(429, Some(999_999)), PortErrorKind::Unavailable);
        assert_eq!(classify(400, Some(999_999)), PortErrorKind::Permanent);
        assert_eq!(classify(401, None), PortErrorKind::Permanent);
        assert_eq!(classify(302, None), PortErrorKind::Permanent);
    }

    #[test]
    fn text_body_sends_digits_and_quotes_only_when_replying() {
        let mut message = OutboundText {
            channel: ChannelInfo { id: ChannelId::new("c"), provider: "meta".into(), phone_number_id: "1".into() },
            to: PhoneNumber::new("+33612345678"),
            text: "Bonjour".into(),
            reply_to: None,
        };
        let body = text_body(&message);
        assert_eq!(body["to"], "33612345678");
        assert!(body.get("context").is_none());

        message.reply_to = Some(ProviderMessageId::new("wamid.X"));
        assert_eq!(text_body(&message)["context"]["message_id"], "wamid.X");
    }

    #[test]
    fn error_text_without_json_is_kept_short_and_masked() {
        let secret = SecretString::from("secret-key");
        let body = format!("<html>bad gateway for 33612345678 with secret-key{}</html>", "x".repeat(500));
        let (error, answered_by_provider) = error_from_body("meta", 502, body.as_bytes(), &secret);

        assert!(error.is_retryable());
        assert!(!answered_by_provider, "a proxy's page may hide an accepted send");
        assert_eq!(error.code.as_deref(), Some("http_502"));
        assert!(error.message.chars().count() <= MAX_PROVIDER_TEXT + 1, "{}", error.message);
        assert!(!error.message.contains("33612345678") && !error.message.contains("secret-key"), "{}", error.message);
    }
}

/// What the tests of every Cloud API provider share: a credential source with a key per channel,
/// and Meta's error body.
#[cfg(test)]
pub(crate) mod test_support {
    use engine::{message::ChannelInfo, ports::PortError};
    use secrecy::SecretString;
    use serde_json::{Value, json};

    use super::CredentialSource;

    /// Serves `key-of-<channel id>` for each channel.
    pub(crate) struct KeyPerChannel;

    #[engine::async_trait]
    impl CredentialSource for KeyPerChannel {
        async fn api_key(&self, channel: &ChannelInfo) -> Result<Option<SecretString>, PortError> {
            Ok(Some(SecretString::from(format!("key-of-{}", channel.id))))
        }
    }

    /// The read receipt of `wamid.IN` with the typing indicator, as Meta documents it.
    pub(crate) fn read_receipt_with_typing() -> Value {
        json!({
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": "wamid.IN",
            "typing_indicator": {"type": "text"}
        })
    }

    /// Meta's error body with `code`, whose details quote `phone`.
    pub(crate) fn meta_error(code: i64, message: &str, phone: &str) -> Value {
        json!({"error": {
            "message": message,
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": format!("details for {phone}")},
            "fbtrace_id": "AazhK3x9gX0Dp"
        }})
    }
}
