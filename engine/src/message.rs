//! The message a job carries through the pipeline: who it is for (tenant, channel, conversation),
//! what the user wrote, and what the stages add to it on the way (knowledge, reply, degradation).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::{ChannelId, ConversationId, JobId, PhoneNumber, ProviderMessageId, TenantId};

/// One run of one job. `attempt` starts at 1 and grows with each retry of the same job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub id: JobId,
    pub attempt: u32,
}

/// The tenant as the worker resolved it from the channel, with what the stages need to know about
/// its plan and assistant, so that they do not each ask the database again.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantInfo {
    pub id: TenantId,
    /// The tier of the tenant's plan; `None` runs the base pipeline.
    pub tier: Option<String>,
    /// Messages per calendar month (UTC) the plan allows; `None` is unlimited.
    pub monthly_message_limit: Option<u64>,
    pub assistant: AssistantSettings,
}

/// The tenant's assistant: its instructions and model preferences.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AssistantSettings {
    pub system_prompt: String,
    /// Overrides the pipeline's model when set.
    pub model: Option<String>,
    pub temperature: Option<f32>,
}

/// The business number the message arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub id: ChannelId,
    /// `meta`, `360dialog` or `sandbox`.
    pub provider: String,
    pub phone_number_id: String,
}

/// A conversation's state that the stages read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationInfo {
    pub id: ConversationId,
    pub quota_block: Option<QuotaBlock>,
}

/// The conversation was refused by the monthly quota in `period` (`YYYY-MM`, UTC) while the plan
/// allowed `limit` messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaBlock {
    pub period: String,
    pub limit: u64,
}

/// What the user sent.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundText {
    pub provider_message_id: ProviderMessageId,
    pub from: PhoneNumber,
    pub text: String,
    /// The provider's timestamp of the message.
    pub sent_at: DateTime<Utc>,
}

/// A passage of the tenant's knowledge base found relevant to the message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KnowledgeChunk {
    pub document_id: String,
    pub title: String,
    pub text: String,
    /// Cosine similarity, 0..=1.
    pub score: f32,
}

/// Where the reply came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplySource {
    /// The assistant's answer.
    Llm,
    /// A fixed notice from the named stage (rate limit, quota).
    Notice { stage: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    pub source: ReplySource,
}

/// A stage that failed and was skipped because its policy is `open`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DegradedStage {
    pub stage: String,
    pub kind: String,
    pub error: String,
}

/// The outbound message as the provider accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentReply {
    pub outbound_id: String,
    pub provider_message_id: ProviderMessageId,
}

/// Everything one job knows about its message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub job: JobInfo,
    pub tenant: TenantInfo,
    pub channel: ChannelInfo,
    pub conversation: ConversationInfo,
    pub inbound: InboundText,
    pub knowledge: Vec<KnowledgeChunk>,
    pub reply: Option<Reply>,
    pub degraded: Vec<DegradedStage>,
    pub sent: Option<SentReply>,
}

impl Message {
    pub fn new(
        job: JobInfo,
        tenant: TenantInfo,
        channel: ChannelInfo,
        conversation: ConversationInfo,
        inbound: InboundText,
    ) -> Self {
        Self {
            job,
            tenant,
            channel,
            conversation,
            inbound,
            knowledge: Vec::new(),
            reply: None,
            degraded: Vec::new(),
            sent: None,
        }
    }

    /// True when a stage failed open on the way: anti-abuse or retrieval was skipped.
    pub fn is_degraded(&self) -> bool {
        !self.degraded.is_empty()
    }
}
