//! The stage API: what a stage returns (a business decision, or an infrastructure error) and the
//! context it runs in.

use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    events::{Event, EventSink},
    ids::JobId,
    message::Message,
    ports::PortError,
};

/// What a stage decided about the message. Decisions are business outcomes; the failure policy
/// never sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on to the next stage.
    Continue,
    /// Answer with this text and stop: the remaining stages are skipped except the last one
    /// (`send`), which delivers it.
    Reply(String),
    /// Stop without answering; the reason is for logs.
    Drop(String),
}

/// An infrastructure failure: the only thing a stage's `on_error` policy acts on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Internal(String),
}

impl StageError {
    /// Whether retrying the job can help. A permanent provider refusal cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Port(e) => e.is_retryable(),
            Self::Timeout(_) | Self::Internal(_) => true,
        }
    }
}

/// What a stage does when it fails: `open` logs `stage_failed_open`, marks the message degraded
/// and continues with the next stage; `closed` fails the job, which is retried with backoff, then
/// dead-lettered. (Documented here rather than per variant, so that the schema is a plain `enum`
/// and a wrong value gets a clear message.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    Open,
    Closed,
}

/// The correlation ids every event of a job carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correlation {
    pub provider_message_id: String,
    pub tenant_id: String,
    pub conversation_id: String,
    pub job_id: JobId,
}

impl Correlation {
    pub fn of(msg: &Message) -> Self {
        Self {
            provider_message_id: msg.inbound.provider_message_id.to_string(),
            tenant_id: msg.tenant.id.to_string(),
            conversation_id: msg.conversation.id.to_string(),
            job_id: msg.job.id.clone(),
        }
    }

    /// Adds the ids to an event, as top-level fields.
    pub fn stamp(&self, mut event: Event) -> Event {
        event.fields.insert("providerMessageId", self.provider_message_id.clone().into());
        event.fields.insert("tenantId", self.tenant_id.clone().into());
        event.fields.insert("conversationId", self.conversation_id.clone().into());
        event.fields.insert("jobId", self.job_id.to_string().into());
        event
    }
}

/// What a running stage knows besides the message: who it is, and where its events go.
pub struct StageContext<'a> {
    pub stage_id: &'a str,
    pub kind: &'a str,
    pub generation: u64,
    pub(crate) correlation: &'a Correlation,
    pub(crate) events: &'a dyn EventSink,
}

impl StageContext<'_> {
    /// Emits an event stamped with the job's correlation ids.
    pub fn emit(&self, event: Event) {
        self.events.emit(self.correlation.stamp(event));
    }
}

/// A runtime stage. Built once per configuration generation and shared by all jobs, so it keeps
/// no per-message state.
#[async_trait]
pub trait Stage: Send + Sync {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError>;
}
