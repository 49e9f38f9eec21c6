//! The ports through which stages reach the world. Adapters (Redis, PostgreSQL, HTTP clients) live
//! in the `parley` binary; [`crate::memory`] has in-memory versions for tests.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{
    ids::{ChannelId, ConversationId, PhoneNumber, ProviderMessageId, TenantId},
    message::{ChannelInfo, KnowledgeChunk, QuotaBlock},
};

/// How a port call failed. The kind decides whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortErrorKind {
    /// The service could not be reached or answered with a transient error: retry later.
    Unavailable,
    /// The service refused the request for good (invalid recipient, bad credentials): do not retry.
    Permanent,
}

/// A failed call to a port. Messages never contain secrets or unmasked phone numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service}: {message}{}", code.as_ref().map(|c| format!(" (code {c})")).unwrap_or_default())]
pub struct PortError {
    pub service: &'static str,
    pub kind: PortErrorKind,
    /// The provider's error code, when it gave one.
    pub code: Option<String>,
    pub message: String,
}

impl PortError {
    pub fn unavailable(service: &'static str, message: impl Into<String>) -> Self {
        Self { service, kind: PortErrorKind::Unavailable, code: None, message: message.into() }
    }

    pub fn permanent(service: &'static str, code: Option<String>, message: impl Into<String>) -> Self {
        Self { service, kind: PortErrorKind::Permanent, code, message: message.into() }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == PortErrorKind::Unavailable
    }
}

// ---------------------------------------------------------------------------------------------
// Key-value store (Redis in production)

/// Result of [`KeyValueStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and now holds our value.
    Acquired,
    /// The key already held this value.
    HeldBy(String),
}

/// One fixed-window counter to increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowKey {
    pub key: String,
    pub window: Duration,
}

/// Makes a [`KeyValueStore::hit_windows`] call count once per message: the first call that brings
/// this key increments the counters; a later one with the same key (a retried job) only reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HitOnce {
    pub key: String,
    /// How long the key is remembered: at least the longest window.
    pub ttl: Duration,
}

/// A counter's value after the increment, and when its window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCount {
    pub count: u64,
    pub resets_in: Duration,
}

#[async_trait]
pub trait KeyValueStore: Send + Sync {
    /// Sets `key` to `value` with `ttl` if the key is absent (`SET NX PX`), else returns the value
    /// it holds — one atomic step.
    async fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<Claim, PortError>;

    /// Increments every counter by one in one atomic step; a counter starts its window (its TTL)
    /// at its first increment. With `once`, only the first call bearing that key increments;
    /// later ones return the counters as they are.
    async fn hit_windows(&self, keys: &[WindowKey], once: Option<&HitOnce>) -> Result<Vec<WindowCount>, PortError>;
}

// ---------------------------------------------------------------------------------------------
// Relational store (PostgreSQL in production)

/// Result of consuming one message of a monthly quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Counted; `used` messages are now used this period.
    Granted { used: u64 },
    /// The period is used up; nothing was counted.
    Refused { used: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

/// A message of the conversation's history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMessage {
    pub role: ChatRole,
    pub text: String,
    /// The provider id of the message, to recognise the current one in the history.
    pub provider_message_id: Option<ProviderMessageId>,
    /// For an answer: the inbound message it answers — so that a retried job finds the answer an
    /// earlier attempt already recorded instead of asking the LLM again.
    pub in_reply_to: Option<ProviderMessageId>,
}

/// What the send stage records before it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutbound {
    pub tenant: TenantId,
    pub channel: ChannelId,
    pub conversation: ConversationId,
    /// The inbound message this answers: at most one answer is recorded per inbound message.
    pub in_reply_to: ProviderMessageId,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundStatus {
    Pending,
    Sent,
    Failed,
}

/// An outbound message row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    pub id: String,
    pub status: OutboundStatus,
    /// Set once the provider accepted it.
    pub provider_message_id: Option<ProviderMessageId>,
    pub text: String,
}

#[async_trait]
pub trait RelationalStore: Send + Sync {
    /// Counts one message against `tenant`'s quota for `period` (`YYYY-MM`) if fewer than `limit`
    /// are used, atomically. Idempotent per `message`: consuming again for the same message (a
    /// retried job) returns the first decision without counting twice.
    async fn consume_monthly_quota(
        &self,
        tenant: &TenantId,
        period: &str,
        limit: u64,
        message: &ProviderMessageId,
    ) -> Result<QuotaDecision, PortError>;

    /// Marks the conversation as refused by the quota for the block's period.
    async fn block_conversation_quota(
        &self,
        conversation: &ConversationId,
        block: &QuotaBlock,
    ) -> Result<(), PortError>;

    /// The last `limit` messages of the conversation, oldest first.
    async fn recent_messages(
        &self,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, PortError>;

    /// The tenant's knowledge chunks most similar to `embedding`, best first, at most `top_k`,
    /// each scoring at least `min_score`.
    async fn search_knowledge(
        &self,
        tenant: &TenantId,
        embedding: &[f32],
        top_k: usize,
        min_score: f32,
    ) -> Result<Vec<KnowledgeChunk>, PortError>;

    /// Records the answer to an inbound message before it is sent, or returns the one already
    /// recorded for it (a retried job), whatever its text.
    async fn begin_outbound(&self, outbound: &NewOutbound) -> Result<OutboundRecord, PortError>;

    async fn mark_outbound_sent(
        &self,
        outbound_id: &str,
        provider_message_id: &ProviderMessageId,
    ) -> Result<(), PortError>;

    async fn mark_outbound_failed(&self, outbound_id: &str, code: Option<&str>, reason: &str) -> Result<(), PortError>;
}

// ---------------------------------------------------------------------------------------------
// LLM

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    /// `None`: the provider's configured model.
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// The retrieved passages, also written into the system message; given apart for providers
    /// that answer from them directly (the local one).
    pub knowledge: Vec<KnowledgeChunk>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmResponse {
    pub text: String,
    pub model: String,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

#[async_trait]
pub trait Llm: Send + Sync {
    async fn complete(&self, request: &LlmRequest) -> Result<LlmResponse, PortError>;
}

// ---------------------------------------------------------------------------------------------
// Embeddings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedPurpose {
    Query,
    Document,
}

#[async_trait]
pub trait Embedder: Send + Sync {
    /// The length of every vector this embedder returns.
    fn dimensions(&self) -> usize;
    async fn embed(&self, texts: &[String], purpose: EmbedPurpose) -> Result<Vec<Vec<f32>>, PortError>;
}

// ---------------------------------------------------------------------------------------------
// Outbound sender (WhatsApp provider)

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundText {
    pub channel: ChannelInfo,
    pub to: PhoneNumber,
    pub text: String,
    /// Quote this inbound message (Meta's `context.message_id`).
    pub reply_to: Option<ProviderMessageId>,
}

#[async_trait]
pub trait OutboundSender: Send + Sync {
    /// Sends a text and returns the provider's id of the sent message.
    async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError>;

    /// Marks the inbound message `message_id` as read (the user sees the blue ticks) and, with
    /// `typing`, shows the typing indicator until the answer is sent or about 25 seconds pass.
    ///
    /// Optional for a provider: the default does nothing, so that a sender without read receipts
    /// (the sandbox) needs no code for it.
    async fn mark_read(
        &self,
        _channel: &ChannelInfo,
        _message_id: &ProviderMessageId,
        _typing: bool,
    ) -> Result<(), PortError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Clock

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Everything a stage may use, handed to its `build` function. Cheap to clone.
#[derive(Clone)]
pub struct Resources {
    pub kv: Arc<dyn KeyValueStore>,
    pub store: Arc<dyn RelationalStore>,
    pub llm: Arc<dyn Llm>,
    pub embedder: Arc<dyn Embedder>,
    pub sender: Arc<dyn OutboundSender>,
    pub clock: Arc<dyn Clock>,
    pub events: Arc<dyn crate::events::EventSink>,
    /// Key of the sender pseudonym in Redis keys ([`crate::masking::sender_pseudonym`]).
    pub pseudonym_key: Arc<[u8]>,
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resources").finish_non_exhaustive()
    }
}
