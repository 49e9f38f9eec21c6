#![allow(dead_code)]
//! Test-only stage kinds for the engine's own tests: `probe` (records what it saw, can sleep, can
//! fail through the key-value port) and a minimal `send` that delivers the reply through the
//! sender port.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use engine::{
    BuildError, ConfigDuration, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    message::{Message, Reply, ReplySource},
    ports::{KeyValueStore, OutboundSender, OutboundText, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Labels seen per job id, in stage order.
pub fn seen() -> &'static Mutex<HashMap<String, Vec<String>>> {
    static SEEN: OnceLock<Mutex<HashMap<String, Vec<String>>>> = OnceLock::new();
    SEEN.get_or_init(Default::default)
}

pub fn labels_of(job: &str) -> Vec<String> {
    seen().lock().unwrap().get(job).cloned().unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Recorded for each message the stage sees.
    pub label: String,
    /// Sleep this long before deciding.
    pub sleep: Option<ConfigDuration>,
    /// `continue`, `reply` or `drop`.
    pub decision: Option<String>,
    /// Touch the key-value store (so that a failing store makes the stage fail).
    pub use_kv: bool,
}

struct Probe {
    config: ProbeConfig,
    kv: Arc<dyn KeyValueStore>,
}

#[engine::async_trait]
impl Stage for Probe {
    async fn process(&self, msg: &mut Message, _cx: &StageContext<'_>) -> Result<Decision, StageError> {
        seen().lock().unwrap().entry(msg.job.id.to_string()).or_default().push(self.config.label.clone());
        if let Some(d) = self.config.sleep {
            tokio::time::sleep(d.get()).await;
        }
        if self.config.use_kv {
            self.kv.claim(&format!("probe:{}", msg.job.id), "x", std::time::Duration::from_secs(1)).await?;
        }
        Ok(match self.config.decision.as_deref() {
            Some("reply") => Decision::Reply(format!("notice from {}", self.config.label)),
            Some("drop") => Decision::Drop(format!("dropped by {}", self.config.label)),
            _ => {
                if msg.reply.is_none() {
                    msg.reply =
                        Some(Reply { text: format!("answer via {}", self.config.label), source: ReplySource::Llm });
                }
                Decision::Continue
            }
        })
    }
}

impl StageConfig for ProbeConfig {
    const KIND: &'static str = "probe";
    const DESCRIPTION: &'static str = "Test stage that records what it sees.";
    const DEFAULT_ON_ERROR: OnError = OnError::Open;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(5);
    const EXAMPLE: &'static str = "kind = \"probe\"\nlabel = \"a\"\n";

    fn build(&self, r: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        if self.label == "unbuildable" {
            return Err(BuildError("this label refuses to build".into()));
        }
        Ok(Arc::new(Probe { config: self.clone(), kv: r.kv.clone() }))
    }
}
engine::register_stage!(ProbeConfig);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SendConfig {}

struct Send(Arc<dyn OutboundSender>);

#[engine::async_trait]
impl Stage for Send {
    async fn process(&self, msg: &mut Message, _cx: &StageContext<'_>) -> Result<Decision, StageError> {
        if let Some(reply) = &msg.reply {
            self.0
                .send_text(&OutboundText {
                    channel: msg.channel.clone(),
                    to: msg.inbound.from.clone(),
                    text: reply.text.clone(),
                    reply_to: None,
                })
                .await?;
        }
        Ok(Decision::Continue)
    }
}

impl StageConfig for SendConfig {
    const KIND: &'static str = "send";
    const DESCRIPTION: &'static str = "Test sender.";
    const DEFAULT_ON_ERROR: OnError = OnError::Closed;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(5);
    const EXAMPLE: &'static str = "kind = \"send\"\n";

    fn build(&self, r: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(Send(r.sender.clone())))
    }
}
engine::register_stage!(SendConfig);
