//! The `send` stage, last in every pipeline: records the reply as an outbound row, then sends it
//! through the WhatsApp provider, so that a retried job never answers the same message twice. It
//! also keeps Meta's 24-hour customer-service window: a free-form reply to a message older than the
//! window is refused here rather than by the provider.

use std::{sync::Arc, time::Duration};

use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::{Event, names},
    masking::mask_phones_in,
    message::{Message, ReplySource, SentReply},
    ports::{
        Clock, NewOutbound, OutboundRecord, OutboundSender, OutboundStatus, OutboundText, PortError, RelationalStore,
        Resources,
    },
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Delivery of the reply to the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SendConfig {
    /// Quote the user's message in the answer (WhatsApp shows it above the reply), so that the
    /// user sees which message is answered when several crossed.
    pub quote: bool,
    /// The customer-service window: how long after the user's message (its provider timestamp) a
    /// free-form reply may still be sent. Meta refuses free-form messages once 24 hours have
    /// passed since the user last wrote (error 131047); an older reply is recorded as failed with
    /// the code `window_closed` and not sent.
    pub window: ConfigDuration,
}

/// Meta's customer-service window.
const META_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The outbound row's failure code for a reply refused for the customer-service window.
pub const WINDOW_CLOSED: &str = "window_closed";

impl Default for SendConfig {
    fn default() -> Self {
        Self { quote: true, window: ConfigDuration::from_secs(META_WINDOW.as_secs()) }
    }
}

impl StageConfig for SendConfig {
    const KIND: &'static str = "send";
    const DESCRIPTION: &'static str = "Records the reply, then sends it to the user through the WhatsApp provider.";
    const DEFAULT_ON_ERROR: OnError = OnError::Closed;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(10);
    const EXAMPLE: &'static str = "kind = \"send\"\nquote = true\nwindow = \"24h\"\n";

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.window.get() > META_WINDOW {
            problems.push(ConfigProblem::warning(
                "window",
                format!(
                    "{} is longer than WhatsApp's 24h customer-service window: Meta refuses the replies sent after 24h (error 131047)",
                    self.window
                ),
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(SendStage {
            quote: self.quote,
            window: self.window.get(),
            store: resources.store.clone(),
            sender: resources.sender.clone(),
            clock: resources.clock.clone(),
        }))
    }
}

engine::register_stage!(SendConfig);

/// The running stage.
pub struct SendStage {
    quote: bool,
    window: Duration,
    store: Arc<dyn RelationalStore>,
    sender: Arc<dyn OutboundSender>,
    clock: Arc<dyn Clock>,
}

#[engine::async_trait]
impl Stage for SendStage {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let Some(reply) = msg.reply.clone() else {
            cx.emit(Event::debug(names::SEND_SKIPPED).with("reason", "no_reply"));
            return Ok(Decision::Continue);
        };
        if reply.text.trim().is_empty() {
            // The provider would refuse it for good; an empty answer is a bug upstream, not
            // something to record and deliver.
            cx.emit(
                Event::warn(names::SEND_SKIPPED)
                    .with("reason", "empty_reply")
                    .with("replySource", source_name(&reply.source)),
            );
            return Ok(Decision::Continue);
        }

        // Recorded before sending: if the worker dies after the provider accepted the message, the
        // retried job finds this row instead of answering again.
        let record = self
            .store
            .begin_outbound(&NewOutbound {
                tenant: msg.tenant.id.clone(),
                channel: msg.channel.id.clone(),
                conversation: msg.conversation.id.clone(),
                in_reply_to: msg.inbound.provider_message_id.clone(),
                text: reply.text.clone(),
            })
            .await?;

        if record.status == OutboundStatus::Sent {
            msg.sent = record
                .provider_message_id
                .clone()
                .map(|provider_message_id| SentReply { outbound_id: record.id.clone(), provider_message_id });
            cx.emit(Event::debug(names::SEND_SKIPPED).with("reason", "already_sent").with("outboundId", &record.id));
            return Ok(Decision::Continue);
        }

        // Checked after the row is found, not before: a reply already sent stays sent however late
        // the retry, and a refused one is kept, failed, for the operator to see what was not said.
        if let Some(age) = self.window_closed(msg) {
            return self.refused_for_window(&record, age, cx).await;
        }

        // A failed row is tried again too: permanent failures are not retried, so this run is a
        // replay or a redelivery, typically after what was refused got fixed; a refusal that
        // persists only fails again.
        let outbound = OutboundText {
            channel: msg.channel.clone(),
            to: msg.inbound.from.clone(),
            // The recorded text, not this run's reply: a retry must send what was recorded.
            text: record.text.clone(),
            reply_to: self.quote.then(|| msg.inbound.provider_message_id.clone()),
        };
        match self.sender.send_text(&outbound).await {
            Ok(sent_id) => {
                let recorded = self.store.mark_outbound_sent(&record.id, &sent_id).await;
                let mut event = Event::info(names::MESSAGE_SENT)
                    .with("outboundId", &record.id)
                    .with("sentMessageId", sent_id.as_str())
                    .with("replySource", source_name(&reply.source))
                    .with("quoted", outbound.reply_to.is_some())
                    .with("degraded", msg.is_degraded());
                if let ReplySource::Notice { stage } = &reply.source {
                    event = event.with("noticeStage", stage);
                }
                // The user has the answer: failing the job now would send it a second time. The row
                // stays pending and the warning says why.
                if let Err(e) = recorded {
                    event.level = engine::events::Level::Warn;
                    event = event.with("recordError", mask_phones_in(&e.to_string()));
                }
                cx.emit(event);
                msg.sent = Some(SentReply { outbound_id: record.id, provider_message_id: sent_id });
                Ok(Decision::Continue)
            }
            Err(e) => Err(self.failed(&record, e, cx).await),
        }
    }
}

impl SendStage {
    /// The age of the user's message when it is older than the window: the provider would refuse
    /// a free-form reply for good. A timestamp ahead of our clock (skew) counts as fresh.
    fn window_closed(&self, msg: &Message) -> Option<chrono::Duration> {
        let age = self.clock.now().signed_duration_since(msg.inbound.sent_at);
        let window = chrono::Duration::from_std(self.window).unwrap_or(chrono::Duration::MAX);
        (age > window).then_some(age)
    }

    /// Closes the row as failed (`window_closed`) and ends the job cleanly, without an answer (the
    /// outcome is `Dropped` with the reason): retrying cannot reopen the window, only the user's
    /// next message can, and that message gets its own answer.
    async fn refused_for_window(
        &self,
        record: &OutboundRecord,
        age: chrono::Duration,
        cx: &StageContext<'_>,
    ) -> Result<Decision, StageError> {
        cx.emit(
            Event::warn(names::SEND_REFUSED_WINDOW)
                .with("outboundId", &record.id)
                .with("ageSeconds", age.num_seconds())
                .with("windowSeconds", self.window.as_secs()),
        );
        let reason = format!(
            "the user's message is {}s old, past the {}s customer-service window",
            age.num_seconds(),
            self.window.as_secs()
        );
        // When the row cannot be closed the job fails and is retried, so that no row stays pending
        // for a reply that will never go out; the retry refuses again without sending.
        self.store.mark_outbound_failed(&record.id, Some(WINDOW_CLOSED), &reason).await?;
        Ok(Decision::Drop(reason))
    }

    /// Records and logs a refused send; the error returned fails the job, retried or dead-lettered
    /// according to the error's kind.
    async fn failed(&self, record: &OutboundRecord, error: PortError, cx: &StageContext<'_>) -> StageError {
        let reason = mask_phones_in(&error.to_string());
        let retryable = error.is_retryable();
        let mut event = if retryable { Event::warn(names::SEND_FAILED) } else { Event::error(names::SEND_FAILED) };
        event = event
            .with("outboundId", &record.id)
            .with("code", &error.code)
            .with("retryable", retryable)
            .with("error", &reason);
        if !retryable {
            // Only a permanent refusal closes the row: a transient one stays pending for the retry.
            if let Err(e) = self.store.mark_outbound_failed(&record.id, error.code.as_deref(), &reason).await {
                event = event.with("recordError", mask_phones_in(&e.to_string()));
            }
        }
        cx.emit(event);
        StageError::Port(error)
    }
}

fn source_name(source: &ReplySource) -> &'static str {
    match source {
        ReplySource::Llm => "llm",
        ReplySource::Notice { .. } => "notice",
    }
}

#[cfg(test)]
mod tests {
    use engine::{
        events::Level,
        ids::{ConversationId, ProviderMessageId, TenantId},
        memory::{MemoryStore, SendFailure},
        message::{KnowledgeChunk, QuotaBlock, Reply},
        ports::{HistoryMessage, QuotaDecision},
        runtime::{Outcome, Pipeline, StageSlot},
        testing::{TEST_PHONE, TestBench},
    };
    use serde_json::json;

    use super::*;

    const LLM_AND_SEND: &str = "[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n";

    fn with_reply(bench: &TestBench, text: &str, source: ReplySource) -> Message {
        let mut msg = bench.message("Bonjour");
        msg.reply = Some(Reply { text: text.into(), source });
        msg
    }

    #[tokio::test]
    async fn llm_answer_is_sent_to_the_user_quoting_their_message() {
        let bench = TestBench::new();
        bench.llm.answer_with("Bonjour ! Que puis-je pour vous ?");
        let pipeline = bench.pipeline(LLM_AND_SEND);
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        let sent = bench.sender.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].text, "Bonjour ! Que puis-je pour vous ?");
        assert_eq!(sent[0].to.expose(), TEST_PHONE);
        assert_eq!(sent[0].reply_to.as_ref(), Some(&msg.inbound.provider_message_id));
        assert_eq!(sent[0].channel, msg.channel);
        assert_eq!(
            bench.events.names(),
            [names::LLM_REQUEST, names::LLM_REQUEST_COMPLETED, names::MESSAGE_SENT],
            "scenario A"
        );
    }

    #[tokio::test]
    async fn quote_false_sends_without_quoting() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"\nquote = false");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        let sent = bench.sender.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].reply_to, None);
        assert_eq!(bench.events.named(names::MESSAGE_SENT)[0].field("quoted"), Some(&json!(false)));
    }

    #[tokio::test]
    async fn outbound_row_is_marked_sent_with_the_provider_id() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);

        bench.run(&pipeline, &mut msg).await;

        let rows = bench.store.outbound();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, OutboundStatus::Sent);
        assert_eq!(rows[0].text, "Bonjour !");
        let provider_id = rows[0].provider_message_id.clone().expect("provider id recorded");
        assert_eq!(
            msg.sent,
            Some(SentReply { outbound_id: rows[0].id.clone(), provider_message_id: provider_id.clone() })
        );

        let events = bench.events.named(names::MESSAGE_SENT);
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.level, Level::Info);
        assert_eq!(event.field("outboundId"), Some(&json!(rows[0].id)));
        assert_eq!(event.field("sentMessageId"), Some(&json!(provider_id.as_str())));
        assert_eq!(event.field("replySource"), Some(&json!("llm")));
        assert_eq!(event.field("degraded"), Some(&json!(false)));
        assert_eq!(event.field("conversationId"), Some(&json!("conv-1")));
        let line = engine::events::JsonLinesSink::render(event);
        assert!(!line.contains(TEST_PHONE), "phone number in the log line: {line}");
    }

    #[tokio::test]
    async fn degraded_message_is_flagged_in_message_sent() {
        let bench = TestBench::new();
        bench.embedder.set_failing(true);
        let pipeline = bench.pipeline(
            "[[stages]]\nkind = \"rag-retrieve\"\n\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n",
        );
        let mut msg = bench.message("Vos horaires ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.sent().len(), 1);
        assert_eq!(bench.events.named(names::MESSAGE_SENT)[0].field("degraded"), Some(&json!(true)));
    }

    #[tokio::test]
    async fn retried_job_after_a_successful_send_sends_nothing_more() {
        let bench = TestBench::new();
        bench.llm.answer_with("Première réponse");
        let pipeline = bench.pipeline(LLM_AND_SEND);
        let mut msg = bench.message("Bonjour");
        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);
        let first = msg.sent.clone();

        bench.llm.answer_with("Autre réponse");
        bench.events.clear();
        let mut again = bench.retry(&msg);
        assert_eq!(bench.run(&pipeline, &mut again).await, Outcome::Completed);

        assert_eq!(bench.sender.sent_texts(), ["Première réponse"]);
        assert_eq!(bench.sender.attempts(), 1);
        assert_eq!(bench.store.outbound().len(), 1);
        assert_eq!(again.sent, first);
        assert_eq!(bench.events.count(names::MESSAGE_SENT), 0);
        let skipped = bench.events.named(names::SEND_SKIPPED);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].field("reason"), Some(&json!("already_sent")));
    }

    #[tokio::test]
    async fn permanent_refusal_fails_the_row_and_the_job_without_retry() {
        let bench = TestBench::new();
        bench.sender.fail_with(Some(SendFailure::Permanent { code: "131026".into() }));
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);

        let outcome = bench.run(&pipeline, &mut msg).await;

        let Outcome::Failed { stage, retryable, error, .. } = outcome else {
            panic!("expected Failed, got {outcome:?}")
        };
        assert_eq!(stage, "send");
        assert!(!retryable, "a permanent refusal must be dead-lettered, not retried");
        assert!(matches!(error, StageError::Port(ref e) if e.code.as_deref() == Some("131026")), "{error:?}");
        let rows = bench.store.outbound();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, OutboundStatus::Failed);
        assert_eq!(bench.store.outbound_failure(&rows[0].id).as_deref(), Some("131026"));
        assert!(bench.sender.sent().is_empty());
        assert_eq!(msg.sent, None);

        let failed = bench.events.named(names::SEND_FAILED);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].level, Level::Error);
        assert_eq!(failed[0].field("code"), Some(&json!("131026")));
        assert_eq!(failed[0].field("retryable"), Some(&json!(false)));
        assert_eq!(bench.events.count(names::MESSAGE_SENT), 0);
    }

    #[tokio::test]
    async fn transient_failure_is_retried_and_the_retry_sends_exactly_once() {
        let bench = TestBench::new();
        bench.llm.answer_with("Réponse enregistrée");
        bench.sender.set_failing(true);
        let pipeline = bench.pipeline(LLM_AND_SEND);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(
            matches!(outcome, Outcome::Failed { retryable: true, ref stage, .. } if stage == "send"),
            "{outcome:?}"
        );
        let failed = bench.events.named(names::SEND_FAILED);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].level, Level::Warn);
        assert_eq!(failed[0].field("retryable"), Some(&json!(true)));
        assert_eq!(bench.store.outbound()[0].status, OutboundStatus::Pending);

        bench.sender.set_failing(false);
        bench.llm.answer_with("Nouvelle réponse du LLM");
        let mut again = bench.retry(&msg);
        assert_eq!(bench.run(&pipeline, &mut again).await, Outcome::Completed);

        assert_eq!(bench.sender.sent_texts(), ["Réponse enregistrée"], "the retry sends the recorded text, once");
        let rows = bench.store.outbound();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, OutboundStatus::Sent);
        assert_eq!(bench.events.count(names::MESSAGE_SENT), 1);
    }

    #[tokio::test]
    async fn notice_reply_is_sent_as_a_notice() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg =
            with_reply(&bench, crate::notices::QUOTA_EXCEEDED, ReplySource::Notice { stage: "quota-gate".into() });

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.sent_texts(), [crate::notices::QUOTA_EXCEEDED]);
        let event = &bench.events.named(names::MESSAGE_SENT)[0];
        assert_eq!(event.field("replySource"), Some(&json!("notice")));
        assert_eq!(event.field("noticeStage"), Some(&json!("quota-gate")));
    }

    #[tokio::test]
    async fn quota_notice_from_the_pipeline_is_sent_without_asking_the_llm() {
        let bench = TestBench::new();
        bench.store.set_usage(&TenantId::new("tenant-1"), "2026-11", 1000);
        let pipeline = bench.pipeline(
            "[[stages]]\nkind = \"quota-gate\"\n\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n",
        );
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Replied { stage: "quota-gate".into() });

        assert_eq!(bench.sender.sent_texts(), [crate::notices::QUOTA_EXCEEDED]);
        assert!(bench.llm.requests().is_empty());
        assert_eq!(bench.events.count(names::LLM_REQUEST), 0, "scenario B: no llm_request");
        let event = &bench.events.named(names::MESSAGE_SENT)[0];
        assert_eq!(event.field("replySource"), Some(&json!("notice")));
        assert_eq!(event.field("noticeStage"), Some(&json!("quota-gate")));
    }

    #[tokio::test]
    async fn no_reply_sends_nothing() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.attempts(), 0);
        assert!(bench.store.outbound().is_empty());
        assert_eq!(msg.sent, None);
        let skipped = bench.events.named(names::SEND_SKIPPED);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].level, Level::Debug);
        assert_eq!(skipped[0].field("reason"), Some(&json!("no_reply")));
    }

    #[tokio::test]
    async fn empty_reply_is_neither_recorded_nor_sent() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = with_reply(&bench, "  ", ReplySource::Llm);

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.attempts(), 0);
        assert!(bench.store.outbound().is_empty());
        assert_eq!(bench.events.named(names::SEND_SKIPPED)[0].field("reason"), Some(&json!("empty_reply")));
    }

    #[tokio::test]
    async fn store_down_fails_the_job_and_sends_nothing() {
        let bench = TestBench::new();
        bench.store.set_failing(true);
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(matches!(outcome, Outcome::Failed { retryable: true, .. }), "{outcome:?}");
        assert_eq!(bench.sender.attempts(), 0, "nothing may be sent before it is recorded");
        assert_eq!(msg.sent, None);
        assert_eq!(bench.events.count(names::MESSAGE_SENT), 0);
    }

    #[tokio::test]
    async fn store_down_with_on_error_open_still_sends_nothing_unrecorded() {
        let bench = TestBench::new();
        bench.store.set_failing(true);
        let pipeline = bench.stage("kind = \"send\"\non_error = \"open\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.sender.attempts(), 0);
        assert!(msg.is_degraded());
        assert_eq!(bench.events.names(), [names::STAGE_FAILED_OPEN]);
    }

    /// The in-memory store, except that recording a sent message fails.
    struct SentNotRecorded(Arc<MemoryStore>);

    #[engine::async_trait]
    impl RelationalStore for SentNotRecorded {
        async fn consume_monthly_quota(
            &self,
            tenant: &TenantId,
            period: &str,
            limit: u64,
            message: &ProviderMessageId,
        ) -> Result<QuotaDecision, PortError> {
            self.0.consume_monthly_quota(tenant, period, limit, message).await
        }
        async fn block_conversation_quota(&self, c: &ConversationId, b: &QuotaBlock) -> Result<(), PortError> {
            self.0.block_conversation_quota(c, b).await
        }
        async fn recent_messages(&self, c: &ConversationId, limit: usize) -> Result<Vec<HistoryMessage>, PortError> {
            self.0.recent_messages(c, limit).await
        }
        async fn search_knowledge(
            &self,
            tenant: &TenantId,
            embedding: &[f32],
            top_k: usize,
            min_score: f32,
        ) -> Result<Vec<KnowledgeChunk>, PortError> {
            self.0.search_knowledge(tenant, embedding, top_k, min_score).await
        }
        async fn begin_outbound(&self, outbound: &NewOutbound) -> Result<OutboundRecord, PortError> {
            self.0.begin_outbound(outbound).await
        }
        async fn mark_outbound_sent(&self, _: &str, _: &ProviderMessageId) -> Result<(), PortError> {
            Err(PortError::unavailable("postgres", "connection reset (test)"))
        }
        async fn mark_outbound_failed(&self, id: &str, code: Option<&str>, reason: &str) -> Result<(), PortError> {
            self.0.mark_outbound_failed(id, code, reason).await
        }
    }

    #[tokio::test]
    async fn send_accepted_but_not_recorded_does_not_fail_the_job() {
        let bench = TestBench::new();
        let mut resources = bench.resources();
        resources.store = Arc::new(SentNotRecorded(bench.store.clone()));
        let pipeline = Pipeline {
            tier: None,
            stages: vec![StageSlot {
                id: "send".into(),
                kind: "send",
                on_error: OnError::Closed,
                timeout: std::time::Duration::from_secs(10),
                fingerprint: String::new(),
                stage: SendConfig::default().build(&resources).unwrap(),
            }],
        };
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed, "failing now would answer twice");

        assert_eq!(bench.sender.sent_texts(), ["Bonjour !"]);
        assert!(msg.sent.is_some());
        let event = &bench.events.named(names::MESSAGE_SENT)[0];
        assert_eq!(event.level, Level::Warn);
        assert!(event.field("recordError").is_some());
    }

    #[test]
    fn example_builds_with_the_defaults() {
        let bench = TestBench::new();
        let spec = engine::config::load_stage(SendConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.on_error, OnError::Closed);
        assert_eq!(spec.timeout, ConfigDuration::from_secs(10));
        spec.config.build(&bench.resources()).unwrap();
        assert_eq!(
            serde_json::from_value::<SendConfig>(json!({})).unwrap(),
            SendConfig { quote: true, window: ConfigDuration::from_secs(24 * 3600) }
        );
        assert!(engine::config::load_stage("kind = \"send\"\nquote = \"yes\"", "t.toml").is_err());
    }

    // ---- the 24-hour customer-service window

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test]
    async fn reply_to_a_message_older_than_24h_is_refused_recorded_failed_and_not_retried() {
        let bench = TestBench::new();
        bench.llm.answer_with("Réponse bien trop tardive");
        let pipeline = bench.pipeline(LLM_AND_SEND);
        let mut msg = bench.message("Bonjour");
        // The job ran late (PostgreSQL down for a day, say): the user wrote 24h and 1s ago.
        bench.clock.advance(DAY + Duration::from_secs(1));

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(matches!(outcome, Outcome::Dropped { ref stage, .. } if stage == "send"), "{outcome:?}");
        assert_eq!(bench.sender.attempts(), 0, "nothing may reach the provider");
        assert_eq!(msg.sent, None);
        let rows = bench.store.outbound();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, OutboundStatus::Failed);
        assert_eq!(rows[0].text, "Réponse bien trop tardive", "the row keeps what was not said");
        assert_eq!(bench.store.outbound_failure(&rows[0].id).as_deref(), Some(WINDOW_CLOSED));

        let refused = bench.events.named(names::SEND_REFUSED_WINDOW);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].level, Level::Warn);
        assert_eq!(refused[0].field("ageSeconds"), Some(&json!(86_401)));
        assert_eq!(refused[0].field("windowSeconds"), Some(&json!(86_400)));
        assert_eq!(refused[0].field("outboundId"), Some(&json!(rows[0].id)));
        assert_eq!(refused[0].field("providerMessageId"), Some(&json!(msg.inbound.provider_message_id.as_str())));
        assert_eq!(bench.events.count(names::MESSAGE_SENT), 0);
        assert_eq!(bench.events.count(names::SEND_FAILED), 0, "a refusal is not a provider failure");
    }

    #[tokio::test]
    async fn reply_within_24h_of_the_users_message_is_sent() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);
        bench.clock.advance(DAY);

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed, "exactly 24h is still inside");

        assert_eq!(bench.sender.sent_texts(), ["Bonjour !"]);
        assert_eq!(bench.events.count(names::SEND_REFUSED_WINDOW), 0);
    }

    #[tokio::test]
    async fn notice_past_the_window_is_refused_too() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg =
            with_reply(&bench, crate::notices::RATE_LIMITED, ReplySource::Notice { stage: "ratelimit".into() });
        bench.clock.advance(2 * DAY);

        bench.run(&pipeline, &mut msg).await;

        assert_eq!(bench.sender.attempts(), 0);
        assert_eq!(bench.events.named(names::SEND_REFUSED_WINDOW)[0].field("ageSeconds"), Some(&json!(172_800)));
    }

    #[tokio::test]
    async fn configured_window_refuses_earlier() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"\nwindow = \"1h\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);
        bench.clock.advance(Duration::from_secs(3601));

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(matches!(outcome, Outcome::Dropped { .. }), "{outcome:?}");
        assert_eq!(bench.sender.attempts(), 0);
        assert_eq!(bench.events.named(names::SEND_REFUSED_WINDOW)[0].field("windowSeconds"), Some(&json!(3600)));
    }

    #[tokio::test]
    async fn retry_after_the_window_closed_does_not_undo_a_reply_already_sent() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"send\"");
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);
        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);
        let first = msg.sent.clone();

        bench.clock.advance(2 * DAY);
        bench.events.clear();
        let mut again = bench.retry(&msg);
        again.reply = msg.reply.clone();
        assert_eq!(bench.run(&pipeline, &mut again).await, Outcome::Completed);

        assert_eq!(again.sent, first);
        assert_eq!(bench.sender.attempts(), 1);
        assert_eq!(bench.store.outbound()[0].status, OutboundStatus::Sent);
        assert_eq!(bench.events.names(), [names::SEND_SKIPPED]);
    }

    #[tokio::test]
    async fn refusal_that_cannot_be_recorded_is_retried_and_recorded_by_the_retry() {
        let bench = TestBench::new();
        let mut resources = bench.resources();
        let store = Arc::new(FailsMarkingFailed { inner: bench.store.clone(), failing: true.into() });
        resources.store = store.clone();
        let pipeline = Pipeline {
            tier: None,
            stages: vec![StageSlot {
                id: "send".into(),
                kind: "send",
                on_error: OnError::Closed,
                timeout: std::time::Duration::from_secs(10),
                fingerprint: String::new(),
                stage: SendConfig::default().build(&resources).unwrap(),
            }],
        };
        let mut msg = with_reply(&bench, "Bonjour !", ReplySource::Llm);
        bench.clock.advance(2 * DAY);

        let outcome = bench.run(&pipeline, &mut msg).await;
        assert!(matches!(outcome, Outcome::Failed { retryable: true, .. }), "{outcome:?}");
        assert_eq!(bench.store.outbound()[0].status, OutboundStatus::Pending);

        store.failing.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut again = bench.retry(&msg);
        again.reply = msg.reply.clone();
        let outcome = bench.run(&pipeline, &mut again).await;

        assert!(matches!(outcome, Outcome::Dropped { .. }), "{outcome:?}");
        assert_eq!(bench.sender.attempts(), 0);
        assert_eq!(bench.store.outbound()[0].status, OutboundStatus::Failed);
        assert_eq!(bench.store.outbound_failure(&bench.store.outbound()[0].id).as_deref(), Some(WINDOW_CLOSED));
    }

    /// The in-memory store, except that closing a row as failed fails while `failing` is set.
    struct FailsMarkingFailed {
        inner: Arc<MemoryStore>,
        failing: std::sync::atomic::AtomicBool,
    }

    #[engine::async_trait]
    impl RelationalStore for FailsMarkingFailed {
        async fn consume_monthly_quota(
            &self,
            tenant: &TenantId,
            period: &str,
            limit: u64,
            message: &ProviderMessageId,
        ) -> Result<QuotaDecision, PortError> {
            self.inner.consume_monthly_quota(tenant, period, limit, message).await
        }
        async fn block_conversation_quota(&self, c: &ConversationId, b: &QuotaBlock) -> Result<(), PortError> {
            self.inner.block_conversation_quota(c, b).await
        }
        async fn recent_messages(&self, c: &ConversationId, limit: usize) -> Result<Vec<HistoryMessage>, PortError> {
            self.inner.recent_messages(c, limit).await
        }
        async fn search_knowledge(
            &self,
            tenant: &TenantId,
            embedding: &[f32],
            top_k: usize,
            min_score: f32,
        ) -> Result<Vec<KnowledgeChunk>, PortError> {
            self.inner.search_knowledge(tenant, embedding, top_k, min_score).await
        }
        async fn begin_outbound(&self, outbound: &NewOutbound) -> Result<OutboundRecord, PortError> {
            self.inner.begin_outbound(outbound).await
        }
        async fn mark_outbound_sent(&self, id: &str, sent: &ProviderMessageId) -> Result<(), PortError> {
            self.inner.mark_outbound_sent(id, sent).await
        }
        async fn mark_outbound_failed(&self, id: &str, code: Option<&str>, reason: &str) -> Result<(), PortError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(PortError::unavailable("postgres", "connection reset (test)"));
            }
            self.inner.mark_outbound_failed(id, code, reason).await
        }
    }

    #[test]
    fn a_window_longer_than_24h_is_warned_about() {
        let long = SendConfig { window: ConfigDuration::from_secs(48 * 3600), ..SendConfig::default() };
        let problems = long.check();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "window");
        assert!(problems[0].warning);
        assert!(SendConfig::default().check().is_empty());
        assert!(engine::config::load_stage("kind = \"send\"\nwindow = \"0s\"", "t.toml").is_err());
        assert!(engine::config::load_stage("kind = \"send\"\nwindow = 24", "t.toml").is_err());
    }
}
