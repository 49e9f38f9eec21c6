//! The `rag-retrieve` stage: finds the passages of the tenant's knowledge base closest to the user's
//! message and attaches them to the message, within a character budget, for the `llm` stage.

use std::sync::Arc;

use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::{Event, names},
    message::{KnowledgeChunk, Message},
    ports::{EmbedPurpose, Embedder, RelationalStore, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Retrieval from the tenant's knowledge base. Only the tenant's own documents are searched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RagRetrieveConfig {
    /// How many passages to ask the knowledge base for, best first.
    #[schemars(range(min = 1, max = 50))]
    pub top_k: usize,
    /// The lowest cosine similarity (0 to 1) a passage needs to be kept; below it, a passage is
    /// more likely to mislead the assistant than to help it.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_score: f64,
    /// The context budget: the total length, in characters, of the passages handed to the LLM.
    /// Passages are taken best first; one that would overflow the budget is skipped whole (never
    /// cut mid-way) and a shorter, lower-ranked one may still fit.
    #[schemars(range(min = 1))]
    pub max_context_chars: usize,
}

impl Default for RagRetrieveConfig {
    fn default() -> Self {
        Self { top_k: 5, min_score: 0.3, max_context_chars: 4000 }
    }
}

impl StageConfig for RagRetrieveConfig {
    const KIND: &'static str = "rag-retrieve";
    const DESCRIPTION: &'static str =
        "Attaches the tenant's knowledge passages most relevant to the message, for the LLM.";
    const DEFAULT_ON_ERROR: OnError = OnError::Open;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(3);
    const EXAMPLE: &'static str = "kind = \"rag-retrieve\"\ntop_k = 5\nmin_score = 0.3\nmax_context_chars = 4000\n";

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.min_score == 0.0 {
            problems.push(ConfigProblem::warning(
                "min_score",
                "min_score = 0 keeps any passage, however unrelated: the assistant may answer from the wrong document",
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(RagRetrieve {
            top_k: self.top_k,
            // The store compares in f32; the config keeps f64 so that the schema shows 0.3, not
            // 0.30000001192092896.
            min_score: self.min_score as f32,
            max_context_chars: self.max_context_chars,
            embedder: resources.embedder.clone(),
            store: resources.store.clone(),
        }))
    }
}

engine::register_stage!(RagRetrieveConfig);

/// The running stage.
pub struct RagRetrieve {
    top_k: usize,
    min_score: f32,
    max_context_chars: usize,
    embedder: Arc<dyn Embedder>,
    store: Arc<dyn RelationalStore>,
}

#[engine::async_trait]
impl Stage for RagRetrieve {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let text = msg.inbound.text.trim();
        if text.is_empty() {
            return Ok(Decision::Continue);
        }
        let vectors = self.embedder.embed(&[text.to_owned()], EmbedPurpose::Query).await?;
        let Some(query) = vectors.into_iter().next() else {
            return Err(StageError::Internal("the embedder returned no vector for the message".into()));
        };
        let found = self.store.search_knowledge(&msg.tenant.id, &query, self.top_k, self.min_score).await?;
        let found_count = found.len();
        let (kept, context_chars) = within_budget(found, self.max_context_chars);

        cx.emit(
            Event::debug(names::KNOWLEDGE_RETRIEVED)
                .with("count", kept.len())
                .with("topScore", kept.first().map(|c| c.score))
                .with("skippedOverBudget", found_count - kept.len())
                .with("contextChars", context_chars),
        );
        msg.knowledge = kept;
        Ok(Decision::Continue)
    }
}

/// Keeps the chunks (given best first) whose texts fit in `budget` characters in total, and how
/// many characters they use.
fn within_budget(chunks: Vec<KnowledgeChunk>, budget: usize) -> (Vec<KnowledgeChunk>, usize) {
    let mut used = 0;
    let mut kept = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let len = chunk.text.chars().count();
        if used + len <= budget {
            used += len;
            kept.push(chunk);
        }
    }
    (kept, used)
}

#[cfg(test)]
mod tests {
    use engine::{ids::TenantId, message::KnowledgeChunk, runtime::Outcome, testing::TestBench};

    use super::*;

    const HOURS: &str = "Nos horaires d'ouverture : du lundi au vendredi de 9h à 18h, le samedi de 10h à 13h.";
    const DELIVERY: &str = "La livraison est gratuite dès 50 euros d'achat, sous 3 jours ouvrés.";

    fn chunk(id: &str, title: &str, text: &str) -> KnowledgeChunk {
        KnowledgeChunk { document_id: id.into(), title: title.into(), text: text.into(), score: 0.0 }
    }

    fn tenant(id: &str) -> TenantId {
        TenantId::new(id)
    }

    #[tokio::test]
    async fn relevant_passage_of_the_tenant_is_attached_to_a_question() {
        let bench = TestBench::new();
        bench.store.add_knowledge(&tenant("tenant-1"), chunk("doc-hours", "Horaires", HOURS));
        bench.store.add_knowledge(&tenant("tenant-1"), chunk("doc-delivery", "Livraison", DELIVERY));
        let pipeline = bench.stage("kind = \"rag-retrieve\"");
        let mut msg = bench.message("Quels sont vos horaires d'ouverture le samedi ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert!(!msg.knowledge.is_empty());
        assert_eq!(msg.knowledge[0].document_id, "doc-hours");
        assert_eq!(msg.knowledge[0].text, HOURS);
        assert!(msg.knowledge[0].score >= 0.3);
        assert!(
            msg.knowledge.iter().all(|c| c.document_id != "doc-delivery"),
            "unrelated passage kept: {:?}",
            msg.knowledge
        );
        assert!(!msg.is_degraded());

        let events = bench.events.named(names::KNOWLEDGE_RETRIEVED);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].level, engine::events::Level::Debug);
        assert_eq!(events[0].field("count"), Some(&serde_json::json!(msg.knowledge.len())));
        let top = events[0].field("topScore").and_then(serde_json::Value::as_f64).unwrap_or_default();
        assert!((top - f64::from(msg.knowledge[0].score)).abs() < 1e-6);
        assert_eq!(events[0].field("tenantId"), Some(&serde_json::json!("tenant-1")));
    }

    #[tokio::test]
    async fn another_tenants_passage_is_never_retrieved() {
        let bench = TestBench::new();
        bench.store.add_knowledge(&tenant("tenant-2"), chunk("doc-other", "Horaires", HOURS));
        let pipeline = bench.stage("kind = \"rag-retrieve\"\nmin_score = 0.01");
        let mut msg = bench.message(HOURS);

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert!(msg.knowledge.is_empty(), "leaked another tenant's knowledge: {:?}", msg.knowledge);
        assert_eq!(bench.events.named(names::KNOWLEDGE_RETRIEVED)[0].field("count"), Some(&serde_json::json!(0)));
    }

    #[tokio::test]
    async fn passages_below_min_score_are_left_out() {
        let bench = TestBench::new();
        bench.store.add_knowledge(&tenant("tenant-1"), chunk("doc-delivery", "Livraison", DELIVERY));
        let pipeline = bench.stage("kind = \"rag-retrieve\"\nmin_score = 0.3");
        let mut msg = bench.message("Quels sont vos horaires d'ouverture ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert!(msg.knowledge.is_empty(), "kept a passage below min_score: {:?}", msg.knowledge);
        let event = &bench.events.named(names::KNOWLEDGE_RETRIEVED)[0];
        assert_eq!(event.field("count"), Some(&serde_json::json!(0)));
        assert_eq!(event.field("topScore"), Some(&serde_json::Value::Null));
    }

    #[tokio::test]
    async fn context_budget_skips_whole_passages_that_do_not_fit() {
        let bench = TestBench::new();
        let long = "horaires d'ouverture ".repeat(12);
        let short = "horaires d'ouverture du samedi : 10h-13h".to_owned();
        let medium = "horaires d'ouverture en semaine : 9h-18h, fermé le dimanche".to_owned();
        for (id, text) in [("doc-long", &long), ("doc-short", &short), ("doc-medium", &medium)] {
            bench.store.add_knowledge(&tenant("tenant-1"), chunk(id, id, text));
        }
        let budget = short.chars().count() + medium.chars().count();
        assert!(long.chars().count() > budget);
        let pipeline = bench.stage(&format!("kind = \"rag-retrieve\"\nmin_score = 0.05\nmax_context_chars = {budget}"));
        let mut msg = bench.message("horaires d'ouverture");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        let mut ids: Vec<&str> = msg.knowledge.iter().map(|c| c.document_id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["doc-medium", "doc-short"]);
        assert!(msg.knowledge.iter().all(|c| c.text == short || c.text == medium), "a passage was cut");
        let total: usize = msg.knowledge.iter().map(|c| c.text.chars().count()).sum();
        assert!(total <= budget);
        let event = &bench.events.named(names::KNOWLEDGE_RETRIEVED)[0];
        assert_eq!(event.field("skippedOverBudget"), Some(&serde_json::json!(1)));
        assert_eq!(event.field("contextChars"), Some(&serde_json::json!(total)));
    }

    #[tokio::test]
    async fn top_k_caps_the_number_of_passages() {
        let bench = TestBench::new();
        for i in 0..4 {
            bench
                .store
                .add_knowledge(&tenant("tenant-1"), chunk(&format!("doc-{i}"), "Horaires", &format!("{HOURS} ({i})")));
        }
        let pipeline = bench.stage("kind = \"rag-retrieve\"\ntop_k = 2");
        let mut msg = bench.message(HOURS);

        bench.run(&pipeline, &mut msg).await;

        assert_eq!(msg.knowledge.len(), 2);
    }

    #[tokio::test]
    async fn empty_message_is_not_looked_up() {
        let bench = TestBench::new();
        bench.store.add_knowledge(&tenant("tenant-1"), chunk("doc-hours", "Horaires", HOURS));
        bench.embedder.set_failing(true);
        let pipeline = bench.stage("kind = \"rag-retrieve\"");
        let mut msg = bench.message("   ");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.embedder.calls(), 0);
        assert!(msg.knowledge.is_empty());
        assert!(!msg.is_degraded());
        assert!(bench.events.all().is_empty(), "unexpected events: {:?}", bench.events.names());
    }

    #[tokio::test]
    async fn embedder_down_fails_open_without_knowledge() {
        let bench = TestBench::new();
        bench.store.add_knowledge(&tenant("tenant-1"), chunk("doc-hours", "Horaires", HOURS));
        bench.embedder.set_failing(true);
        let pipeline = bench.stage("kind = \"rag-retrieve\"");
        let mut msg = bench.message("Quels sont vos horaires d'ouverture ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert!(msg.knowledge.is_empty());
        assert_eq!(msg.degraded.len(), 1);
        assert_eq!(msg.degraded[0].kind, "rag-retrieve");
        let failed = bench.events.named(names::STAGE_FAILED_OPEN);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].field("stage"), Some(&serde_json::json!("rag-retrieve")));
        assert_eq!(bench.events.count(names::KNOWLEDGE_RETRIEVED), 0);
    }

    #[tokio::test]
    async fn store_down_fails_open_without_knowledge() {
        let bench = TestBench::new();
        bench.store.add_knowledge(&tenant("tenant-1"), chunk("doc-hours", "Horaires", HOURS));
        bench.store.set_failing(true);
        let pipeline = bench.stage("kind = \"rag-retrieve\"");
        let mut msg = bench.message("Quels sont vos horaires d'ouverture ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert!(msg.knowledge.is_empty());
        assert!(msg.is_degraded());
        assert_eq!(bench.events.count(names::STAGE_FAILED_OPEN), 1);
    }

    #[tokio::test]
    async fn store_down_with_on_error_closed_fails_the_job() {
        let bench = TestBench::new();
        bench.store.set_failing(true);
        let pipeline = bench.stage("kind = \"rag-retrieve\"\non_error = \"closed\"");
        let mut msg = bench.message("Quels sont vos horaires d'ouverture ?");

        let outcome = bench.run(&pipeline, &mut msg).await;

        let Outcome::Failed { stage, retryable, error, .. } = outcome else {
            panic!("expected Failed, got {outcome:?}")
        };
        assert_eq!(stage, "rag-retrieve");
        assert!(retryable);
        assert!(matches!(error, StageError::Port(_)), "{error:?}");
        assert!(msg.knowledge.is_empty());
        assert_eq!(bench.events.count(names::STAGE_FAILED_OPEN), 0);
    }

    #[test]
    fn example_builds_with_the_defaults() {
        let bench = TestBench::new();
        let spec = engine::config::load_stage(RagRetrieveConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.on_error, OnError::Open);
        assert_eq!(spec.timeout, ConfigDuration::from_secs(3));
        spec.config.build(&bench.resources()).unwrap();
        let parsed: RagRetrieveConfig =
            serde_json::from_value(serde_json::json!({ "top_k": 5, "min_score": 0.3, "max_context_chars": 4000 }))
                .unwrap();
        assert_eq!(parsed, RagRetrieveConfig::default());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for bad in ["top_k = 0", "top_k = 51", "min_score = 1.5", "min_score = -0.1", "max_context_chars = 0"] {
            let entry = format!("kind = \"rag-retrieve\"\n{bad}");
            assert!(engine::config::load_stage(&entry, "t.toml").is_err(), "`{bad}` was accepted");
        }
    }
}
