//! In-memory implementations of every port, with a switch that makes each one fail, for the unit
//! tests of any stage crate.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{
    embedding::{cosine, hash_embedding},
    ids::{ConversationId, ProviderMessageId, TenantId},
    message::{ChannelInfo, KnowledgeChunk, QuotaBlock},
    ports::*,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A clock that moves only when told to.
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self { now: Mutex::new(now) }
    }
    pub fn set(&self, now: DateTime<Utc>) {
        *lock(&self.now) = now;
    }
    pub fn advance(&self, by: Duration) {
        let mut now = lock(&self.now);
        *now += chrono::Duration::from_std(by).unwrap_or_default();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *lock(&self.now)
    }
}

/// A failure switch shared by the in-memory ports.
#[derive(Default)]
pub struct FailureSwitch(AtomicBool);

impl FailureSwitch {
    fn check(&self, service: &'static str) -> Result<(), PortError> {
        if self.0.load(Ordering::SeqCst) {
            Err(PortError::unavailable(service, "connection refused (test)"))
        } else {
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Key-value store with TTLs measured on the given clock.
pub struct MemoryKv {
    clock: Arc<dyn Clock>,
    data: Mutex<HashMap<String, (String, DateTime<Utc>)>>,
    failing: FailureSwitch,
}

impl MemoryKv {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock, data: Mutex::new(HashMap::new()), failing: FailureSwitch::default() }
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.0.store(failing, Ordering::SeqCst);
    }

    /// The value of an unexpired key.
    pub fn get(&self, key: &str) -> Option<String> {
        let now = self.clock.now();
        lock(&self.data).get(key).filter(|(_, exp)| *exp > now).map(|(v, _)| v.clone())
    }

    /// The remaining time to live of an unexpired key.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        let now = self.clock.now();
        lock(&self.data).get(key).filter(|(_, exp)| *exp > now).and_then(|(_, exp)| (*exp - now).to_std().ok())
    }

    /// Every unexpired key.
    pub fn keys(&self) -> Vec<String> {
        let now = self.clock.now();
        let mut keys: Vec<String> =
            lock(&self.data).iter().filter(|(_, (_, exp))| *exp > now).map(|(k, _)| k.clone()).collect();
        keys.sort();
        keys
    }

    fn expiry(&self, ttl: Duration) -> DateTime<Utc> {
        self.clock.now() + chrono::Duration::from_std(ttl).unwrap_or_default()
    }
}

#[async_trait]
impl KeyValueStore for MemoryKv {
    async fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<Claim, PortError> {
        self.failing.check("redis")?;
        let now = self.clock.now();
        let mut data = lock(&self.data);
        match data.get(key) {
            Some((held, exp)) if *exp > now => Ok(Claim::HeldBy(held.clone())),
            _ => {
                data.insert(key.to_owned(), (value.to_owned(), self.expiry(ttl)));
                Ok(Claim::Acquired)
            }
        }
    }

    async fn hit_windows(&self, keys: &[WindowKey], once: Option<&HitOnce>) -> Result<Vec<WindowCount>, PortError> {
        self.failing.check("redis")?;
        let now = self.clock.now();
        let mut data = lock(&self.data);
        let counting = match once {
            Some(once) => match data.get(&once.key) {
                Some((_, exp)) if *exp > now => false,
                _ => {
                    data.insert(once.key.clone(), ("1".into(), self.expiry(once.ttl)));
                    true
                }
            },
            None => true,
        };
        let mut counts = Vec::with_capacity(keys.len());
        for w in keys {
            if !counting {
                let (count, exp) = match data.get(&w.key) {
                    Some((v, exp)) if *exp > now => (v.parse::<u64>().unwrap_or(0), *exp),
                    _ => (0, self.expiry(w.window)),
                };
                counts.push(WindowCount { count, resets_in: (exp - now).to_std().unwrap_or_default() });
                continue;
            }
            let entry = match data.get(&w.key) {
                Some((v, exp)) if *exp > now => (v.parse::<u64>().unwrap_or(0) + 1, *exp),
                _ => (1, self.expiry(w.window)),
            };
            data.insert(w.key.clone(), (entry.0.to_string(), entry.1));
            counts.push(WindowCount { count: entry.0, resets_in: (entry.1 - now).to_std().unwrap_or_default() });
        }
        Ok(counts)
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct StoreState {
    usage: HashMap<(TenantId, String), u64>,
    granted: HashMap<ProviderMessageId, u64>,
    blocks: HashMap<ConversationId, QuotaBlock>,
    history: HashMap<ConversationId, Vec<HistoryMessage>>,
    knowledge: Vec<(TenantId, Vec<f32>, KnowledgeChunk)>,
    outbound: Vec<(NewOutbound, OutboundRecord, Option<String>)>,
}

/// Relational store: quotas, conversation blocks, history, knowledge and outbound rows.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<StoreState>,
    failing: FailureSwitch,
    quota_calls: AtomicUsize,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.0.store(failing, Ordering::SeqCst);
    }

    /// How many times the quota was consulted.
    pub fn quota_calls(&self) -> usize {
        self.quota_calls.load(Ordering::SeqCst)
    }

    pub fn set_usage(&self, tenant: &TenantId, period: &str, used: u64) {
        lock(&self.state).usage.insert((tenant.clone(), period.to_owned()), used);
    }

    pub fn usage(&self, tenant: &TenantId, period: &str) -> u64 {
        lock(&self.state).usage.get(&(tenant.clone(), period.to_owned())).copied().unwrap_or(0)
    }

    pub fn quota_block(&self, conversation: &ConversationId) -> Option<QuotaBlock> {
        lock(&self.state).blocks.get(conversation).cloned()
    }

    pub fn push_history(&self, conversation: &ConversationId, message: HistoryMessage) {
        lock(&self.state).history.entry(conversation.clone()).or_default().push(message);
    }

    pub fn add_knowledge(&self, tenant: &TenantId, chunk: KnowledgeChunk) {
        let embedding = hash_embedding(&chunk.text, crate::embedding::DEFAULT_DIMENSIONS);
        lock(&self.state).knowledge.push((tenant.clone(), embedding, chunk));
    }

    /// Every outbound row, in the order they were recorded.
    pub fn outbound(&self) -> Vec<OutboundRecord> {
        lock(&self.state).outbound.iter().map(|(_, r, _)| r.clone()).collect()
    }

    /// The failure code recorded for an outbound row.
    pub fn outbound_failure(&self, id: &str) -> Option<String> {
        lock(&self.state).outbound.iter().find(|(_, r, _)| r.id == id).and_then(|(_, _, c)| c.clone())
    }
}

#[async_trait]
impl RelationalStore for MemoryStore {
    async fn consume_monthly_quota(
        &self,
        tenant: &TenantId,
        period: &str,
        limit: u64,
        message: &ProviderMessageId,
    ) -> Result<QuotaDecision, PortError> {
        self.quota_calls.fetch_add(1, Ordering::SeqCst);
        self.failing.check("postgres")?;
        let mut state = lock(&self.state);
        if let Some(used) = state.granted.get(message) {
            return Ok(QuotaDecision::Granted { used: *used });
        }
        let used = state.usage.entry((tenant.clone(), period.to_owned())).or_insert(0);
        if *used >= limit {
            return Ok(QuotaDecision::Refused { used: *used });
        }
        *used += 1;
        let used = *used;
        state.granted.insert(message.clone(), used);
        Ok(QuotaDecision::Granted { used })
    }

    async fn block_conversation_quota(
        &self,
        conversation: &ConversationId,
        block: &QuotaBlock,
    ) -> Result<(), PortError> {
        self.failing.check("postgres")?;
        lock(&self.state).blocks.insert(conversation.clone(), block.clone());
        Ok(())
    }

    async fn recent_messages(
        &self,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, PortError> {
        self.failing.check("postgres")?;
        let state = lock(&self.state);
        let all = state.history.get(conversation).cloned().unwrap_or_default();
        Ok(all[all.len().saturating_sub(limit)..].to_vec())
    }

    async fn search_knowledge(
        &self,
        tenant: &TenantId,
        embedding: &[f32],
        top_k: usize,
        min_score: f32,
    ) -> Result<Vec<KnowledgeChunk>, PortError> {
        self.failing.check("postgres")?;
        let state = lock(&self.state);
        let mut hits: Vec<KnowledgeChunk> = state
            .knowledge
            .iter()
            .filter(|(t, _, _)| t == tenant)
            .map(|(_, e, c)| KnowledgeChunk { score: cosine(embedding, e), ..c.clone() })
            .filter(|c| c.score >= min_score)
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(top_k);
        Ok(hits)
    }

    async fn begin_outbound(&self, outbound: &NewOutbound) -> Result<OutboundRecord, PortError> {
        self.failing.check("postgres")?;
        let mut state = lock(&self.state);
        if let Some((_, existing, _)) = state
            .outbound
            .iter()
            .find(|(o, _, _)| o.channel == outbound.channel && o.in_reply_to == outbound.in_reply_to)
        {
            return Ok(existing.clone());
        }
        let record = OutboundRecord {
            id: format!("out-{}", state.outbound.len() + 1),
            status: OutboundStatus::Pending,
            provider_message_id: None,
            text: outbound.text.clone(),
        };
        state.outbound.push((outbound.clone(), record.clone(), None));
        // As in PostgreSQL, a recorded answer is part of the conversation's history.
        state.history.entry(outbound.conversation.clone()).or_default().push(HistoryMessage {
            role: ChatRole::Assistant,
            text: outbound.text.clone(),
            provider_message_id: None,
            in_reply_to: Some(outbound.in_reply_to.clone()),
        });
        Ok(record)
    }

    async fn mark_outbound_sent(
        &self,
        outbound_id: &str,
        provider_message_id: &ProviderMessageId,
    ) -> Result<(), PortError> {
        self.failing.check("postgres")?;
        let mut state = lock(&self.state);
        if let Some((_, r, _)) = state.outbound.iter_mut().find(|(_, r, _)| r.id == outbound_id) {
            r.status = OutboundStatus::Sent;
            r.provider_message_id = Some(provider_message_id.clone());
        }
        Ok(())
    }

    async fn mark_outbound_failed(
        &self,
        outbound_id: &str,
        code: Option<&str>,
        _reason: &str,
    ) -> Result<(), PortError> {
        self.failing.check("postgres")?;
        let mut state = lock(&self.state);
        let mut failed = None;
        if let Some((o, r, c)) = state.outbound.iter_mut().find(|(_, r, _)| r.id == outbound_id) {
            r.status = OutboundStatus::Failed;
            *c = code.map(str::to_owned);
            failed = Some((o.conversation.clone(), o.in_reply_to.clone()));
        }
        // As in PostgreSQL, an answer that never reached the user is not history.
        if let Some((conversation, in_reply_to)) = failed
            && let Some(history) = state.history.get_mut(&conversation)
        {
            history.retain(|m| m.role != ChatRole::Assistant || m.in_reply_to.as_ref() != Some(&in_reply_to));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// An LLM that answers with a fixed text (or echoes the question), recording every request.
#[derive(Default)]
pub struct MemoryLlm {
    answer: Mutex<Option<String>>,
    requests: Mutex<Vec<LlmRequest>>,
    delay: Mutex<Option<Duration>>,
    failing: FailureSwitch,
}

impl MemoryLlm {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_failing(&self, failing: bool) {
        self.failing.0.store(failing, Ordering::SeqCst);
    }
    pub fn answer_with(&self, text: impl Into<String>) {
        *lock(&self.answer) = Some(text.into());
    }
    /// Every answer takes this long.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.delay) = Some(delay);
    }
    pub fn requests(&self) -> Vec<LlmRequest> {
        lock(&self.requests).clone()
    }
}

#[async_trait]
impl Llm for MemoryLlm {
    async fn complete(&self, request: &LlmRequest) -> Result<LlmResponse, PortError> {
        lock(&self.requests).push(request.clone());
        let delay = *lock(&self.delay);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        self.failing.check("llm")?;
        let question = request.messages.iter().rev().find(|m| m.role == ChatRole::User).map(|m| m.content.clone());
        let text =
            lock(&self.answer).clone().unwrap_or_else(|| format!("Réponse à : {}", question.unwrap_or_default()));
        Ok(LlmResponse {
            text,
            model: request.model.clone().unwrap_or_else(|| "memory".into()),
            prompt_tokens: Some(request.messages.iter().map(|m| m.content.split_whitespace().count() as u32).sum()),
            completion_tokens: Some(5),
        })
    }
}

/// The `hash` embedder with a failure switch and a call counter.
#[derive(Default)]
pub struct MemoryEmbedder {
    calls: AtomicUsize,
    failing: FailureSwitch,
}

impl MemoryEmbedder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_failing(&self, failing: bool) {
        self.failing.0.store(failing, Ordering::SeqCst);
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Embedder for MemoryEmbedder {
    fn dimensions(&self) -> usize {
        crate::embedding::DEFAULT_DIMENSIONS
    }
    async fn embed(&self, texts: &[String], _purpose: EmbedPurpose) -> Result<Vec<Vec<f32>>, PortError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.failing.check("embeddings")?;
        Ok(texts.iter().map(|t| hash_embedding(t, self.dimensions())).collect())
    }
}

/// How the in-memory sender fails, when it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendFailure {
    Unavailable,
    Permanent { code: String },
}

/// One call to [`OutboundSender::mark_read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    pub channel: ChannelInfo,
    pub message_id: ProviderMessageId,
    pub typing: bool,
}

/// A WhatsApp sender that records what it sends and the messages it marks read.
#[derive(Default)]
pub struct MemorySender {
    sent: Mutex<Vec<(OutboundText, ProviderMessageId)>>,
    failure: Mutex<Option<SendFailure>>,
    attempts: AtomicUsize,
    read_marks: Mutex<Vec<ReadMark>>,
    // Apart from `failure`: a test of the read receipt must be able to fail it while sends succeed.
    read_failure: Mutex<Option<SendFailure>>,
}

impl MemorySender {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn fail_with(&self, failure: Option<SendFailure>) {
        *lock(&self.failure) = failure;
    }
    pub fn set_failing(&self, failing: bool) {
        self.fail_with(failing.then_some(SendFailure::Unavailable));
    }
    /// Every message the provider accepted, in order.
    pub fn sent(&self) -> Vec<OutboundText> {
        lock(&self.sent).iter().map(|(m, _)| m.clone()).collect()
    }
    pub fn sent_texts(&self) -> Vec<String> {
        lock(&self.sent).iter().map(|(m, _)| m.text.clone()).collect()
    }
    /// Calls, accepted or not.
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }
    /// Makes `mark_read` fail (or succeed again with `None`); sends are not affected.
    pub fn fail_read_marks_with(&self, failure: Option<SendFailure>) {
        *lock(&self.read_failure) = failure;
    }
    /// Every message the provider accepted to mark read, in order.
    pub fn read_marks(&self) -> Vec<ReadMark> {
        lock(&self.read_marks).clone()
    }
}

#[async_trait]
impl OutboundSender for MemorySender {
    async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match lock(&self.failure).clone() {
            Some(SendFailure::Unavailable) => return Err(PortError::unavailable("whatsapp", "HTTP 503 (test)")),
            Some(SendFailure::Permanent { code }) => {
                return Err(PortError::permanent("whatsapp", Some(code), "recipient cannot be reached (test)"));
            }
            None => {}
        }
        let mut sent = lock(&self.sent);
        let id = ProviderMessageId::new(format!("wamid.out.{}", sent.len() + 1));
        sent.push((message.clone(), id.clone()));
        Ok(id)
    }

    async fn mark_read(
        &self,
        channel: &ChannelInfo,
        message_id: &ProviderMessageId,
        typing: bool,
    ) -> Result<(), PortError> {
        match lock(&self.read_failure).clone() {
            Some(SendFailure::Unavailable) => return Err(PortError::unavailable("whatsapp", "HTTP 503 (test)")),
            Some(SendFailure::Permanent { code }) => {
                return Err(PortError::permanent("whatsapp", Some(code), "message cannot be marked read (test)"));
            }
            None => {}
        }
        lock(&self.read_marks).push(ReadMark { channel: channel.clone(), message_id: message_id.clone(), typing });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ChannelId, PhoneNumber};

    fn channel() -> ChannelInfo {
        ChannelInfo { id: ChannelId::new("channel-1"), provider: "meta".into(), phone_number_id: "PNID".into() }
    }

    /// A sender written before read receipts existed: it only sends.
    struct SendOnly;

    #[async_trait]
    impl OutboundSender for SendOnly {
        async fn send_text(&self, _message: &OutboundText) -> Result<ProviderMessageId, PortError> {
            Ok(ProviderMessageId::new("wamid.out"))
        }
    }

    #[tokio::test]
    async fn a_sender_without_read_receipts_accepts_mark_read_and_does_nothing() {
        let sender: Arc<dyn OutboundSender> = Arc::new(SendOnly);

        let marked = sender.mark_read(&channel(), &ProviderMessageId::new("wamid.in"), true).await;

        assert_eq!(marked, Ok(()));
    }

    #[tokio::test]
    async fn memory_sender_records_read_marks_and_fails_them_apart_from_sends() {
        let sender = MemorySender::new();
        let wamid = ProviderMessageId::new("wamid.in.1");

        sender.mark_read(&channel(), &wamid, true).await.unwrap();
        sender.fail_read_marks_with(Some(SendFailure::Unavailable));
        let refused = sender.mark_read(&channel(), &wamid, false).await;
        let sent = sender
            .send_text(&OutboundText {
                channel: channel(),
                to: PhoneNumber::new("33612345678"),
                text: "ok".into(),
                reply_to: None,
            })
            .await;

        assert_eq!(sender.read_marks(), [ReadMark { channel: channel(), message_id: wamid, typing: true }]);
        assert!(refused.is_err_and(|e| e.is_retryable()));
        assert!(sent.is_ok(), "a failing read receipt must not fail sends");
    }
}
