//! The `ack` stage: marks the user's message read (blue ticks) and shows the typing indicator while
//! the answer is prepared, so that the user knows a reply is coming during a slow LLM call.

use std::sync::Arc;

use engine::{
    BuildError, ConfigDuration, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    message::Message,
    ports::{OutboundSender, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Read receipt and typing indicator. Place it after the stages that may drop or answer the
/// message with a notice (dedupe, ratelimit, quota-gate) and before the slow ones (rag-retrieve,
/// llm): a duplicate is then not marked twice, and the indicator shows while the answer is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AckConfig {
    /// Also show "typing…" to the user. WhatsApp hides it when the reply arrives or after about 25
    /// seconds, whichever comes first.
    pub typing: bool,
}

impl Default for AckConfig {
    fn default() -> Self {
        Self { typing: true }
    }
}

impl StageConfig for AckConfig {
    const KIND: &'static str = "ack";
    const DESCRIPTION: &'static str =
        "Marks the user's message read and shows the typing indicator while the answer is prepared.";
    // A courtesy: the answer matters more than the blue ticks, so a provider that cannot mark the
    // message read must not hold it up.
    const DEFAULT_ON_ERROR: OnError = OnError::Open;
    // Short, since it is paid by every message before the LLM starts.
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(2);
    const EXAMPLE: &'static str = "kind = \"ack\"\ntyping = true\n";

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(Ack { typing: self.typing, sender: resources.sender.clone() }))
    }
}

engine::register_stage!(AckConfig);

struct Ack {
    typing: bool,
    sender: Arc<dyn OutboundSender>,
}

#[engine::async_trait]
impl Stage for Ack {
    async fn process(&self, msg: &mut Message, _cx: &StageContext<'_>) -> Result<Decision, StageError> {
        // Nothing is logged on success: the read receipt is one more call per message, and a
        // failure already shows as `stage_failed_open`.
        self.sender.mark_read(&msg.channel, &msg.inbound.provider_message_id, self.typing).await?;
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use engine::{
        events::names,
        memory::{ReadMark, SendFailure},
        runtime::Outcome,
        testing::TestBench,
    };
    use serde_json::json;

    use super::*;

    const ACK_LLM_SEND: &str =
        "[[stages]]\nkind = \"ack\"\n\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n";

    #[tokio::test]
    async fn message_is_marked_read_with_the_typing_indicator_before_the_answer() {
        let bench = TestBench::new();
        bench.llm.answer_with("Bonjour !");
        let pipeline = bench.pipeline(ACK_LLM_SEND);
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(
            bench.sender.read_marks(),
            [ReadMark {
                channel: msg.channel.clone(),
                message_id: msg.inbound.provider_message_id.clone(),
                typing: true
            }]
        );
        assert_eq!(bench.sender.sent_texts(), ["Bonjour !"]);
        assert_eq!(
            bench.events.names(),
            [names::LLM_REQUEST, names::LLM_REQUEST_COMPLETED, names::MESSAGE_SENT],
            "a successful read receipt logs nothing"
        );
    }

    #[tokio::test]
    async fn typing_false_only_marks_the_message_read() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"ack\"\ntyping = false");
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        let marks = bench.sender.read_marks();
        assert_eq!(marks.len(), 1);
        assert!(!marks[0].typing);
    }

    #[tokio::test]
    async fn provider_refusing_the_read_receipt_does_not_stop_the_answer() {
        let bench = TestBench::new();
        bench.sender.fail_read_marks_with(Some(SendFailure::Unavailable));
        bench.llm.answer_with("Bonjour !");
        let pipeline = bench.pipeline(ACK_LLM_SEND);
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.sent_texts(), ["Bonjour !"], "the user is still answered");
        assert!(bench.sender.read_marks().is_empty());
        assert_eq!(
            bench.events.names(),
            [names::STAGE_FAILED_OPEN, names::LLM_REQUEST, names::LLM_REQUEST_COMPLETED, names::MESSAGE_SENT]
        );
        let failed = &bench.events.named(names::STAGE_FAILED_OPEN)[0];
        assert_eq!(failed.field("kind"), Some(&json!("ack")));
        assert!(msg.is_degraded());
    }

    #[tokio::test]
    async fn permanent_refusal_of_the_read_receipt_fails_open_too() {
        let bench = TestBench::new();
        bench.sender.fail_read_marks_with(Some(SendFailure::Permanent { code: "100".into() }));
        let pipeline = bench.pipeline(ACK_LLM_SEND);
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.sent().len(), 1);
        assert_eq!(bench.events.count(names::STAGE_FAILED_OPEN), 1);
    }

    #[test]
    fn example_builds_with_the_defaults() {
        let bench = TestBench::new();
        let spec = engine::config::load_stage(AckConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.kind.kind, "ack");
        assert_eq!(spec.on_error, OnError::Open);
        assert_eq!(spec.timeout, ConfigDuration::from_secs(2));
        spec.config.build(&bench.resources()).unwrap();
        assert_eq!(serde_json::from_value::<AckConfig>(json!({})).unwrap(), AckConfig { typing: true });
        assert!(engine::registry::kinds().contains_key("ack"));
    }

    #[test]
    fn an_unknown_key_is_refused() {
        assert!(engine::config::load_stage("kind = \"ack\"\nread = true\n", "t.toml").is_err());
        assert!(engine::config::load_stage("kind = \"ack\"\ntyping = \"yes\"\n", "t.toml").is_err());
    }
}
