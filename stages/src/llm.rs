//! The `llm` stage: asks the LLM for the assistant's answer, from the assistant's instructions, the
//! retrieved knowledge, the recent conversation and the user's message, and sets it as the reply.

use std::{sync::Arc, time::Instant};

use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::{Event, names},
    message::{KnowledgeChunk, Message, Reply, ReplySource},
    ports::{ChatMessage, ChatRole, Llm, LlmRequest, RelationalStore, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The default introduction of the retrieved passages (the tenants write in French).
pub const DEFAULT_CONTEXT_HEADER: &str = "Informations issues de la base de connaissances de l'entreprise. \
Appuie-toi sur elles pour répondre ; si elles ne couvrent pas la question, dis-le plutôt que d'inventer.";

/// How the assistant's answer is asked for.
///
/// Precedence, most specific first: the tenant's assistant settings (its model, temperature and
/// system prompt, set per business) win over this pipeline's values (which a tier may override,
/// e.g. `stages.llm.model = "gemini-1.5-pro"`), which win over the LLM provider's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// The model to ask for, e.g. "gemini-1.5-pro". An assistant with a model of its own uses
    /// that one instead; unset, the LLM provider's configured model answers.
    pub model: Option<String>,
    /// How many earlier messages of the conversation (user and assistant) to send, most recent
    /// last. 0 sends only the current message.
    #[schemars(range(max = 100))]
    pub history: usize,
    /// Sampling temperature, 0 (deterministic) to 2. An assistant's own temperature wins; unset,
    /// the provider's default applies.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// The longest answer, in tokens.
    #[schemars(range(min = 1))]
    pub max_tokens: u32,
    /// Instructions for assistants that have none of their own. An assistant's system prompt
    /// replaces it rather than adding to it, so a tenant's instructions are never mixed with
    /// another text.
    pub system_prompt: Option<String>,
    /// The text that introduces the retrieved knowledge passages in the system message.
    pub context_header: String,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            model: None,
            history: 10,
            temperature: None,
            max_tokens: 512,
            system_prompt: None,
            context_header: DEFAULT_CONTEXT_HEADER.to_owned(),
        }
    }
}

impl StageConfig for LlmConfig {
    const KIND: &'static str = "llm";
    const DESCRIPTION: &'static str = "Asks the LLM for the assistant's answer and sets it as the reply.";
    const DEFAULT_ON_ERROR: OnError = OnError::Closed;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(30);
    const EXAMPLE: &'static str = "kind = \"llm\"\n\
model = \"gemini-1.5-pro\"\n\
history = 10\n\
temperature = 0.4\n\
max_tokens = 512\n\
system_prompt = \"Tu es l'assistant WhatsApp de l'entreprise. Réponds en français, brièvement et poliment.\"\n\
context_header = \"Informations issues de la base de connaissances de l'entreprise. Appuie-toi sur elles pour répondre ; si elles ne couvrent pas la question, dis-le plutôt que d'inventer.\"\n";

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            problems.push(ConfigProblem::error("model", "model is empty; remove the key to use the provider's model"));
        }
        if self.system_prompt.as_deref().is_some_and(|p| p.trim().is_empty()) {
            problems.push(ConfigProblem::warning("system_prompt", "system_prompt is empty; remove the key instead"));
        }
        if self.context_header.trim().is_empty() {
            problems.push(ConfigProblem::warning(
                "context_header",
                "context_header is empty: the knowledge passages reach the LLM without saying what they are",
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(LlmStage {
            model: self.model.clone(),
            history: self.history,
            // f64 in the config so that the schema shows 0.4, not 0.4000000059604645.
            temperature: self.temperature.map(|t| t as f32),
            max_tokens: self.max_tokens,
            system_prompt: self.system_prompt.clone(),
            context_header: self.context_header.clone(),
            llm: resources.llm.clone(),
            store: resources.store.clone(),
        }))
    }
}

engine::register_stage!(LlmConfig);

/// The running stage.
pub struct LlmStage {
    model: Option<String>,
    history: usize,
    temperature: Option<f32>,
    max_tokens: u32,
    system_prompt: Option<String>,
    context_header: String,
    llm: Arc<dyn Llm>,
    store: Arc<dyn RelationalStore>,
}

impl LlmStage {
    /// The model to ask for and who chose it (`assistant`, `pipeline` or `provider`).
    fn model_for(&self, msg: &Message) -> (Option<String>, &'static str) {
        let assistant = msg.tenant.assistant.model.as_deref().map(str::trim).filter(|m| !m.is_empty());
        match (assistant, &self.model) {
            (Some(m), _) => (Some(m.to_owned()), "assistant"),
            (None, Some(m)) => (Some(m.clone()), "pipeline"),
            (None, None) => (None, "provider"),
        }
    }

    fn system_message(&self, msg: &Message) -> Option<String> {
        let own = msg.tenant.assistant.system_prompt.trim();
        let instructions = if own.is_empty() { self.system_prompt.as_deref().unwrap_or("").trim() } else { own };
        let knowledge = knowledge_section(&self.context_header, &msg.knowledge);
        let parts: Vec<&str> = [instructions, knowledge.as_str()].into_iter().filter(|p| !p.is_empty()).collect();
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    }

    /// The last `history` messages before the current one, oldest first, and the answer to the
    /// current one if an earlier attempt of this job already recorded it.
    async fn history_for(&self, msg: &Message) -> Result<(Vec<ChatMessage>, Option<String>), StageError> {
        let retried = msg.job.attempt > 1;
        if self.history == 0 && !retried {
            return Ok((Vec::new(), None));
        }
        // Two more than needed: the worker has stored the current message, and a retried job may
        // have recorded its answer; neither counts as history.
        let recent = self.store.recent_messages(&msg.conversation.id, self.history + 2).await?;
        let current = &msg.inbound.provider_message_id;
        let mut recorded = None;
        let mut earlier = Vec::with_capacity(recent.len());
        for m in recent {
            if m.provider_message_id.as_ref() == Some(current) {
                continue;
            }
            if m.role == ChatRole::Assistant && m.in_reply_to.as_ref() == Some(current) {
                recorded = Some(m.text);
                continue;
            }
            // The system message is ours to write; providers reject empty turns.
            if m.role != ChatRole::System && !m.text.trim().is_empty() {
                earlier.push(ChatMessage { role: m.role, content: m.text });
            }
        }
        let excess = earlier.len().saturating_sub(self.history);
        earlier.drain(..excess);
        Ok((earlier, recorded.filter(|t| !t.trim().is_empty())))
    }
}

fn knowledge_section(header: &str, chunks: &[KnowledgeChunk]) -> String {
    if chunks.is_empty() {
        return String::new();
    }
    let mut out = header.trim().to_owned();
    for chunk in chunks {
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        let title = chunk.title.trim();
        if !title.is_empty() {
            out.push_str("### ");
            out.push_str(title);
            out.push('\n');
        }
        out.push_str(chunk.text.trim());
    }
    out
}

#[engine::async_trait]
impl Stage for LlmStage {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let (model, model_source) = self.model_for(msg);
        let (history, recorded) = self.history_for(msg).await?;
        if let Some(text) = recorded {
            // A retry (the send failed or timed out after the answer was recorded): the recorded
            // answer is the one the send stage will deliver; asking again would only cost tokens.
            cx.emit(Event::info(names::LLM_ANSWER_REUSED).with("attempt", msg.job.attempt));
            msg.reply = Some(Reply { text, source: ReplySource::Llm });
            return Ok(Decision::Continue);
        }
        let history_len = history.len();

        let mut messages = Vec::with_capacity(history_len + 2);
        if let Some(system) = self.system_message(msg) {
            messages.push(ChatMessage { role: ChatRole::System, content: system });
        }
        messages.extend(history);
        messages.push(ChatMessage { role: ChatRole::User, content: msg.inbound.text.clone() });

        let request = LlmRequest {
            model: model.clone(),
            messages,
            temperature: msg.tenant.assistant.temperature.or(self.temperature),
            max_tokens: Some(self.max_tokens),
            knowledge: msg.knowledge.clone(),
        };

        cx.emit(
            Event::info(names::LLM_REQUEST)
                .with("model", &model)
                .with("modelSource", model_source)
                .with("historyMessages", history_len)
                .with("knowledgeChunks", msg.knowledge.len()),
        );
        let started = Instant::now();
        let response = self.llm.complete(&request).await?;
        // Emitted even for an empty answer: the call was made and its tokens are spent.
        cx.emit(
            Event::info(names::LLM_REQUEST_COMPLETED)
                .with("model", &response.model)
                .with("durationMs", u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
                .with("promptTokens", response.prompt_tokens)
                .with("completionTokens", response.completion_tokens),
        );

        let text = response.text.trim();
        if text.is_empty() {
            return Err(StageError::Internal(format!("the LLM ({}) returned an empty answer", response.model)));
        }
        msg.reply = Some(Reply { text: text.to_owned(), source: ReplySource::Llm });
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use engine::{
        events::Level, ids::ProviderMessageId, message::KnowledgeChunk, ports::HistoryMessage, runtime::Outcome,
        testing::TestBench,
    };
    use serde_json::json;

    use super::*;

    fn history(bench: &TestBench, role: ChatRole, text: &str, id: Option<&str>) {
        bench.store.push_history(
            &engine::ids::ConversationId::new("conv-1"),
            HistoryMessage {
                role,
                text: text.into(),
                provider_message_id: id.map(ProviderMessageId::new),
                in_reply_to: None,
            },
        );
    }

    fn hours_chunk() -> KnowledgeChunk {
        KnowledgeChunk {
            document_id: "doc-hours".into(),
            title: "Horaires".into(),
            text: "Ouvert du lundi au vendredi, 9h-18h.".into(),
            score: 0.8,
        }
    }

    #[tokio::test]
    async fn request_has_instructions_knowledge_history_and_the_question_once() {
        let bench = TestBench::new();
        let mut msg = bench.message("Vous êtes ouverts samedi ?");
        history(&bench, ChatRole::User, "Bonjour", Some("wamid.old.1"));
        history(&bench, ChatRole::Assistant, "Bonjour ! Comment puis-je vous aider ?", None);
        // The worker stored the current message before the pipeline ran.
        history(&bench, ChatRole::User, "Vous êtes ouverts samedi ?", Some(msg.inbound.provider_message_id.as_str()));
        msg.knowledge = vec![hours_chunk()];
        let pipeline = bench.stage("kind = \"llm\"\ncontext_header = \"Contexte :\"");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        let requests = bench.llm.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        let roles: Vec<ChatRole> = request.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [ChatRole::System, ChatRole::User, ChatRole::Assistant, ChatRole::User]);
        assert_eq!(
            request.messages[0].content,
            "Tu es l'assistant de la boutique.\n\nContexte :\n\n### Horaires\nOuvert du lundi au vendredi, 9h-18h."
        );
        assert_eq!(request.messages[1].content, "Bonjour");
        assert_eq!(request.messages[3].content, "Vous êtes ouverts samedi ?");
        let question_count = request.messages.iter().filter(|m| m.content == "Vous êtes ouverts samedi ?").count();
        assert_eq!(question_count, 1, "the current message must appear once");
        assert_eq!(request.knowledge, vec![hours_chunk()]);
        assert_eq!(request.max_tokens, Some(512));
        assert_eq!(request.model, None);
        assert_eq!(request.temperature, None);
    }

    #[tokio::test]
    async fn a_retried_job_reuses_the_answer_an_earlier_attempt_recorded_instead_of_asking_again() {
        let bench = TestBench::new();
        bench.llm.answer_with("Une nouvelle réponse");
        let pipeline = bench.stage("kind = \"llm\"");
        let mut msg = bench.message("Vous livrez le dimanche ?");
        let current = msg.inbound.provider_message_id.clone();
        history(&bench, ChatRole::User, "Vous livrez le dimanche ?", Some(current.as_str()));
        // The first attempt recorded its answer, then the send failed.
        bench.store.push_history(
            &msg.conversation.id,
            HistoryMessage {
                role: ChatRole::Assistant,
                text: "Non, pas le dimanche.".into(),
                provider_message_id: None,
                in_reply_to: Some(current.clone()),
            },
        );
        msg.job.attempt = 2;

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert!(bench.llm.requests().is_empty(), "the LLM is not asked again");
        assert_eq!(msg.reply, Some(Reply { text: "Non, pas le dimanche.".into(), source: ReplySource::Llm }));
        assert!(bench.events.names().contains(&names::LLM_ANSWER_REUSED));
        assert!(!bench.events.names().contains(&names::LLM_REQUEST));
    }

    #[tokio::test]
    async fn a_retried_job_without_a_recorded_answer_asks_the_llm_even_without_history() {
        let bench = TestBench::new();
        bench.llm.answer_with("Oui.");
        let pipeline = bench.stage("kind = \"llm\"\nhistory = 0");
        let mut msg = bench.message("Vous livrez le dimanche ?");
        // An answer to another message is not this message's answer.
        bench.store.push_history(
            &msg.conversation.id,
            HistoryMessage {
                role: ChatRole::Assistant,
                text: "Bonjour !".into(),
                provider_message_id: None,
                in_reply_to: Some(ProviderMessageId::new("wamid.other")),
            },
        );
        msg.job.attempt = 3;

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.llm.requests().len(), 1);
        assert_eq!(bench.llm.requests()[0].messages.len(), 2, "history = 0: instructions and the question only");
        assert_eq!(msg.reply.map(|r| r.text), Some("Oui.".into()));
    }

    #[tokio::test]
    async fn answer_becomes_the_reply() {
        let bench = TestBench::new();
        bench.llm.answer_with("  Oui, le samedi de 10h à 13h.\n");
        let pipeline = bench.stage("kind = \"llm\"");
        let mut msg = bench.message("Vous êtes ouverts samedi ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(msg.reply, Some(Reply { text: "Oui, le samedi de 10h à 13h.".into(), source: ReplySource::Llm }));
    }

    #[tokio::test]
    async fn request_and_completion_are_logged_in_order() {
        let bench = TestBench::new();
        history(&bench, ChatRole::User, "Bonjour", Some("wamid.old.1"));
        history(&bench, ChatRole::Assistant, "Bonjour !", None);
        let pipeline = bench.stage("kind = \"llm\"\nmodel = \"gemini-1.5-flash\"");
        let mut msg = bench.message("Vos horaires ?");
        msg.knowledge = vec![hours_chunk()];

        bench.run(&pipeline, &mut msg).await;

        assert_eq!(bench.events.names(), [names::LLM_REQUEST, names::LLM_REQUEST_COMPLETED]);
        let request = &bench.events.named(names::LLM_REQUEST)[0];
        assert_eq!(request.level, Level::Info);
        assert_eq!(request.field("model"), Some(&json!("gemini-1.5-flash")));
        assert_eq!(request.field("modelSource"), Some(&json!("pipeline")));
        assert_eq!(request.field("historyMessages"), Some(&json!(2)));
        assert_eq!(request.field("knowledgeChunks"), Some(&json!(1)));
        assert_eq!(request.field("providerMessageId"), Some(&json!(msg.inbound.provider_message_id.as_str())));
        let done = &bench.events.named(names::LLM_REQUEST_COMPLETED)[0];
        assert_eq!(done.level, Level::Info);
        assert_eq!(done.field("model"), Some(&json!("gemini-1.5-flash")));
        assert!(done.field("durationMs").is_some_and(serde_json::Value::is_u64));
        assert_eq!(done.field("completionTokens"), Some(&json!(5)));
        assert!(done.field("promptTokens").and_then(serde_json::Value::as_u64).is_some_and(|t| t > 0));
    }

    #[tokio::test]
    async fn history_keeps_only_the_last_messages_before_the_current_one() {
        let bench = TestBench::new();
        let mut msg = bench.message("question 4");
        for i in 1..=3 {
            history(&bench, ChatRole::User, &format!("question {i}"), Some(&format!("wamid.old.{i}")));
            history(&bench, ChatRole::Assistant, &format!("réponse {i}"), None);
        }
        history(&bench, ChatRole::User, "question 4", Some(msg.inbound.provider_message_id.as_str()));
        let pipeline = bench.stage("kind = \"llm\"\nhistory = 3");

        bench.run(&pipeline, &mut msg).await;

        let contents: Vec<String> =
            bench.llm.requests()[0].messages.iter().skip(1).map(|m| m.content.clone()).collect();
        assert_eq!(contents, ["réponse 2", "question 3", "réponse 3", "question 4"]);
    }

    #[tokio::test]
    async fn no_history_means_no_database_call() {
        let bench = TestBench::new();
        bench.store.set_failing(true);
        let pipeline = bench.stage("kind = \"llm\"\nhistory = 0");
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(bench.llm.requests()[0].messages.len(), 2);
    }

    #[tokio::test]
    async fn assistant_model_wins_over_pipeline_model_which_wins_over_provider_default() {
        let bench = TestBench::new();
        let with_model = bench.stage("kind = \"llm\"\nmodel = \"gemini-1.5-pro\"\ntemperature = 0.5");
        let without_model = bench.stage("kind = \"llm\"");

        let mut msg = bench.message("Bonjour");
        msg.tenant.assistant.model = Some("gemini-2.0-flash".into());
        msg.tenant.assistant.temperature = Some(0.1);
        bench.run(&with_model, &mut msg).await;
        let mut msg = bench.message("Bonjour");
        bench.run(&with_model, &mut msg).await;
        let mut msg = bench.message("Bonjour");
        bench.run(&without_model, &mut msg).await;

        let requests = bench.llm.requests();
        let models: Vec<Option<&str>> = requests.iter().map(|r| r.model.as_deref()).collect();
        assert_eq!(models, [Some("gemini-2.0-flash"), Some("gemini-1.5-pro"), None]);
        let temperatures: Vec<Option<f32>> = requests.iter().map(|r| r.temperature).collect();
        assert_eq!(temperatures, [Some(0.1), Some(0.5), None]);
        let sources: Vec<serde_json::Value> =
            bench.events.named(names::LLM_REQUEST).iter().filter_map(|e| e.field("modelSource").cloned()).collect();
        assert_eq!(sources, [json!("assistant"), json!("pipeline"), json!("provider")]);
    }

    #[tokio::test]
    async fn tier_override_changes_the_model() {
        let bench = TestBench::new();
        let generation = bench.generation(
            "[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n\n\
             [tiers.enterprise]\nstages.llm.model = \"gemini-1.5-pro\"\n",
        );
        let mut base = bench.message("Bonjour");
        generation.pipeline(None).run(&mut base, &bench.events, 1).await;
        let mut enterprise = bench.message("Bonjour");
        generation.pipeline(Some("enterprise")).run(&mut enterprise, &bench.events, 1).await;

        let models: Vec<Option<String>> = bench.llm.requests().into_iter().map(|r| r.model).collect();
        assert_eq!(models, [None, Some("gemini-1.5-pro".to_owned())]);
    }

    #[tokio::test]
    async fn pipeline_system_prompt_is_used_only_when_the_assistant_has_none() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"llm\"\nsystem_prompt = \"Réponds brièvement.\"");

        let mut own = bench.message("Bonjour");
        bench.run(&pipeline, &mut own).await;
        let mut none = bench.message("Bonjour");
        none.tenant.assistant.system_prompt = String::new();
        bench.run(&pipeline, &mut none).await;

        let systems: Vec<String> = bench.llm.requests().iter().map(|r| r.messages[0].content.clone()).collect();
        assert_eq!(systems, ["Tu es l'assistant de la boutique.", "Réponds brièvement."]);
    }

    #[tokio::test]
    async fn no_instructions_and_no_knowledge_sends_no_system_message() {
        let bench = TestBench::new();
        let pipeline = bench.stage("kind = \"llm\"");
        let mut msg = bench.message("Bonjour");
        msg.tenant.assistant.system_prompt = "  ".into();

        bench.run(&pipeline, &mut msg).await;

        let roles: Vec<ChatRole> = bench.llm.requests()[0].messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [ChatRole::User]);
    }

    #[tokio::test]
    async fn llm_down_fails_the_job_without_a_reply() {
        let bench = TestBench::new();
        bench.llm.set_failing(true);
        let pipeline = bench.stage("kind = \"llm\"");
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        let Outcome::Failed { stage, retryable, error, .. } = outcome else {
            panic!("expected Failed, got {outcome:?}")
        };
        assert_eq!(stage, "llm");
        assert!(retryable);
        assert!(matches!(error, StageError::Port(ref e) if e.service == "llm"), "{error:?}");
        assert_eq!(msg.reply, None);
        assert_eq!(bench.events.names(), [names::LLM_REQUEST]);
    }

    #[tokio::test]
    async fn llm_down_with_on_error_open_continues_without_a_reply() {
        let bench = TestBench::new();
        bench.llm.set_failing(true);
        let pipeline = bench.stage("kind = \"llm\"\non_error = \"open\"");
        let mut msg = bench.message("Bonjour");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);

        assert_eq!(msg.reply, None);
        assert!(msg.is_degraded());
        assert_eq!(bench.events.names(), [names::LLM_REQUEST, names::STAGE_FAILED_OPEN]);
    }

    #[tokio::test]
    async fn history_store_down_fails_the_job_before_calling_the_llm() {
        let bench = TestBench::new();
        bench.store.set_failing(true);
        let pipeline = bench.stage("kind = \"llm\"");
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        assert!(matches!(outcome, Outcome::Failed { retryable: true, .. }), "{outcome:?}");
        assert!(bench.llm.requests().is_empty());
        assert_eq!(bench.events.count(names::LLM_REQUEST), 0);
    }

    #[tokio::test]
    async fn empty_answer_is_an_error_not_a_reply() {
        let bench = TestBench::new();
        bench.llm.answer_with(" \n ");
        let pipeline = bench.stage("kind = \"llm\"");
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        let Outcome::Failed { error, retryable, .. } = outcome else { panic!("expected Failed, got {outcome:?}") };
        assert!(matches!(error, StageError::Internal(ref e) if e.contains("empty answer")), "{error:?}");
        assert!(retryable);
        assert_eq!(msg.reply, None);
    }

    #[tokio::test]
    async fn slow_llm_times_out() {
        let bench = TestBench::new();
        bench.llm.set_delay(Duration::from_millis(150));
        let pipeline = bench.stage("kind = \"llm\"\ntimeout = \"50ms\"");
        let mut msg = bench.message("Bonjour");

        let outcome = bench.run(&pipeline, &mut msg).await;

        let Outcome::Failed { error, retryable, .. } = outcome else { panic!("expected Failed, got {outcome:?}") };
        assert_eq!(error, StageError::Timeout(Duration::from_millis(50)));
        assert!(retryable);
        assert_eq!(msg.reply, None);
        assert_eq!(bench.events.names(), [names::LLM_REQUEST]);
    }

    #[test]
    fn example_builds_and_defaults_match_the_documentation() {
        let bench = TestBench::new();
        let spec = engine::config::load_stage(LlmConfig::EXAMPLE, "example.toml").unwrap();
        assert_eq!(spec.on_error, OnError::Closed);
        assert_eq!(spec.timeout, ConfigDuration::from_secs(30));
        spec.config.build(&bench.resources()).unwrap();
        assert!(spec.config.check().is_empty());
        let defaults: LlmConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(defaults.history, 10);
        assert_eq!(defaults.max_tokens, 512);
        assert_eq!(defaults.model, None);
        assert_eq!(defaults.context_header, DEFAULT_CONTEXT_HEADER);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in ["temperature = 2.5", "max_tokens = 0", "history = -1", "model = \"\"", "prompt = \"x\""] {
            let entry = format!("kind = \"llm\"\n{bad}");
            assert!(engine::config::load_stage(&entry, "t.toml").is_err(), "`{bad}` was accepted");
        }
    }
}
