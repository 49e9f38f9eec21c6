//! The `dedupe` stage: drops a provider message that another job already took, so that a webhook
//! delivered twice is answered once (the checklist's scenario E).

use std::{sync::Arc, time::Duration};

use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::{Event, names},
    message::Message,
    ports::{Claim, KeyValueStore, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Below this, a provider that retries a webhook (Meta does for days) may get past the key.
const SHORTEST_SAFE_TTL: Duration = Duration::from_secs(3600);

/// Drops a message whose provider id another job already claimed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// How long a provider message id is remembered (`idempotence:msg:{tenantId}:{providerMessageId}`
    /// in Redis). A copy delivered after that is processed again.
    pub ttl: ConfigDuration,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        Self { ttl: ConfigDuration::from_secs(24 * 3600) }
    }
}

impl StageConfig for DedupeConfig {
    const KIND: &'static str = "dedupe";
    const DESCRIPTION: &'static str = "Drops a message delivered again by the provider (same provider message id).";
    const DEFAULT_ON_ERROR: OnError = OnError::Open;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_millis(500);
    const EXAMPLE: &'static str = "kind = \"dedupe\"\nttl = \"24h\"\n";

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.ttl.get() < SHORTEST_SAFE_TTL {
            problems.push(ConfigProblem::warning(
                "ttl",
                format!(
                    "{} is shorter than 1h: a provider retrying the webhook later would get the message answered twice",
                    self.ttl
                ),
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(Dedupe { kv: resources.kv.clone(), ttl: self.ttl.get() }))
    }
}

engine::register_stage!(DedupeConfig);

struct Dedupe {
    kv: Arc<dyn KeyValueStore>,
    ttl: Duration,
}

#[engine::async_trait]
impl Stage for Dedupe {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let key = format!("idempotence:msg:{}:{}", msg.tenant.id, msg.inbound.provider_message_id);
        let job = msg.job.id.as_str();
        match self.kv.claim(&key, job, self.ttl).await? {
            Claim::Acquired => Ok(Decision::Continue),
            // The same job run again after a later stage failed: it must be allowed to finish.
            Claim::HeldBy(holder) if holder == job => Ok(Decision::Continue),
            Claim::HeldBy(first_job) => {
                cx.emit(Event::info(names::DUPLICATE_MESSAGE_DROPPED).with("firstJobId", &first_job));
                Ok(Decision::Drop(format!("duplicate of a message already taken by job {first_job}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use engine::{runtime::Outcome, testing::TestBench};

    use super::*;

    const STAGE: &str = "kind = \"dedupe\"\n";

    fn key_of(msg: &Message) -> String {
        format!("idempotence:msg:tenant-1:{}", msg.inbound.provider_message_id)
    }

    #[tokio::test]
    async fn first_delivery_continues_and_claims_the_message_for_24h() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.kv.get(&key_of(&msg)).as_deref(), Some(msg.job.id.as_str()));
        assert_eq!(bench.kv.ttl(&key_of(&msg)), Some(Duration::from_secs(24 * 3600)));
        assert!(bench.events.all().is_empty(), "a first delivery logs nothing: {:?}", bench.events.names());
    }

    #[tokio::test]
    async fn duplicate_delivery_is_dropped_silently() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        let mut again = bench.redelivery(&first);

        let outcome = bench.run(&pipeline, &mut again).await;

        assert!(matches!(outcome, Outcome::Dropped { ref stage, .. } if stage == "dedupe"), "{outcome:?}");
        assert_eq!(again.reply, None);
        assert_eq!(bench.events.names(), vec![names::DUPLICATE_MESSAGE_DROPPED]);
        let event = &bench.events.all()[0];
        assert_eq!(event.field("firstJobId"), Some(&first.job.id.to_string().into()));
        assert_eq!(event.field("jobId"), Some(&again.job.id.to_string().into()));
        assert_eq!(event.field("providerMessageId"), Some(&first.inbound.provider_message_id.to_string().into()));
        assert_eq!(
            bench.kv.get(&key_of(&first)).as_deref(),
            Some(first.job.id.as_str()),
            "the duplicate must not take the key over"
        );
    }

    #[tokio::test]
    async fn duplicate_delivery_sends_nothing_through_a_pipeline() {
        let bench = TestBench::new();
        let pipeline = bench.pipeline("[[stages]]\nkind = \"dedupe\"\n\n[[stages]]\nkind = \"send\"\n");
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        let sent_after_first = bench.sender.attempts();
        let mut again = bench.redelivery(&first);

        let outcome = bench.run(&pipeline, &mut again).await;

        assert!(matches!(outcome, Outcome::Dropped { .. }), "{outcome:?}");
        assert_eq!(bench.sender.attempts(), sent_after_first);
    }

    #[tokio::test]
    async fn retry_of_the_same_job_runs_again() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        let mut retry = bench.retry(&first);

        let outcome = bench.run(&pipeline, &mut retry).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.events.count(names::DUPLICATE_MESSAGE_DROPPED), 0);
    }

    #[tokio::test]
    async fn same_provider_id_in_another_tenant_is_not_a_duplicate() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        let mut other = bench.redelivery(&first);
        other.tenant.id = "tenant-2".into();

        let outcome = bench.run(&pipeline, &mut other).await;

        assert_eq!(outcome, Outcome::Completed);
    }

    #[tokio::test]
    async fn redelivery_after_the_ttl_is_processed_again() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"dedupe\"\nttl = \"2h\"\n");
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        bench.clock.advance(Duration::from_secs(2 * 3600 + 1));
        let mut late = bench.redelivery(&first);

        let outcome = bench.run(&pipeline, &mut late).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.kv.get(&key_of(&late)).as_deref(), Some(late.job.id.as_str()));
    }

    #[tokio::test]
    async fn redis_down_fails_open_by_default_and_the_message_goes_on() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.kv.set_failing(true);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.events.names(), vec![names::STAGE_FAILED_OPEN]);
        assert_eq!(msg.degraded.len(), 1);
        assert_eq!(msg.degraded[0].kind, "dedupe");
    }

    #[tokio::test]
    async fn redis_down_fails_the_job_when_closed() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"dedupe\"\non_error = \"closed\"\n");
        bench.kv.set_failing(true);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(
            matches!(outcome, Outcome::Failed { ref stage, retryable: true, .. } if stage == "dedupe"),
            "{outcome:?}"
        );
        assert_eq!(bench.events.count(names::STAGE_FAILED_OPEN), 0);
    }

    #[test]
    fn example_spells_out_the_defaults() {
        let spec = engine::config::load_stage(DedupeConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.on_error, OnError::Open);
        assert_eq!(spec.timeout, ConfigDuration::from_millis(500));
        let mut params = spec.entry.clone();
        for key in engine::config::schema::COMMON_KEYS {
            params.as_object_mut().unwrap().remove(key);
        }
        let parsed: DedupeConfig = serde_json::from_value(params).unwrap();
        assert_eq!(parsed, DedupeConfig::default());
        spec.config.build(&TestBench::new().resources()).unwrap();
    }

    #[test]
    fn a_ttl_under_an_hour_is_warned_about() {
        let short = DedupeConfig { ttl: ConfigDuration::from_secs(60) };
        let problems = short.check();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "ttl");
        assert!(problems[0].warning);
        assert!(DedupeConfig::default().check().is_empty());
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let err = engine::config::load_stage("kind = \"dedupe\"\nttl_hours = 24\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("ttl_hours"), "{err}");
    }
}
