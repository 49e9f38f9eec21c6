//! A test bench for stages: every port in memory, a message factory, and helpers that build a
//! pipeline or a single stage from TOML and run it, so that stage tests read like scenarios.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use chrono::{DateTime, TimeZone, Utc};

use crate::{
    config,
    events::MemoryEvents,
    ids::{ChannelId, ConversationId, JobId, PhoneNumber, ProviderMessageId, TenantId},
    memory::{ManualClock, MemoryEmbedder, MemoryKv, MemoryLlm, MemorySender, MemoryStore},
    message::{AssistantSettings, ChannelInfo, ConversationInfo, InboundText, JobInfo, Message, TenantInfo},
    ports::Resources,
    runtime::{Generation, Outcome, Pipeline, StageSlot},
};

/// The phone number of the test user.
pub const TEST_PHONE: &str = "33612345678";

/// In-memory ports and a recorded event log.
pub struct TestBench {
    pub kv: Arc<MemoryKv>,
    pub store: Arc<MemoryStore>,
    pub llm: Arc<MemoryLlm>,
    pub embedder: Arc<MemoryEmbedder>,
    pub sender: Arc<MemorySender>,
    pub clock: Arc<ManualClock>,
    pub events: MemoryEvents,
    /// Distinguishes the job ids of benches running in the same test binary.
    bench_id: usize,
    next_id: AtomicUsize,
}

static BENCHES: AtomicUsize = AtomicUsize::new(1);

impl Default for TestBench {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBench {
    /// Ports at 2026-11-15 10:00 UTC.
    pub fn new() -> Self {
        let start: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 11, 15, 10, 0, 0).single().unwrap_or_default();
        let clock = Arc::new(ManualClock::new(start));
        Self {
            kv: Arc::new(MemoryKv::new(clock.clone())),
            store: Arc::new(MemoryStore::new()),
            llm: Arc::new(MemoryLlm::new()),
            embedder: Arc::new(MemoryEmbedder::new()),
            sender: Arc::new(MemorySender::new()),
            clock,
            events: MemoryEvents::new(),
            bench_id: BENCHES.fetch_add(1, Ordering::SeqCst),
            next_id: AtomicUsize::new(1),
        }
    }

    pub fn resources(&self) -> Resources {
        Resources {
            kv: self.kv.clone(),
            store: self.store.clone(),
            llm: self.llm.clone(),
            embedder: self.embedder.clone(),
            sender: self.sender.clone(),
            clock: self.clock.clone(),
            events: Arc::new(self.events.clone()),
            pseudonym_key: Arc::from(&b"test-pseudonym-key"[..]),
        }
    }

    /// A new message (fresh provider id and job id) from the test user in conversation `conv-1`
    /// of tenant `tenant-1`, whose plan allows 1000 messages a month.
    pub fn message(&self, text: &str) -> Message {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        Message::new(
            JobInfo { id: JobId::new(format!("job-{}-{n}", self.bench_id)), attempt: 1 },
            TenantInfo {
                id: TenantId::new("tenant-1"),
                tier: None,
                monthly_message_limit: Some(1000),
                assistant: AssistantSettings {
                    system_prompt: "Tu es l'assistant de la boutique.".into(),
                    model: None,
                    temperature: None,
                },
            },
            ChannelInfo {
                id: ChannelId::new("channel-1"),
                provider: "sandbox".into(),
                phone_number_id: "PHONE_NUMBER_ID".into(),
            },
            ConversationInfo { id: ConversationId::new("conv-1"), quota_block: None },
            InboundText {
                provider_message_id: ProviderMessageId::new(format!("wamid.in.{n}")),
                from: PhoneNumber::new(TEST_PHONE),
                text: text.to_owned(),
                sent_at: self.clock_now(),
            },
        )
    }

    /// The same provider message delivered again: a new job for the same `wamid`.
    pub fn redelivery(&self, original: &Message) -> Message {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut again = original.clone();
        again.job = JobInfo { id: JobId::new(format!("job-{}-{n}", self.bench_id)), attempt: 1 };
        again.knowledge.clear();
        again.reply = None;
        again.degraded.clear();
        again.sent = None;
        again
    }

    /// The same job run again after a failure.
    pub fn retry(&self, original: &Message) -> Message {
        let mut again = original.clone();
        again.job.attempt += 1;
        again.knowledge.clear();
        again.reply = None;
        again.degraded.clear();
        again.sent = None;
        again
    }

    fn clock_now(&self) -> DateTime<Utc> {
        use crate::ports::Clock;
        self.clock.now()
    }

    /// Builds the base pipeline of a complete pipeline file. Panics with the diagnostics when the
    /// file is invalid: this is test code.
    pub fn pipeline(&self, toml: &str) -> Arc<Pipeline> {
        let generation = self.generation(toml);
        generation.pipeline(None).clone()
    }

    /// Builds every pipeline of a file as generation 1.
    pub fn generation(&self, toml: &str) -> Generation {
        let config = config::load_str(toml, "test.toml").unwrap_or_else(|e| panic!("invalid test pipeline:\n{e}"));
        Generation::build(1, String::new(), config, &self.resources(), None)
            .unwrap_or_else(|e| panic!("test pipeline does not build: {e}"))
    }

    /// A pipeline of one stage, from the keys of its `[[stages]]` table.
    pub fn stage(&self, entry: &str) -> Arc<Pipeline> {
        let spec = config::load_stage(entry, "test-stage.toml").unwrap_or_else(|e| panic!("invalid test stage:\n{e}"));
        let stage = spec.config.build(&self.resources()).unwrap_or_else(|e| panic!("test stage does not build: {e}"));
        Arc::new(Pipeline {
            tier: None,
            stages: vec![StageSlot {
                id: spec.id,
                kind: spec.kind.kind,
                on_error: spec.on_error,
                timeout: spec.timeout.get(),
                fingerprint: spec.fingerprint,
                stage,
            }],
        })
    }

    pub async fn run(&self, pipeline: &Pipeline, msg: &mut Message) -> Outcome {
        pipeline.run(msg, &self.events, 1).await
    }
}
