//! The `ratelimit` stage: counts every message against a per-conversation and a per-sender fixed
//! window, and answers the first excess of a window with one notice (the checklist's scenario D).

use std::{sync::Arc, time::Duration};

use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::{Event, names},
    masking::sender_pseudonym,
    message::Message,
    ports::{Claim, HitOnce, KeyValueStore, Resources, WindowCount, WindowKey},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::notices;

/// Limits the messages of one conversation and of one sender, each over its own window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Messages one conversation may send per window (`ratelimit:conv:{conversationId}`).
    pub conversation: ConversationLimit,
    /// Messages one sender may send per window, across all conversations with the tenant
    /// (`ratelimit:sender:{tenantId}:{senderId}`, the sender id a keyed hash of the number).
    pub sender: SenderLimit,
    /// The text sent once per window when a limit is exceeded; later excess messages of the same
    /// window are dropped without an answer.
    pub notice: String,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            conversation: ConversationLimit::default(),
            sender: SenderLimit::default(),
            notice: notices::RATE_LIMITED.to_owned(),
        }
    }
}

// Two types with the same shape, so that each scope has its own defaults: `conversation = { limit
// = 10 }` keeps the 30 s window, `sender = { limit = 50 }` the 5 min one.

/// Per-conversation limit: `limit` messages per `window`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationLimit {
    /// Messages allowed per window; the next one is over the limit.
    #[schemars(range(min = 1))]
    pub limit: u64,
    /// Length of the fixed window, which starts at the window's first message.
    pub window: ConfigDuration,
}

impl Default for ConversationLimit {
    fn default() -> Self {
        Self { limit: 5, window: ConfigDuration::from_secs(30) }
    }
}

/// Per-sender limit: `limit` messages per `window`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SenderLimit {
    /// Messages allowed per window; the next one is over the limit.
    #[schemars(range(min = 1))]
    pub limit: u64,
    /// Length of the fixed window, which starts at the window's first message.
    pub window: ConfigDuration,
}

impl Default for SenderLimit {
    fn default() -> Self {
        Self { limit: 20, window: ConfigDuration::from_secs(300) }
    }
}

impl StageConfig for RateLimitConfig {
    const KIND: &'static str = "ratelimit";
    const DESCRIPTION: &'static str =
        "Limits messages per conversation and per sender; the first excess of a window gets one notice.";
    const DEFAULT_ON_ERROR: OnError = OnError::Open;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_millis(500);
    const EXAMPLE: &'static str = "kind = \"ratelimit\"\n\
        conversation = { limit = 5, window = \"30s\" }\n\
        sender = { limit = 20, window = \"5m\" }\n\
        notice = \"⚠️ Trop de messages en peu de temps. Merci de réessayer dans quelques instants.\"\n";

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        // A conversation's messages are all its sender's messages too. With a smaller sender limit
        // over at least as long a window, the sender counter always crosses first, so the
        // conversation limit is dead configuration. A shorter sender window is a legitimate burst
        // limit (3 per 10 s besides 5 per 30 s) and is not flagged.
        if self.sender.limit < self.conversation.limit && self.sender.window >= self.conversation.window {
            problems.push(ConfigProblem::warning(
                "sender.limit",
                format!(
                    "the sender limit ({} per {}) is lower than the conversation limit ({} per {}) over a window at least as long: \
                     the sender limit always trips first and the conversation limit never applies",
                    self.sender.limit, self.sender.window, self.conversation.limit, self.conversation.window
                ),
            ));
        }
        if self.notice.trim().is_empty() {
            problems.push(ConfigProblem::error(
                "notice",
                "the notice is blank: rate-limited users would get an empty message",
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(RateLimit {
            kv: resources.kv.clone(),
            pseudonym_key: resources.pseudonym_key.clone(),
            conversation: Scope {
                name: "conversation",
                reason: "conversation limit exceeded",
                limit: self.conversation.limit,
                window: self.conversation.window,
            },
            sender: Scope {
                name: "sender",
                reason: "sender limit exceeded",
                limit: self.sender.limit,
                window: self.sender.window,
            },
            notice: self.notice.clone(),
        }))
    }
}

engine::register_stage!(RateLimitConfig);

/// One limit as the stage applies it.
struct Scope {
    /// The `scope` field of `rate_limited`.
    name: &'static str,
    /// The `reason` field of `rate_limited`, in the checklist's words.
    reason: &'static str,
    limit: u64,
    window: ConfigDuration,
}

struct RateLimit {
    kv: Arc<dyn KeyValueStore>,
    pseudonym_key: Arc<[u8]>,
    conversation: Scope,
    sender: Scope,
    notice: String,
}

/// The shortest TTL of the "already notified" mark: a counter about to expire must not make it
/// vanish at once (or be refused as a zero TTL).
const MIN_NOTIFIED_TTL: Duration = Duration::from_secs(1);

#[engine::async_trait]
impl Stage for RateLimit {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let tenant = msg.tenant.id.as_str();
        // Redis must never hold a phone number: the sender is known by a keyed pseudonym.
        let sender = sender_pseudonym(&self.pseudonym_key, tenant, msg.inbound.from.expose());
        let windows = [
            WindowKey {
                key: format!("ratelimit:conv:{}", msg.conversation.id),
                window: self.conversation.window.get(),
            },
            WindowKey { key: format!("ratelimit:sender:{tenant}:{sender}"), window: self.sender.window.get() },
        ];
        // A retried job must not count its message again (the user would be limited for messages
        // they sent once): the provider's message id makes the hit count once.
        let once = HitOnce {
            key: format!("ratelimit:seen:{tenant}:{}", msg.inbound.provider_message_id),
            ttl: self.conversation.window.get().max(self.sender.window.get()),
        };
        let counts = self.kv.hit_windows(&windows, Some(&once)).await?;
        let [conversation, sender] = counts[..] else {
            return Err(StageError::Internal(format!(
                "the key-value store returned {} counters for {} windows",
                counts.len(),
                windows.len()
            )));
        };

        let exceeded = [(&self.conversation, conversation), (&self.sender, sender)]
            .into_iter()
            .find(|(scope, count)| count.count > scope.limit);
        let Some((scope, count)) = exceeded else {
            return Ok(Decision::Continue);
        };
        self.excess(msg, cx, scope, count).await
    }
}

impl RateLimit {
    /// Notifies the first excess of the window, drops the others.
    async fn excess(
        &self,
        msg: &Message,
        cx: &StageContext<'_>,
        scope: &Scope,
        count: WindowCount,
    ) -> Result<Decision, StageError> {
        let job = msg.job.id.as_str();
        // The mark lives as long as the exceeded counter's window, so the next window's first
        // excess is notified again.
        let ttl = count.resets_in.max(MIN_NOTIFIED_TTL);
        let key = format!("ratelimit:notified:{}", msg.conversation.id);
        let first_notice = match self.kv.claim(&key, job, ttl).await? {
            Claim::Acquired => true,
            // A retry of the job that holds the mark: its notice may not have gone out.
            Claim::HeldBy(holder) => holder == job,
        };
        cx.emit(
            Event::info(names::RATE_LIMITED)
                .with("scope", scope.name)
                .with("count", count.count)
                .with("limit", scope.limit)
                .with("window", scope.window.to_string())
                .with("alreadyNotified", !first_notice)
                .with("reason", scope.reason),
        );
        if first_notice {
            Ok(Decision::Reply(self.notice.clone()))
        } else {
            Ok(Decision::Drop(format!("{} (already notified)", scope.reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use engine::{events::Event, runtime::Outcome, testing::TEST_PHONE, testing::TestBench};

    use super::*;

    const STAGE: &str = "kind = \"ratelimit\"\n";

    async fn send(bench: &TestBench, pipeline: &engine::runtime::Pipeline, n: usize) -> Vec<(Outcome, Message)> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut msg = bench.message(&format!("Message rapide {}", i + 1));
            let outcome = bench.run(pipeline, &mut msg).await;
            out.push((outcome, msg));
        }
        out
    }

    fn rate_limited(bench: &TestBench) -> Vec<Event> {
        bench.events.named(names::RATE_LIMITED)
    }

    #[tokio::test]
    async fn scenario_d_sixth_message_gets_one_notice_and_the_rest_are_dropped() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);

        let runs = send(&bench, &pipeline, 10).await;

        for (i, (outcome, msg)) in runs.iter().enumerate().take(5) {
            assert_eq!(*outcome, Outcome::Completed, "message {}", i + 1);
            assert_eq!(msg.reply, None);
        }
        let (sixth, sixth_msg) = &runs[5];
        assert_eq!(*sixth, Outcome::Replied { stage: "ratelimit".into() });
        assert_eq!(sixth_msg.reply.as_ref().map(|r| r.text.as_str()), Some(notices::RATE_LIMITED));
        for (i, (outcome, msg)) in runs.iter().enumerate().skip(6) {
            assert!(
                matches!(outcome, Outcome::Dropped { stage, .. } if stage == "ratelimit"),
                "message {}: {outcome:?}",
                i + 1
            );
            assert_eq!(msg.reply, None, "message {} must not be answered", i + 1);
        }

        let events = rate_limited(&bench);
        assert_eq!(events.len(), 5, "one rate_limited per excess message");
        let first = &events[0];
        assert_eq!(first.field("scope"), Some(&"conversation".into()));
        assert_eq!(first.field("reason"), Some(&"conversation limit exceeded".into()));
        assert_eq!(first.field("count"), Some(&6.into()));
        assert_eq!(first.field("limit"), Some(&5.into()));
        assert_eq!(first.field("window"), Some(&"30s".into()));
        assert_eq!(first.field("alreadyNotified"), Some(&false.into()));
        assert_eq!(first.field("providerMessageId"), Some(&sixth_msg.inbound.provider_message_id.to_string().into()));
        for later in &events[1..] {
            assert_eq!(later.field("alreadyNotified"), Some(&true.into()));
            assert_eq!(later.field("scope"), Some(&"conversation".into()));
        }
        assert_eq!(events[4].field("count"), Some(&10.into()));

        let ttl = bench.kv.ttl("ratelimit:notified:conv-1").expect("the notified mark is set");
        assert!(ttl <= Duration::from_secs(30) && ttl >= Duration::from_secs(1), "{ttl:?}");
        assert_eq!(bench.kv.get("ratelimit:notified:conv-1").as_deref(), Some(runs[5].1.job.id.as_str()));
    }

    #[tokio::test]
    async fn scenario_d_through_the_pipeline_the_user_gets_five_answers_and_one_notice() {
        let bench = TestBench::new();
        let pipeline = bench.pipeline(
            "[[stages]]\nkind = \"ratelimit\"\n\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n",
        );

        send(&bench, &pipeline, 10).await;

        assert_eq!(bench.llm.requests().len(), 5, "no LLM call after the limit");
        let sent = bench.sender.sent_texts();
        assert_eq!(sent.len(), 6, "{sent:?}");
        assert_eq!(sent.iter().filter(|t| t.as_str() == notices::RATE_LIMITED).count(), 1);
        assert_eq!(sent[5], notices::RATE_LIMITED);
    }

    #[tokio::test]
    async fn every_message_counts_in_both_scopes() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);

        send(&bench, &pipeline, 2).await;

        let pseudonym = sender_pseudonym(b"test-pseudonym-key", "tenant-1", TEST_PHONE);
        assert_eq!(bench.kv.get("ratelimit:conv:conv-1").as_deref(), Some("2"));
        assert_eq!(bench.kv.get(&format!("ratelimit:sender:tenant-1:{pseudonym}")).as_deref(), Some("2"));
        assert_eq!(bench.kv.ttl("ratelimit:conv:conv-1"), Some(Duration::from_secs(30)));
        assert_eq!(bench.kv.ttl(&format!("ratelimit:sender:tenant-1:{pseudonym}")), Some(Duration::from_secs(300)));
    }

    #[tokio::test]
    async fn after_the_window_messages_pass_and_a_new_excess_is_notified_again() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        send(&bench, &pipeline, 7).await;

        bench.clock.advance(Duration::from_secs(31));
        bench.events.clear();
        let runs = send(&bench, &pipeline, 7).await;

        assert!(
            runs[..5].iter().all(|(o, _)| *o == Outcome::Completed),
            "{:?}",
            runs.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        assert_eq!(runs[5].0, Outcome::Replied { stage: "ratelimit".into() });
        assert!(matches!(runs[6].0, Outcome::Dropped { .. }));
        let flags: Vec<_> = rate_limited(&bench).iter().map(|e| e.field("alreadyNotified").cloned()).collect();
        assert_eq!(flags, vec![Some(false.into()), Some(true.into())]);
    }

    #[tokio::test]
    async fn sender_limit_trips_at_21_across_conversations_without_a_phone_number_in_redis() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut outcomes = Vec::new();
        for i in 1..=22 {
            let mut msg = bench.message("Bonjour");
            msg.conversation.id = format!("conv-{i}").as_str().into();
            outcomes.push(bench.run(&pipeline, &mut msg).await);
        }

        assert!(outcomes[..20].iter().all(|o| *o == Outcome::Completed), "{outcomes:?}");
        assert_eq!(outcomes[20], Outcome::Replied { stage: "ratelimit".into() });
        let events = rate_limited(&bench);
        assert_eq!(events[0].field("scope"), Some(&"sender".into()));
        assert_eq!(events[0].field("reason"), Some(&"sender limit exceeded".into()));
        assert_eq!(events[0].field("count"), Some(&21.into()));
        assert_eq!(events[0].field("limit"), Some(&20.into()));
        assert_eq!(events[0].field("window"), Some(&"5m".into()));
        // The notified mark is per conversation: the 22nd message, in yet another conversation,
        // gets its own notice.
        assert_eq!(outcomes[21], Outcome::Replied { stage: "ratelimit".into() });
        let notified_ttl = bench.kv.ttl("ratelimit:notified:conv-21").expect("the notified mark is set");
        assert!(
            notified_ttl > Duration::from_secs(30),
            "the mark lasts as long as the sender window: {notified_ttl:?}"
        );

        let keys = bench.kv.keys();
        let pseudonym = sender_pseudonym(b"test-pseudonym-key", "tenant-1", TEST_PHONE);
        assert!(keys.contains(&format!("ratelimit:sender:tenant-1:{pseudonym}")), "{keys:?}");
        let tail = &TEST_PHONE[TEST_PHONE.len() - 6..];
        for key in &keys {
            assert!(!key.contains(TEST_PHONE) && !key.contains(tail), "phone digits in Redis key {key}");
        }
        for event in bench.events.all() {
            let line = engine::events::JsonLinesSink::render(&event);
            assert!(!line.contains(TEST_PHONE), "phone number in event {line}");
        }
    }

    #[tokio::test]
    async fn when_both_scopes_are_exceeded_the_conversation_is_reported() {
        let bench = TestBench::new();
        let pipeline = bench.stage(
            "kind = \"ratelimit\"\nconversation = { limit = 2, window = \"30s\" }\nsender = { limit = 2, window = \"5m\" }\n",
        );

        send(&bench, &pipeline, 3).await;

        let events = rate_limited(&bench);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].field("scope"), Some(&"conversation".into()));
    }

    #[tokio::test]
    async fn retry_of_the_notified_job_sends_the_notice_again() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let runs = send(&bench, &pipeline, 6).await;
        let mut retry = bench.retry(&runs[5].1);

        let outcome = bench.run(&pipeline, &mut retry).await;

        assert_eq!(outcome, Outcome::Replied { stage: "ratelimit".into() });
        assert_eq!(retry.reply.as_ref().map(|r| r.text.as_str()), Some(notices::RATE_LIMITED));
        let last = rate_limited(&bench).pop().expect("an event");
        assert_eq!(last.field("alreadyNotified"), Some(&false.into()));
    }

    #[tokio::test]
    async fn retries_of_an_answered_message_do_not_count_it_again() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let runs = send(&bench, &pipeline, 4).await;
        // The fourth message's job fails after this stage (say, at send) and is retried twice.
        for _ in 0..2 {
            let mut retry = bench.retry(&runs[3].1);
            assert_eq!(bench.run(&pipeline, &mut retry).await, Outcome::Completed, "the retry still passes");
        }

        let fifth = send(&bench, &pipeline, 1).await;
        let sixth = send(&bench, &pipeline, 1).await;

        assert_eq!(fifth[0].0, Outcome::Completed, "the fifth message is within the limit of 5");
        assert_eq!(sixth[0].0, Outcome::Replied { stage: "ratelimit".into() }, "the sixth is the first over it");
        assert_eq!(rate_limited(&bench)[0].field("count"), Some(&6.into()));
    }

    #[tokio::test]
    async fn a_custom_notice_is_the_one_sent() {
        let bench = TestBench::new();
        let pipeline = bench
            .stage("kind = \"ratelimit\"\nconversation = { limit = 1 }\nnotice = \"Doucement, s'il vous plaît.\"\n");

        let runs = send(&bench, &pipeline, 2).await;

        assert_eq!(runs[1].1.reply.as_ref().map(|r| r.text.as_str()), Some("Doucement, s'il vous plaît."));
        assert_eq!(rate_limited(&bench)[0].field("window"), Some(&"30s".into()), "the window keeps its default");
    }

    #[tokio::test]
    async fn redis_down_fails_open_by_default_and_the_message_goes_on() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.kv.set_failing(true);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(msg.reply, None);
        assert_eq!(bench.events.names(), vec![names::STAGE_FAILED_OPEN]);
        assert_eq!(msg.degraded.len(), 1);
        assert_eq!(msg.degraded[0].kind, "ratelimit");
    }

    #[tokio::test]
    async fn redis_down_fails_the_job_when_closed() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"ratelimit\"\non_error = \"closed\"\n");
        bench.kv.set_failing(true);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(matches!(outcome, Outcome::Failed { ref stage, .. } if stage == "ratelimit"), "{outcome:?}");
        assert_eq!(bench.events.count(names::STAGE_FAILED_OPEN), 0);
    }

    #[test]
    fn example_spells_out_the_defaults() {
        let spec = engine::config::load_stage(RateLimitConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.on_error, OnError::Open);
        assert_eq!(spec.timeout, ConfigDuration::from_millis(500));
        assert!(spec.config.check().is_empty());
        let mut params = spec.entry.clone();
        for key in engine::config::schema::COMMON_KEYS {
            params.as_object_mut().unwrap().remove(key);
        }
        let parsed: RateLimitConfig = serde_json::from_value(params).unwrap();
        assert_eq!(parsed, RateLimitConfig::default());
        spec.config.build(&TestBench::new().resources()).unwrap();
    }

    #[test]
    fn a_zero_limit_is_refused_by_the_schema() {
        let err =
            engine::config::load_stage("kind = \"ratelimit\"\nconversation = { limit = 0 }\n", "t.toml").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert!(err.errors[0].path.contains("conversation.limit"), "{err}");
    }

    #[test]
    fn an_unknown_key_in_a_scope_is_refused() {
        let err = engine::config::load_stage("kind = \"ratelimit\"\nsender = { max = 10 }\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("max"), "{err}");
    }

    #[test]
    fn a_sender_limit_below_the_conversation_limit_over_a_longer_window_is_warned_about() {
        let config = RateLimitConfig {
            sender: SenderLimit { limit: 3, window: ConfigDuration::from_secs(300) },
            ..RateLimitConfig::default()
        };
        let problems = config.check();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "sender.limit");
        assert!(problems[0].warning);
    }

    #[test]
    fn a_short_sender_burst_limit_is_not_warned_about() {
        let config = RateLimitConfig {
            sender: SenderLimit { limit: 3, window: ConfigDuration::from_secs(10) },
            ..RateLimitConfig::default()
        };
        assert!(config.check().is_empty(), "{:?}", config.check());
    }

    #[test]
    fn a_blank_notice_is_an_error() {
        let config = RateLimitConfig { notice: "  ".into(), ..RateLimitConfig::default() };
        let problems = config.check();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "notice");
        assert!(!problems[0].warning);
    }
}
