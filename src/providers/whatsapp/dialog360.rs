//! 360dialog's sender: `POST {WHATSAPP_API_URL}/messages` (default `https://waba-v2.360dialog.io`)
//! with the channel's key in the `D360-API-KEY` header, for replies and read receipts alike.
//! 360dialog proxies Meta's Cloud API: the body, the answer and the error codes are Meta's; the
//! number sent from is the one the key belongs to, so the URL names none.

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
pub const SERVICE: &str = "360dialog";

/// The header 360dialog reads the API key from.
pub const API_KEY_HEADER: &str = "D360-API-KEY";

/// 360dialog's Cloud API endpoint.
pub const DEFAULT_API_URL: &str = "https://waba-v2.360dialog.io";

pub struct Dialog360Sender {
    api: CloudApiClient,
    /// `{WHATSAPP_API_URL}/messages`, computed once.
    messages_url: Url,
}

impl Dialog360Sender {
    /// Fails when `base_url` cannot take a path (it is then not an http(s) URL).
    pub fn new(
        client: reqwest::Client,
        base_url: &Url,
        credentials: Arc<dyn CredentialSource>,
        retries: Retries,
    ) -> Result<Self, crate::providers::ProviderError> {
        let mut messages_url = base_url.clone();
        messages_url
            .path_segments_mut()
            .map_err(|_| crate::providers::ProviderError::InvalidBaseUrl { setting: "WHATSAPP_API_URL" })?
            .pop_if_empty()
            .push("messages");
        let api = CloudApiClient::new(client, SERVICE, CloudApiAuth::D360ApiKey, credentials, retries);
        Ok(Self { api, messages_url })
    }
}

#[async_trait]
impl OutboundSender for Dialog360Sender {
    async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
        self.api.send_text(self.messages_url.clone(), message).await
    }

    async fn mark_read(
        &self,
        channel: &ChannelInfo,
        message_id: &ProviderMessageId,
        typing: bool,
    ) -> Result<(), PortError> {
        self.api.mark_read(self.messages_url.clone(), channel, message_id, typing).await
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

    const KEY: &str = "d360-test-api-key";
    const PHONE: &str = "33612345678";

    fn sender_at(base: &Url, timeouts: HttpTimeouts, events: &MemoryEvents) -> Dialog360Sender {
        Dialog360Sender::new(
            http_client::build(timeouts).expect("client"),
            base,
            Arc::new(GlobalApiKey::new(Some(SecretString::from(KEY)))),
            Retries::new(RetryPolicy::fast(timeouts.total), Arc::new(events.clone())),
        )
        .expect("base URL")
    }

    fn sender(server: &FakeServer) -> Dialog360Sender {
        sender_at(&server.url, HttpTimeouts::WHATSAPP, &MemoryEvents::new())
    }

    fn reply() -> OutboundText {
        OutboundText {
            channel: ChannelInfo {
                id: ChannelId::new("channel-360"),
                provider: "360dialog".into(),
                phone_number_id: "106540352242922".into(),
            },
            to: PhoneNumber::new(PHONE),
            text: "Votre commande est partie.".into(),
            reply_to: Some(ProviderMessageId::new("wamid.IN")),
        }
    }

    fn meta_error(code: i64) -> Value {
        test_support::meta_error(code, "error from Meta", PHONE)
    }

    async fn refused_with(answer: FakeReply) -> (PortError, FakeServer) {
        let server = FakeServer::start(answer).await;
        let error = sender(&server).send_text(&reply()).await.expect_err("refused");
        let text = format!("{error} {error:?}");
        assert!(!text.contains(KEY) && !text.contains(PHONE), "{text}");
        (error, server)
    }

    #[tokio::test]
    async fn reply_is_posted_to_messages_with_the_d360_key_and_a_meta_body() {
        let server = FakeServer::start(FakeReply::Json(
            200,
            json!({
                "messaging_product": "whatsapp",
                "contacts": [{"input": PHONE, "wa_id": PHONE}],
                "messages": [{"id": "wamid.HBgLMzM2MTIzNDU2NzgVAgARGBI"}]
            }),
        ))
        .await;

        let id = sender(&server).send_text(&reply()).await.expect("sent");

        assert_eq!(id.as_str(), "wamid.HBgLMzM2MTIzNDU2NzgVAgARGBI");
        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/messages");
        assert_eq!(request.header("D360-API-KEY"), Some(KEY));
        assert_eq!(request.header("authorization"), None, "360dialog takes no bearer token");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(
            request.body,
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": PHONE,
                "type": "text",
                "text": {"preview_url": false, "body": "Votre commande est partie."},
                "context": {"message_id": "wamid.IN"}
            })
        );
    }

    #[tokio::test]
    async fn read_receipt_with_typing_indicator_is_posted_to_messages_with_the_d360_key() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"success": true}))).await;

        sender(&server).mark_read(&reply().channel, &ProviderMessageId::new("wamid.IN"), true).await.expect("marked");

        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/messages");
        assert_eq!(request.header("D360-API-KEY"), Some(KEY));
        assert_eq!(request.header("authorization"), None);
        assert_eq!(request.body, test_support::read_receipt_with_typing());
    }

    #[tokio::test]
    async fn read_receipt_with_a_wrong_key_is_permanent() {
        let server =
            FakeServer::start(FakeReply::Json(401, json!({"meta": {"success": false, "http_code": 401}}))).await;

        let error = sender(&server)
            .mark_read(&reply().channel, &ProviderMessageId::new("wamid.IN"), false)
            .await
            .expect_err("refused");

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("http_401"));
        assert_eq!(error.service, "360dialog");
        assert!(!format!("{error:?}").contains(KEY));
        assert_eq!(server.only_request().body["typing_indicator"], Value::Null);
    }

    #[test]
    fn default_url_and_a_base_with_a_path_give_the_messages_endpoint() {
        for (base, expected) in [
            (DEFAULT_API_URL, "https://waba-v2.360dialog.io/messages"),
            ("https://proxy.example.com/360/", "https://proxy.example.com/360/messages"),
        ] {
            let sender = sender_at(&Url::parse(base).expect("url"), HttpTimeouts::WHATSAPP, &MemoryEvents::new());
            assert_eq!(sender.messages_url.as_str(), expected);
        }
    }

    #[tokio::test]
    async fn channel_key_from_the_credential_source_is_used() {
        let server = FakeServer::start(FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]}))).await;
        let sender = Dialog360Sender::new(
            http_client::build(HttpTimeouts::WHATSAPP).expect("client"),
            &server.url,
            Arc::new(test_support::KeyPerChannel),
            Retries::new(RetryPolicy::fast(HttpTimeouts::WHATSAPP.total), Arc::new(MemoryEvents::new())),
        )
        .expect("sender");

        sender.send_text(&reply()).await.expect("sent");

        assert_eq!(server.only_request().header("D360-API-KEY"), Some("key-of-channel-360"));
    }

    #[tokio::test]
    async fn undeliverable_recipient_is_permanent_and_sent_once() {
        let (error, server) = refused_with(FakeReply::Json(400, meta_error(131026))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("131026"));
        assert_eq!(error.service, "360dialog");
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn wrong_key_is_permanent() {
        let (error, server) =
            refused_with(FakeReply::Json(401, json!({"meta": {"success": false, "http_code": 401}}))).await;

        assert_eq!(error.kind, PortErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("http_401"));
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn transient_meta_code_is_retried_then_reported_retryable() {
        let (error, server) = refused_with(FakeReply::Json(500, meta_error(131000))).await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.code.as_deref(), Some("131000"));
        assert_eq!(server.requests().len(), 3);
    }

    #[tokio::test]
    async fn gateway_timeout_is_retryable_but_not_sent_again_within_the_call() {
        let (error, server) = refused_with(FakeReply::Text(504, "Gateway Timeout".into())).await;

        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn throttled_send_is_retried_and_logged() {
        let server = FakeServer::start_sequence(vec![
            FakeReply::Json(429, json!({"meta": {"success": false, "http_code": 429}})),
            FakeReply::Json(200, json!({"messages": [{"id": "wamid.OUT"}]})),
        ])
        .await;
        let events = MemoryEvents::new();

        let id = sender_at(&server.url, HttpTimeouts::WHATSAPP, &events).send_text(&reply()).await.expect("sent");

        assert_eq!(id.as_str(), "wamid.OUT");
        assert_eq!(server.requests().len(), 2);
        let retried = events.named(names::PROVIDER_CALL_RETRIED);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].field("service"), Some(&json!("360dialog")));
    }

    #[tokio::test]
    async fn unreachable_360dialog_is_retryable() {
        let events = MemoryEvents::new();

        let error =
            sender_at(&refusing_url(), HttpTimeouts::WHATSAPP, &events).send_text(&reply()).await.expect_err("refused");

        assert!(error.is_retryable());
        assert_eq!(error.code.as_deref(), Some("connect"));
        assert_eq!(events.count(names::PROVIDER_CALL_RETRIED), 2);
    }

    #[tokio::test]
    async fn silent_360dialog_times_out_as_retryable_after_one_attempt() {
        let server = FakeServer::start(FakeReply::Hang).await;
        let timeouts = HttpTimeouts { connect: Duration::from_secs(1), total: Duration::from_millis(300) };

        let error =
            sender_at(&server.url, timeouts, &MemoryEvents::new()).send_text(&reply()).await.expect_err("timeout");

        assert!(error.is_retryable());
        assert_eq!(error.code.as_deref(), Some("timeout"));
        assert_eq!(server.requests().len(), 1, "the message may have been taken: not sent again");
    }
}
