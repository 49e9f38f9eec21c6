//! Meta's WhatsApp Cloud API sender: `POST {WHATSAPP_API_URL}/{phone_number_id}/messages` with the
//! channel's bearer token, for replies and read receipts alike.

use std::sync::Arc;

use engine::{
    async_trait,
    ids::ProviderMessageId,
    message::ChannelInfo,
    ports::{OutboundSender, OutboundText, PortError},
};
use url::Url;

use super::{
    CredentialSource,
    cloud_api::{CloudApiAuth, CloudApiClient},
};
use crate::providers::retry::Retries;

/// The service name in this sender's errors.
pub const SERVICE: &str = "meta";

pub struct MetaSender {
    api: CloudApiClient,
    /// Includes the Graph API version, e.g. `https://graph.facebook.com/v21.0`.
    base_url: Url,
}

impl MetaSender {
    pub fn new(
        client: reqwest::Client,
        base_url: Url,
        credentials: Arc<dyn CredentialSource>,
        retries: Retries,
    ) -> Self {
        Self { api: CloudApiClient::new(client, SERVICE, CloudApiAuth::Bearer, credentials, retries), base_url }
    }

    /// `{base}/{phone_number_id}/messages`, the id escaped as one path segment.
    fn messages_url(&self, phone_number_id: &str) -> Result<Url, PortError> {
        if phone_number_id.trim().is_empty() {
            return Err(PortError::permanent(SERVICE, None, "the channel has no phone_number_id"));
        }
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|_| PortError::permanent(SERVICE, None, "WHATSAPP_API_URL cannot take a path"))?
            .pop_if_empty()
            .push(phone_number_id)
            .push("messages");
        Ok(url)
    }
}

#[async_trait]
impl OutboundSender for MetaSender {
    async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
        let url = self.messages_url(&message.channel.phone_number_id)?;
        self.api.send_text(url, message).await
    }

    async fn mark_read(
        &self,
        channel: &ChannelInfo,
        message_id: &ProviderMessageId,
        typing: bool,
    ) -> Result<(), PortError> {
        let url = self.messages_url(&channel.phone_number_id)?;
        self.api.mark_read(url, channel, message_id, typing).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use engine::{
        events::{MemoryEvents, names},
        ids::{ChannelId, PhoneNumber},
        message::ChannelInfo,
        ports::PortErrorKind,
    };
    use secrecy::SecretString;
    use serde_json::{Value, json};

    use super::*;
    use crate::providers::{
        fake_http::{FakeReply, FakeServer, refusing_url},
        http_client::{self, HttpTimeouts},
        retry::RetryPolicy,
        whatsapp::{GlobalApiKey, cloud_api::test_support},
    };

    const KEY: &str = "EAAG-test-api-key";
    const PHONE: &str = "33612345678";

    fn retries(timeouts: HttpTimeouts, events: &MemoryEvents) -> Retries {
        Retries::new(RetryPolicy::fast(timeouts.total), Arc::new(events.clone()))
    }

    fn sender_at(base: Url, timeouts: HttpTimeouts, events: &MemoryEvents) -> MetaSender {
        MetaSender::new(
            http_client::build(timeouts).expect("client"),
            base,
            Arc::new(GlobalApiKey::new(Some(SecretString::from(KEY)))),
            retries(timeouts, events),
        )
    }

    fn sender(server: &FakeServer, timeouts: HttpTimeouts) -> MetaSender {
        sender_at(server.base("/v21.0"), timeouts, &MemoryEvents::new())
    }

    fn reply(reply_to: Option<&str>) -> OutboundText {
        OutboundText {
            channel: ChannelInfo {
                id: ChannelId::new("channel-1"),
                provider: "meta".into(),
                phone_number_id: "106540352242922".into(),
            },
            to: PhoneNumber::new(PHONE),
            text: "Nous sommes ouverts de 9h à 18h.".into(),
            reply_to: reply_to.map(ProviderMessageId::new),
        }
    }

    fn meta_error(code: i64, message: &str) -> Value {
        test_support::meta_error(code, message, PHONE)
    }

    /// Sends one message to a server that answers `answer`, and returns the error it maps to,
    /// after checking that the error holds neither the key nor the number.
    async fn refused_with(answer: FakeReply) -> PortError {
        let server = FakeServer::start(answer).await;
        let error = sender(&server, HttpTimeouts::WHATSAPP).send_text(&reply(None)).await.expect_err("refused");
        assert_no_secret(&error);
        error
    }

    fn assert_no_secret(error: &PortError) {
        let text = format!("{error} {error:?}");
        assert!(!text.contains(KEY), "API key in the error: {text}");
        assert!(!text.contains(PHONE), "phone number in the error: {text}");
    }

    #[tokio::test]
    async fn reply_is_posted_to_the_channel_number_and_quotes_the_users_message() {
        let server = FakeServer::start(FakeReply::Json(
            200,
            json!({
                "messaging_product": "whatsapp",
                "contacts": [{"input": PHONE, "wa_id": PHONE}],
                "messages": [{"id": "wamid.HBgLMzM2MTIzNDU2NzgVAgARGBI"}]
            }),
        ))
        .await;

        let id = sender(&server, HttpTimeouts::WHATSAPP).send_text(&reply(Some("wamid.IN"))).await.expect("sent");

        assert_eq!(id.as_str(), "wamid.HBgLMzM2MTIzNDU2NzgVAgARGBI");
        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v21.0/106540352242922/messages");
        assert_eq!(request.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert!(request.header("user-agent").is_some_and(|ua| ua.starts_with("parley/")));
        assert_eq!(
            request.body,
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": PHONE,
                "type": "text",
                "text": {"preview_url": false, "body": "Nous sommes ouverts de 9h à 18h."},
                "context": {"message_id": "wamid.IN"}
            })
        );
    }

    #[tokio::test]
    async fn reply_without_quote_sends_no_context() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]}))).await;

        sender(&server, HttpTimeouts::WHATSAPP).send_text(&reply(None)).await.expect("sent");

        let body = server.only_request().body;
        assert!(body.get("context").is_none(), "{body}");
        assert_eq!(body["text"]["body"], "Nous sommes ouverts de 9h à 18h.");
    }

    #[tokio::test]
    async fn channel_key_from_the_credential_source_is_used() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]}))).await;
        let sender = MetaSender::new(
            http_client::build(HttpTimeouts::WHATSAPP).expect("client"),
            server.base("/v21.0"),
            Arc::new(test_support::KeyPerChannel),
            retries(HttpTimeouts::WHATSAPP, &MemoryEvents::new()),
        );

        sender.send_text(&reply(None)).await.expect("sent");

        assert_eq!(server.only_request().header("authorization"), Some("Bearer key-of-channel-1"));
    }

    #[tokio::test]
    async fn no_api_key_fails_for_good_without_calling_meta() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]}))).await;
        let sender = MetaSender::new(
            http_client::build(HttpTimeouts::WHATSAPP).expect("client"),
            server.base("/v21.0"),
            Arc::new(GlobalApiKey::new(None)),
            retries(HttpTimeouts::WHATSAPP, &MemoryEvents::new()),
        );

        let error = sender.send_text(&reply(None)).await.expect_err("no key");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn server_error_is_retryable() {
        let error = refused_with(FakeReply::Text(503, "<html>Service Unavailable</html>".into())).await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("http_503"));
        assert!(error.message.contains("HTTP 503"), "{error}");
    }

    #[tokio::test]
    async fn too_many_requests_is_retryable() {
        let error = refused_with(FakeReply::Json(429, json!({"error": {"message": "slow down"}}))).await;

        assert!(error.is_retryable(), "{error:?}");
    }

    #[tokio::test]
    async fn undeliverable_recipient_is_permanent_with_its_code() {
        let error = refused_with(FakeReply::Json(400, meta_error(131026, "Message undeliverable"))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("131026"));
        assert!(error.message.contains("Message undeliverable"), "{error}");
        assert!(error.message.contains("AazhK3x9gX0Dp"), "the trace id helps Meta's support: {error}");
        assert!(error.message.contains("3361XXXXX78"), "details kept, number masked: {error}");
    }

    #[tokio::test]
    async fn outside_the_24_hour_window_is_permanent() {
        let error = refused_with(FakeReply::Json(400, meta_error(131047, "Re-engagement message"))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("131047"));
    }

    #[tokio::test]
    async fn throughput_limit_is_retryable_with_its_code() {
        let error = refused_with(FakeReply::Json(400, meta_error(130429, "Rate limit hit"))).await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("130429"));
    }

    #[tokio::test]
    async fn expired_token_is_permanent() {
        let error = refused_with(FakeReply::Json(401, meta_error(190, "Error validating access token"))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("190"));
    }

    #[tokio::test]
    async fn forbidden_without_a_body_is_permanent() {
        let error = refused_with(FakeReply::Text(403, String::new())).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("http_403"));
    }

    #[tokio::test]
    async fn provider_text_echoing_the_key_and_the_number_is_scrubbed() {
        let echo = format!("invalid token {KEY} for recipient +{PHONE}");
        let error = refused_with(FakeReply::Json(400, meta_error(100, &echo))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert!(error.message.contains("[redacted]"), "{error}");
    }

    #[tokio::test]
    async fn accepted_answer_without_an_id_is_not_retried() {
        let error = refused_with(FakeReply::Json(200, json!({"messaging_product": "whatsapp"}))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent, "a retry could deliver the message twice");
        assert_eq!(error.code.as_deref(), Some("invalid_response"));
    }

    #[test]
    fn base_url_with_or_without_a_trailing_slash_gives_the_same_endpoint() {
        for base in ["https://graph.facebook.com/v21.0", "https://graph.facebook.com/v21.0/"] {
            let sender = MetaSender::new(
                http_client::build(HttpTimeouts::WHATSAPP).expect("client"),
                Url::parse(base).expect("url"),
                Arc::new(GlobalApiKey::new(None)),
                retries(HttpTimeouts::WHATSAPP, &MemoryEvents::new()),
            );
            assert_eq!(
                sender.messages_url("106540352242922").expect("url").as_str(),
                "https://graph.facebook.com/v21.0/106540352242922/messages"
            );
        }
    }

    #[tokio::test]
    async fn meta_that_never_answers_times_out_as_retryable() {
        let server = FakeServer::start(FakeReply::Hang).await;
        let timeouts = HttpTimeouts { connect: Duration::from_secs(1), total: Duration::from_millis(300) };

        let error = sender(&server, timeouts).send_text(&reply(None)).await.expect_err("timed out");

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("timeout"));
        assert_no_secret(&error);
        assert_eq!(server.requests().len(), 1, "the request reached the server, and was not sent again");
    }

    // --- read receipts and the typing indicator ----------------------------------------------

    fn channel() -> ChannelInfo {
        reply(None).channel
    }

    #[tokio::test]
    async fn read_receipt_with_typing_indicator_is_posted_to_the_channel_number() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"success": true}))).await;

        sender(&server, HttpTimeouts::WHATSAPP)
            .mark_read(&channel(), &ProviderMessageId::new("wamid.IN"), true)
            .await
            .expect("marked read");

        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v21.0/106540352242922/messages");
        assert_eq!(request.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.body, test_support::read_receipt_with_typing());
    }

    #[tokio::test]
    async fn read_receipt_without_typing_sends_no_indicator() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"success": true}))).await;

        sender(&server, HttpTimeouts::WHATSAPP)
            .mark_read(&channel(), &ProviderMessageId::new("wamid.IN"), false)
            .await
            .expect("marked read");

        assert_eq!(
            server.only_request().body,
            json!({"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.IN"})
        );
    }

    #[tokio::test]
    async fn read_receipt_refused_for_an_invalid_message_id_is_permanent_and_sent_once() {
        let server = FakeServer::start(FakeReply::Json(400, meta_error(100, "Invalid parameter"))).await;

        let error = sender(&server, HttpTimeouts::WHATSAPP)
            .mark_read(&channel(), &ProviderMessageId::new("wamid.UNKNOWN"), true)
            .await
            .expect_err("refused");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("100"));
        assert_no_secret(&error);
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn read_receipt_meeting_an_outage_is_tried_again_then_reported_retryable() {
        let server = FakeServer::start(FakeReply::Text(503, "<html>Service Unavailable</html>".into())).await;
        let events = MemoryEvents::new();

        let error = sender_at(server.base("/v21.0"), HttpTimeouts::WHATSAPP, &events)
            .mark_read(&channel(), &ProviderMessageId::new("wamid.IN"), true)
            .await
            .expect_err("unavailable");

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("http_503"));
        assert_eq!(server.requests().len(), 2, "marking read twice is harmless: one retry within the ack budget");
        let retried = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].field("providerMessageId"), Some(&json!("wamid.IN")));
    }

    // --- retries within the call: only when Meta certainly did not take the message ---------

    #[tokio::test]
    async fn throttled_send_is_retried_and_the_second_answer_counts() {
        let server = FakeServer::start_sequence(vec![
            FakeReply::Json(429, json!({"error": {"message": "slow down"}})),
            FakeReply::Json(200, json!({"messages": [{"id": "wamid.SECOND"}]})),
        ])
        .await;
        let events = MemoryEvents::new();

        let id = sender_at(server.base("/v21.0"), HttpTimeouts::WHATSAPP, &events)
            .send_text(&reply(Some("wamid.IN")))
            .await
            .expect("sent on the second attempt");

        assert_eq!(id.as_str(), "wamid.SECOND");
        assert_eq!(server.requests().len(), 2);
        let retried = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].field("service"), Some(&json!("meta")));
        assert_eq!(retried[0].field("providerMessageId"), Some(&json!("wamid.IN")));
        assert_eq!(retried[0].field("channelId"), Some(&json!("channel-1")));
        assert_eq!(retried[0].field("code"), Some(&json!("http_429")));
    }

    #[tokio::test]
    async fn transient_meta_code_is_retried_at_most_twice() {
        let server = FakeServer::start(FakeReply::Json(400, meta_error(130429, "Rate limit hit"))).await;
        let events = MemoryEvents::new();

        let error = sender_at(server.base("/v21.0"), HttpTimeouts::WHATSAPP, &events)
            .send_text(&reply(None))
            .await
            .expect_err("still throttled");

        assert!(error.is_retryable(), "the job may try again later: {error:?}");
        assert_eq!(error.code.as_deref(), Some("130429"));
        assert_eq!(server.requests().len(), 3, "one attempt and two retries");
        assert_eq!(events.count(names::PROVIDER_CALL_RETRIED), 2);
    }

    #[tokio::test]
    async fn permanent_refusal_is_sent_once() {
        let server = FakeServer::start(FakeReply::Json(400, meta_error(131026, "Message undeliverable"))).await;
        let events = MemoryEvents::new();

        let error = sender_at(server.base("/v21.0"), HttpTimeouts::WHATSAPP, &events)
            .send_text(&reply(None))
            .await
            .expect_err("refused");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(server.requests().len(), 1);
        assert!(events.all().is_empty());
    }

    #[tokio::test]
    async fn proxy_error_page_is_not_sent_again_within_the_call() {
        // A 502 from a proxy may come after Meta accepted the message: sending again could
        // deliver it twice. The job decides, with its outbound row and its backoff.
        let server = FakeServer::start(FakeReply::Text(502, "<html>Bad Gateway</html>".into())).await;
        let events = MemoryEvents::new();

        let error = sender_at(server.base("/v21.0"), HttpTimeouts::WHATSAPP, &events)
            .send_text(&reply(None))
            .await
            .expect_err("bad gateway");

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(server.requests().len(), 1);
        assert!(events.all().is_empty());
    }

    #[tokio::test]
    async fn refused_connection_is_retried_then_reported_retryable() {
        let events = MemoryEvents::new();

        let error = sender_at(refusing_url().join("/v21.0").expect("url"), HttpTimeouts::WHATSAPP, &events)
            .send_text(&reply(None))
            .await
            .expect_err("nobody listens");

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("connect"));
        assert_eq!(events.count(names::PROVIDER_CALL_RETRIED), 2, "nothing was sent: safe to try again");
        assert_no_secret(&error);
    }
}
