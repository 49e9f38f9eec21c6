//! The `sandbox` sender, the embedded default: accepts every message without calling anyone,
//! prints it as a `sandbox_reply` event, and returns an id of its own. The send stage records the
//! reply in the database like any other, which is where `parley simulate` reads it.

use std::sync::Arc;

use engine::{
    async_trait,
    events::{Event, EventSink},
    ids::ProviderMessageId,
    masking::mask_phones_in,
    ports::{OutboundSender, OutboundText, PortError},
};

/// The event the sandbox prints for each reply. Only the sandbox emits it, and only in
/// development (production refuses the sandbox).
pub use engine::events::names::SANDBOX_REPLY;

/// The prefix of the ids the sandbox returns, so that they never pass for a real `wamid`.
pub const SANDBOX_ID_PREFIX: &str = "sandbox.";

pub struct SandboxSender {
    events: Arc<dyn EventSink>,
}

impl SandboxSender {
    pub fn new(events: Arc<dyn EventSink>) -> Self {
        Self { events }
    }
}

#[async_trait]
impl OutboundSender for SandboxSender {
    async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
        // v7: time-ordered, so that sandbox ids sort like the replies they stand for.
        let id = ProviderMessageId::new(format!("{SANDBOX_ID_PREFIX}{}", uuid::Uuid::now_v7()));
        self.events.emit(
            Event::info(SANDBOX_REPLY)
                .with("sentMessageId", id.as_str())
                .with("channelId", message.channel.id.as_str())
                .with("to", message.to.to_string())
                .with("providerMessageId", message.reply_to.as_ref().map(ProviderMessageId::as_str))
                // The reply may quote a number the user wrote.
                .with("text", mask_phones_in(&message.text)),
        );
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use engine::{
        events::{JsonLinesSink, MemoryEvents},
        ids::{ChannelId, PhoneNumber},
        message::ChannelInfo,
    };
    use serde_json::json;

    use super::*;

    fn reply(text: &str) -> OutboundText {
        OutboundText {
            channel: ChannelInfo {
                id: ChannelId::new("channel-1"),
                provider: "sandbox".into(),
                phone_number_id: "PHONE_NUMBER_ID".into(),
            },
            to: PhoneNumber::new("33612345678"),
            text: text.into(),
            reply_to: Some(ProviderMessageId::new("wamid.IN")),
        }
    }

    #[tokio::test]
    async fn sandbox_accepts_the_reply_and_prints_it_with_the_number_masked() {
        let events = MemoryEvents::new();
        let sender = SandboxSender::new(Arc::new(events.clone()));

        let id = sender.send_text(&reply("Bonjour ! Comment puis-je vous aider ?")).await.expect("accepted");

        assert!(id.as_str().starts_with("sandbox."), "{id}");
        assert!(uuid::Uuid::parse_str(&id.as_str()["sandbox.".len()..]).is_ok(), "{id}");
        let printed = events.named(SANDBOX_REPLY);
        assert_eq!(printed.len(), 1);
        assert_eq!(printed[0].field("text"), Some(&json!("Bonjour ! Comment puis-je vous aider ?")));
        assert_eq!(printed[0].field("to"), Some(&json!("3361XXXXX78")));
        assert_eq!(printed[0].field("providerMessageId"), Some(&json!("wamid.IN")));
        assert_eq!(printed[0].field("sentMessageId"), Some(&json!(id.as_str())));
        assert!(!JsonLinesSink::render(&printed[0]).contains("33612345678"));
    }

    #[tokio::test]
    async fn every_reply_gets_its_own_id() {
        let sender = SandboxSender::new(Arc::new(MemoryEvents::new()));

        let first = sender.send_text(&reply("un")).await.expect("accepted");
        let second = sender.send_text(&reply("deux")).await.expect("accepted");

        assert_ne!(first, second);
    }
}
