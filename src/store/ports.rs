//! [`PgStore`] as the engine's relational-store port: each method delegates to the store's query
//! and turns its error into a [`PortError`].

use engine::{
    ids::{ConversationId, ProviderMessageId, TenantId},
    message::{KnowledgeChunk, QuotaBlock},
    ports::{HistoryMessage, NewOutbound, OutboundRecord, PortError, QuotaDecision, RelationalStore},
};

use super::PgStore;

#[async_trait::async_trait]
impl RelationalStore for PgStore {
    async fn consume_monthly_quota(
        &self,
        tenant: &TenantId,
        period: &str,
        limit: u64,
        message: &ProviderMessageId,
    ) -> Result<QuotaDecision, PortError> {
        Ok(self.consume_quota(tenant, period, limit, message).await?)
    }

    async fn block_conversation_quota(
        &self,
        conversation: &ConversationId,
        block: &QuotaBlock,
    ) -> Result<(), PortError> {
        Ok(self.block_conversation(conversation, block).await?)
    }

    async fn recent_messages(
        &self,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, PortError> {
        Ok(self.history(conversation, limit).await?)
    }

    async fn search_knowledge(
        &self,
        tenant: &TenantId,
        embedding: &[f32],
        top_k: usize,
        min_score: f32,
    ) -> Result<Vec<KnowledgeChunk>, PortError> {
        Ok(self.search_chunks(tenant, embedding, top_k, min_score).await?)
    }

    async fn begin_outbound(&self, outbound: &NewOutbound) -> Result<OutboundRecord, PortError> {
        Ok(self.begin_outbound_row(outbound).await?)
    }

    async fn mark_outbound_sent(
        &self,
        outbound_id: &str,
        provider_message_id: &ProviderMessageId,
    ) -> Result<(), PortError> {
        Ok(self.mark_sent(outbound_id, provider_message_id).await?)
    }

    async fn mark_outbound_failed(&self, outbound_id: &str, code: Option<&str>, reason: &str) -> Result<(), PortError> {
        Ok(self.mark_failed(outbound_id, code, reason).await?)
    }
}
