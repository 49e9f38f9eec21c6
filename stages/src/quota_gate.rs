//! The `quota-gate` stage: counts each message against the tenant's monthly quota (calendar month,
//! UTC) and answers with a notice once it is used up, without asking the database again for a
//! conversation already blocked this month (the checklist's scenarios B and C).

use std::sync::Arc;

use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::{Event, names},
    message::{Message, QuotaBlock},
    ports::{Clock, QuotaDecision, RelationalStore, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::notices;

/// Stops messages once the tenant's plan has used its monthly messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaGateConfig {
    /// The text answered to every message of a conversation while the tenant's monthly quota is
    /// used up. The LLM is not called for these messages.
    pub notice: String,
}

impl Default for QuotaGateConfig {
    fn default() -> Self {
        Self { notice: notices::QUOTA_EXCEEDED.to_owned() }
    }
}

impl StageConfig for QuotaGateConfig {
    const KIND: &'static str = "quota-gate";
    const DESCRIPTION: &'static str =
        "Counts messages against the tenant's monthly quota; answers with a notice once it is used up.";
    const DEFAULT_ON_ERROR: OnError = OnError::Closed;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(2);
    const EXAMPLE: &'static str = "kind = \"quota-gate\"\n\
        notice = \"⚠️ Ce service a atteint sa limite de messages pour ce mois. Nous ne pouvons pas répondre pour l'instant. \
        Veuillez réessayer le mois prochain ou contacter l'administrateur. Merci de votre compréhension.\"\n";

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.notice.trim().is_empty() {
            problems.push(ConfigProblem::error(
                "notice",
                "the notice is blank: users over quota would get an empty message",
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(QuotaGate {
            store: resources.store.clone(),
            clock: resources.clock.clone(),
            notice: self.notice.clone(),
        }))
    }
}

engine::register_stage!(QuotaGateConfig);

struct QuotaGate {
    store: Arc<dyn RelationalStore>,
    clock: Arc<dyn Clock>,
    notice: String,
}

#[engine::async_trait]
impl Stage for QuotaGate {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let Some(limit) = msg.tenant.monthly_message_limit else {
            return Ok(Decision::Continue);
        };
        let period = self.clock.now().format("%Y-%m").to_string();

        // A block holds only for the month it was set in and for the limit it was set under: a new
        // month or an upgraded plan must be counted again.
        if let Some(block) = &msg.conversation.quota_block
            && block.period == period
            && limit <= block.limit
        {
            cx.emit(handled(&period, limit, true));
            return Ok(Decision::Reply(self.notice.clone()));
        }

        match self.store.consume_monthly_quota(&msg.tenant.id, &period, limit, &msg.inbound.provider_message_id).await?
        {
            QuotaDecision::Granted { .. } => Ok(Decision::Continue),
            QuotaDecision::Refused { used } => {
                cx.emit(
                    Event::info(names::QUOTA_EXCEEDED).with("period", &period).with("limit", limit).with("used", used),
                );
                let block = QuotaBlock { period, limit };
                self.store.block_conversation_quota(&msg.conversation.id, &block).await?;
                cx.emit(handled(&block.period, limit, false));
                msg.conversation.quota_block = Some(block);
                Ok(Decision::Reply(self.notice.clone()))
            }
        }
    }
}

fn handled(period: &str, limit: u64, already_blocked: bool) -> Event {
    Event::info(names::QUOTA_EXCEEDED_HANDLED)
        .with("period", period)
        .with("limit", limit)
        .with("alreadyBlocked", already_blocked)
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use engine::{config::Severity, ids::TenantId, runtime::Outcome, testing::TestBench};

    use super::*;

    const STAGE: &str = "kind = \"quota-gate\"\n";
    /// The bench's clock starts on 2026-11-15.
    const PERIOD: &str = "2026-11";
    const PIPELINE: &str =
        "[[stages]]\nkind = \"quota-gate\"\n\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n";

    fn tenant() -> TenantId {
        TenantId::new("tenant-1")
    }

    fn notice_of(msg: &Message) -> Option<&str> {
        msg.reply.as_ref().map(|r| r.text.as_str())
    }

    #[tokio::test]
    async fn under_quota_the_message_goes_on_and_is_counted() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.store.set_usage(&tenant(), PERIOD, 10);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(msg.reply, None);
        assert_eq!(bench.store.usage(&tenant(), PERIOD), 11);
        assert_eq!(bench.store.quota_block(&msg.conversation.id), None);
        assert!(bench.events.all().is_empty(), "{:?}", bench.events.names());
    }

    #[tokio::test]
    async fn scenario_b_first_message_over_quota_gets_the_notice_and_blocks_the_conversation() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.store.set_usage(&tenant(), PERIOD, 1000);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Replied { stage: "quota-gate".into() });
        assert_eq!(notice_of(&msg), Some(notices::QUOTA_EXCEEDED));
        assert_eq!(bench.events.names(), vec![names::QUOTA_EXCEEDED, names::QUOTA_EXCEEDED_HANDLED]);
        let events = bench.events.all();
        assert_eq!(events[0].field("period"), Some(&PERIOD.into()));
        assert_eq!(events[0].field("limit"), Some(&1000.into()));
        assert_eq!(events[0].field("used"), Some(&1000.into()));
        assert_eq!(events[1].field("alreadyBlocked"), Some(&false.into()));
        assert_eq!(events[1].field("period"), Some(&PERIOD.into()));
        assert_eq!(events[1].field("tenantId"), Some(&"tenant-1".into()));
        let block = QuotaBlock { period: PERIOD.into(), limit: 1000 };
        assert_eq!(bench.store.quota_block(&msg.conversation.id), Some(block.clone()));
        assert_eq!(msg.conversation.quota_block, Some(block));
        assert_eq!(bench.store.usage(&tenant(), PERIOD), 1000, "a refused message is not counted");
    }

    #[tokio::test]
    async fn scenario_b_through_the_pipeline_sends_the_notice_and_never_calls_the_llm() {
        let bench = TestBench::new();
        let pipeline = bench.pipeline(PIPELINE);
        bench.store.set_usage(&tenant(), PERIOD, 1000);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Replied { stage: "quota-gate".into() });
        assert!(bench.llm.requests().is_empty(), "the LLM must not be called over quota");
        assert_eq!(bench.events.count(names::LLM_REQUEST), 0);
        assert_eq!(bench.sender.sent_texts(), vec![notices::QUOTA_EXCEEDED.to_owned()]);
        let names = bench.events.names();
        let exceeded = names.iter().position(|n| *n == names::QUOTA_EXCEEDED);
        let handled = names.iter().position(|n| *n == names::QUOTA_EXCEEDED_HANDLED);
        assert!(exceeded.is_some() && exceeded < handled, "{names:?}");
    }

    #[tokio::test]
    async fn scenario_c_through_the_pipeline_sends_the_same_notice_again() {
        let bench = TestBench::new();
        let pipeline = bench.pipeline(PIPELINE);
        bench.store.set_usage(&tenant(), PERIOD, 1000);
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        let calls_after_first = bench.store.quota_calls();
        let mut second = bench.message("Toujours là ?");
        second.conversation.quota_block = bench.store.quota_block(&second.conversation.id);

        let outcome = bench.run(&pipeline, &mut second).await;

        assert_eq!(outcome, Outcome::Replied { stage: "quota-gate".into() });
        assert_eq!(bench.store.quota_calls(), calls_after_first);
        assert!(bench.llm.requests().is_empty());
        assert_eq!(bench.sender.sent_texts(), vec![notices::QUOTA_EXCEEDED.to_owned(); 2]);
        assert_eq!(bench.events.count(names::QUOTA_EXCEEDED), 1);
    }

    #[tokio::test]
    async fn scenario_c_blocked_conversation_gets_the_notice_without_asking_the_database() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut msg = bench.message("Encore moi");
        msg.conversation.quota_block = Some(QuotaBlock { period: PERIOD.into(), limit: 1000 });
        let calls_before = bench.store.quota_calls();

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Replied { stage: "quota-gate".into() });
        assert_eq!(notice_of(&msg), Some(notices::QUOTA_EXCEEDED));
        assert_eq!(bench.store.quota_calls(), calls_before);
        assert_eq!(bench.events.names(), vec![names::QUOTA_EXCEEDED_HANDLED]);
        let handled = &bench.events.all()[0];
        assert_eq!(handled.field("alreadyBlocked"), Some(&true.into()));
        assert_eq!(handled.field("period"), Some(&PERIOD.into()));
        assert_eq!(handled.field("limit"), Some(&1000.into()));
    }

    #[tokio::test]
    async fn scenario_c_holds_even_while_the_database_is_down() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.store.set_failing(true);
        let mut msg = bench.message("Encore moi");
        msg.conversation.quota_block = Some(QuotaBlock { period: PERIOD.into(), limit: 1000 });

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Replied { stage: "quota-gate".into() });
    }

    #[tokio::test]
    async fn a_block_from_last_month_no_longer_blocks() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut msg = bench.message("Nouveau mois");
        msg.conversation.quota_block = Some(QuotaBlock { period: "2026-10".into(), limit: 1000 });

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.store.usage(&tenant(), PERIOD), 1);
        assert_eq!(bench.events.count(names::QUOTA_EXCEEDED_HANDLED), 0);
    }

    #[tokio::test]
    async fn the_month_is_the_utc_calendar_month() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.clock.set(Utc.with_ymd_and_hms(2026, 11, 30, 23, 59, 59).unwrap());
        bench.store.set_usage(&tenant(), PERIOD, 1000);
        let mut last_second = bench.message("Bonsoir");
        assert!(matches!(bench.run(&pipeline, &mut last_second).await, Outcome::Replied { .. }));

        bench.clock.set(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        let mut next_month = bench.message("Bonjour");
        next_month.conversation.quota_block = last_second.conversation.quota_block.clone();

        assert_eq!(bench.run(&pipeline, &mut next_month).await, Outcome::Completed);
        assert_eq!(bench.store.usage(&tenant(), "2026-12"), 1);
    }

    #[tokio::test]
    async fn a_raised_limit_no_longer_blocks() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.store.set_usage(&tenant(), PERIOD, 1000);
        let mut msg = bench.message("Après la mise à niveau");
        msg.tenant.monthly_message_limit = Some(5000);
        msg.conversation.quota_block = Some(QuotaBlock { period: PERIOD.into(), limit: 1000 });

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.store.usage(&tenant(), PERIOD), 1001);
    }

    #[tokio::test]
    async fn an_unlimited_plan_is_not_counted() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut msg = bench.message("Bonjour");
        msg.tenant.monthly_message_limit = None;

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.store.quota_calls(), 0);
    }

    #[tokio::test]
    async fn a_retried_job_is_counted_once() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        let mut first = bench.message("Bonjour");
        bench.run(&pipeline, &mut first).await;
        let mut retry = bench.retry(&first);

        let outcome = bench.run(&pipeline, &mut retry).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.store.usage(&tenant(), PERIOD), 1);
    }

    #[tokio::test]
    async fn the_last_message_of_the_quota_passes_and_the_next_is_refused() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.store.set_usage(&tenant(), PERIOD, 999);

        let mut last = bench.message("Dernier");
        assert_eq!(bench.run(&pipeline, &mut last).await, Outcome::Completed);
        let mut over = bench.message("Un de trop");
        assert_eq!(bench.run(&pipeline, &mut over).await, Outcome::Replied { stage: "quota-gate".into() });
        assert_eq!(bench.store.usage(&tenant(), PERIOD), 1000);
    }

    #[tokio::test]
    async fn database_down_fails_the_job_by_default_and_sets_no_block() {
        let bench = TestBench::new();
        let pipeline = bench.stage(STAGE);
        bench.store.set_usage(&tenant(), PERIOD, 1000);
        bench.store.set_failing(true);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(
            matches!(outcome, Outcome::Failed { ref stage, retryable: true, .. } if stage == "quota-gate"),
            "{outcome:?}"
        );
        assert_eq!(msg.conversation.quota_block, None);
        assert_eq!(msg.reply, None);
        bench.store.set_failing(false);
        assert_eq!(bench.store.quota_block(&msg.conversation.id), None);
        assert!(bench.events.all().is_empty(), "{:?}", bench.events.names());
    }

    #[tokio::test]
    async fn database_down_lets_the_message_through_when_open() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"quota-gate\"\non_error = \"open\"\n");
        bench.store.set_failing(true);
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(bench.events.names(), vec![names::STAGE_FAILED_OPEN]);
        assert_eq!(msg.degraded.len(), 1);
        assert_eq!(msg.degraded[0].kind, "quota-gate");
        assert_eq!(msg.conversation.quota_block, None);
    }

    #[test]
    fn failing_open_is_warned_about() {
        let toml = "[[stages]]\nkind = \"quota-gate\"\non_error = \"open\"\n\n[[stages]]\nkind = \"send\"\n";
        let config = engine::config::load_str(toml, "pipeline.toml").unwrap();

        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        let warning = &config.warnings[0];
        assert_eq!(warning.severity, Severity::Warning);
        assert_eq!(warning.path, "stages[0].on_error");
        assert!(warning.message.contains("quota-gate"), "{}", warning.message);
    }

    #[test]
    fn example_spells_out_the_defaults() {
        let spec = engine::config::load_stage(QuotaGateConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.on_error, OnError::Closed);
        assert_eq!(spec.timeout, ConfigDuration::from_secs(2));
        assert_eq!(spec.entry["notice"], notices::QUOTA_EXCEEDED);
        spec.config.build(&TestBench::new().resources()).unwrap();
    }

    #[test]
    fn a_blank_notice_is_an_error() {
        let err = engine::config::load_stage("kind = \"quota-gate\"\nnotice = \" \"\n", "t.toml").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].path, "notice");
    }
}
