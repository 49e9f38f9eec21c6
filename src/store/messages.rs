//! Conversations and messages: recording an inbound message (idempotent per channel and wamid),
//! the conversation's history, the outbound answer written before it is sent, and the delivery
//! statuses that update it.

use chrono::{DateTime, Utc};
use engine::{
    ids::{ConversationId, PhoneNumber, ProviderMessageId},
    masking::mask_phones_in,
    message::{ConversationInfo, QuotaBlock},
    ports::{ChatRole, HistoryMessage, NewOutbound, OutboundRecord, OutboundStatus},
};
use uuid::Uuid;

use super::{ChannelContext, PgStore, StoreError, parse_id, to_u64};

/// An inbound message as the worker records it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInbound {
    /// The provider's id of the message (`wamid.…`).
    pub provider_message_id: String,
    pub from: PhoneNumber,
    pub contact_name: Option<String>,
    pub message_type: String,
    pub text: Option<String>,
    /// The provider's timestamp of the message.
    pub sent_at: DateTime<Utc>,
    /// The job recording it: a retry of the same job has the same id, another delivery of the same
    /// message has another.
    pub job_id: String,
}

/// What recording an inbound message found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundOutcome {
    /// First time this message is seen.
    New,
    /// This job recorded it on an earlier attempt: carry on with the job.
    RetryOfSameJob,
    /// Another job recorded it first: this delivery is a duplicate.
    Duplicate { first_job_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedInbound {
    pub conversation: ConversationInfo,
    pub outcome: InboundOutcome,
}

/// The answer recorded for an inbound message.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboundView {
    pub text: String,
    /// `pending`, `sent`, `delivered`, `read` or `failed`.
    pub status: String,
    pub provider_message_id: Option<String>,
    pub error_code: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RecordRow {
    conversation_id: Uuid,
    quota_blocked_period: Option<String>,
    quota_blocked_limit: Option<i64>,
    inserted: bool,
    existing_job_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct OutboundRow {
    id: Uuid,
    status: String,
    provider_message_id: Option<String>,
    body: Option<String>,
}

impl OutboundRow {
    fn into_record(self) -> OutboundRecord {
        OutboundRecord {
            id: self.id.to_string(),
            status: match self.status.as_str() {
                "pending" => OutboundStatus::Pending,
                "failed" => OutboundStatus::Failed,
                // sent, delivered, read: the provider has it.
                _ => OutboundStatus::Sent,
            },
            provider_message_id: self.provider_message_id.map(ProviderMessageId::new),
            text: self.body.unwrap_or_default(),
        }
    }
}

/// Outbound statuses in the order they may follow each other; `failed` is apart (terminal).
const STATUS_ORDER: [&str; 4] = ["pending", "sent", "delivered", "read"];

impl PgStore {
    /// Upserts the conversation and inserts the inbound message in one statement, and says whether
    /// the message is new, a retry of the job that recorded it, or a duplicate delivery.
    pub async fn record_inbound(
        &self,
        ctx: &ChannelContext,
        inbound: &NewInbound,
    ) -> Result<RecordedInbound, StoreError> {
        let tenant = parse_id("tenant", ctx.tenant.id.as_str())?;
        let channel = parse_id("channel", ctx.channel.id.as_str())?;
        // `existing_job_id` reads the snapshot taken when the statement started: it cannot see the
        // row `ins` writes, which is how "inserted" and "already there" are told apart.
        let mut conn = self.hot().await?;
        let row: RecordRow = sqlx::query_as(
            "WITH conv AS (
                 INSERT INTO conversations (tenant_id, channel_id, wa_id, contact_name, last_inbound_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (channel_id, wa_id) DO UPDATE SET
                     contact_name = COALESCE(EXCLUDED.contact_name, conversations.contact_name),
                     last_inbound_at = GREATEST(conversations.last_inbound_at, EXCLUDED.last_inbound_at),
                     updated_at = now()
                 RETURNING id, quota_blocked_period, quota_blocked_limit
             ), ins AS (
                 INSERT INTO messages (tenant_id, channel_id, conversation_id, direction, provider_message_id,
                                       job_id, message_type, body, status, sent_at)
                 SELECT $1, $2, conv.id, 'inbound', $6, $7, $8, $9, 'received', $5 FROM conv
                 ON CONFLICT (channel_id, provider_message_id) DO NOTHING
                 RETURNING id
             )
             SELECT conv.id AS conversation_id, conv.quota_blocked_period, conv.quota_blocked_limit,
                    EXISTS (SELECT 1 FROM ins) AS inserted,
                    (SELECT COALESCE(m.job_id, '') FROM messages m
                     WHERE m.channel_id = $2 AND m.provider_message_id = $6) AS existing_job_id
             FROM conv",
        )
        .bind(tenant)
        .bind(channel)
        .bind(inbound.from.expose())
        .bind(&inbound.contact_name)
        .bind(inbound.sent_at)
        .bind(&inbound.provider_message_id)
        .bind(&inbound.job_id)
        .bind(&inbound.message_type)
        .bind(&inbound.text)
        .fetch_one(&mut *conn)
        .await?;
        conn.keep();

        let first_job_id = match (row.inserted, row.existing_job_id) {
            (true, _) => None,
            (false, Some(job)) => Some(job),
            // Another delivery inserted it after this statement's snapshot was taken: the conflict
            // waited for it to commit, so a fresh read sees it.
            (false, None) => Some(
                sqlx::query_scalar::<_, String>(
                    "SELECT COALESCE(job_id, '') FROM messages WHERE channel_id = $1 AND provider_message_id = $2",
                )
                .bind(channel)
                .bind(&inbound.provider_message_id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StoreError::Other("the conflicting inbound message vanished".into()))?,
            ),
        };
        let outcome = match first_job_id {
            None => InboundOutcome::New,
            Some(job) if job == inbound.job_id => InboundOutcome::RetryOfSameJob,
            Some(first_job_id) => InboundOutcome::Duplicate { first_job_id },
        };
        let quota_block = match (row.quota_blocked_period, row.quota_blocked_limit) {
            (Some(period), Some(limit)) => Some(QuotaBlock { period, limit: to_u64(limit) }),
            _ => None,
        };
        Ok(RecordedInbound {
            conversation: ConversationInfo { id: ConversationId::new(row.conversation_id.to_string()), quota_block },
            outcome,
        })
    }

    /// Applies a delivery status to the outbound message the provider knows as
    /// `provider_message_id`, monotonically: `sent` < `delivered` < `read`, and `failed` (with its
    /// code) only over a message not yet delivered; nothing changes a failed message. Returns
    /// whether the row changed; an unknown message or status changes nothing.
    pub async fn apply_status(
        &self,
        phone_number_id: &str,
        provider_message_id: &str,
        status: &str,
        error_code: Option<&str>,
        error_title: Option<&str>,
    ) -> Result<bool, StoreError> {
        if status != "failed" && !STATUS_ORDER[1..].contains(&status) {
            return Ok(false);
        }
        let error_title = error_title.map(mask_phones_in);
        let result = sqlx::query(
            "UPDATE messages m SET
                 status = $3,
                 error_code = CASE WHEN $3 = 'failed' THEN $4 ELSE m.error_code END,
                 error_reason = CASE WHEN $3 = 'failed' THEN $5 ELSE m.error_reason END,
                 sent_at = CASE WHEN $3 = 'failed' THEN m.sent_at ELSE COALESCE(m.sent_at, now()) END,
                 delivered_at = CASE WHEN $3 IN ('delivered', 'read') THEN COALESCE(m.delivered_at, now())
                                     ELSE m.delivered_at END,
                 read_at = CASE WHEN $3 = 'read' THEN now() ELSE m.read_at END,
                 updated_at = now()
             FROM channels c
             WHERE c.phone_number_id = $1 AND m.channel_id = c.id AND m.provider_message_id = $2
               AND m.direction = 'outbound'
               AND CASE WHEN $3 = 'failed' THEN m.status IN ('pending', 'sent')
                        ELSE array_position($6::text[], m.status) < array_position($6::text[], $3) END",
        )
        .bind(phone_number_id)
        .bind(provider_message_id)
        .bind(status)
        .bind(error_code)
        .bind(error_title)
        .bind(&STATUS_ORDER[..])
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// The answer recorded for the inbound message `inbound_provider_message_id` on the channel
    /// of `phone_number_id`, if any.
    pub async fn outbound_reply_to(
        &self,
        phone_number_id: &str,
        inbound_provider_message_id: &str,
    ) -> Result<Option<OutboundView>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(m.body, '') AS text, m.status, m.provider_message_id, m.error_code
             FROM messages m JOIN channels c ON c.id = m.channel_id
             WHERE c.phone_number_id = $1 AND m.in_reply_to = $2 AND m.direction = 'outbound'",
        )
        .bind(phone_number_id)
        .bind(inbound_provider_message_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The last `limit` messages of the conversation, oldest first. Answers that never reached
    /// the user (failed) are left out: the model must not believe it said them.
    pub(super) async fn history(
        &self,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, StoreError> {
        let conversation = parse_id("conversation", conversation.as_str())?;
        type Row = (String, Option<String>, Option<String>, Option<String>);
        let mut conn = self.hot().await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT direction, body, provider_message_id, in_reply_to FROM messages
             WHERE conversation_id = $1 AND NOT (direction = 'outbound' AND status = 'failed')
             ORDER BY created_at DESC, id DESC
             LIMIT $2",
        )
        .bind(conversation)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
        conn.keep();
        Ok(rows
            .into_iter()
            .rev()
            .map(|(direction, body, provider_message_id, in_reply_to)| HistoryMessage {
                role: if direction == "inbound" { ChatRole::User } else { ChatRole::Assistant },
                text: body.unwrap_or_default(),
                provider_message_id: provider_message_id.map(ProviderMessageId::new),
                in_reply_to: in_reply_to.map(ProviderMessageId::new),
            })
            .collect())
    }

    /// Inserts the pending answer to an inbound message, or returns the one already recorded.
    pub(super) async fn begin_outbound_row(&self, outbound: &NewOutbound) -> Result<OutboundRecord, StoreError> {
        let tenant = parse_id("tenant", outbound.tenant.as_str())?;
        let channel = parse_id("channel", outbound.channel.as_str())?;
        let conversation = parse_id("conversation", outbound.conversation.as_str())?;
        // As in `record_inbound`, the second branch reads the snapshot from before the insert.
        let mut conn = self.hot().await?;
        let row: Option<OutboundRow> = sqlx::query_as(
            "WITH ins AS (
                 INSERT INTO messages (tenant_id, channel_id, conversation_id, direction, in_reply_to,
                                       message_type, body, status)
                 VALUES ($1, $2, $3, 'outbound', $4, 'text', $5, 'pending')
                 ON CONFLICT (channel_id, in_reply_to) WHERE direction = 'outbound' DO NOTHING
                 RETURNING id, status, provider_message_id, body
             )
             SELECT id, status, provider_message_id, body FROM ins
             UNION ALL
             SELECT id, status, provider_message_id, body FROM messages
             WHERE channel_id = $2 AND in_reply_to = $4 AND direction = 'outbound'
             LIMIT 1",
        )
        .bind(tenant)
        .bind(channel)
        .bind(conversation)
        .bind(outbound.in_reply_to.as_str())
        .bind(&outbound.text)
        .fetch_optional(&mut *conn)
        .await?;
        conn.keep();
        let row = match row {
            Some(row) => row,
            // Recorded by a concurrent run after this statement's snapshot.
            None => sqlx::query_as(
                "SELECT id, status, provider_message_id, body FROM messages
                 WHERE channel_id = $1 AND in_reply_to = $2 AND direction = 'outbound'",
            )
            .bind(channel)
            .bind(outbound.in_reply_to.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::Other("the conflicting outbound message vanished".into()))?,
        };
        Ok(row.into_record())
    }

    /// The provider accepted the answer. A failed row sent again becomes sent; a row a status
    /// already moved further (delivered, read) keeps its status.
    pub(super) async fn mark_sent(
        &self,
        outbound_id: &str,
        provider_message_id: &ProviderMessageId,
    ) -> Result<(), StoreError> {
        let id = parse_id("outbound message", outbound_id)?;
        let mut conn = self.hot().await?;
        sqlx::query(
            "UPDATE messages SET
                 provider_message_id = $2,
                 status = CASE WHEN status IN ('pending', 'failed') THEN 'sent' ELSE status END,
                 error_code = CASE WHEN status = 'failed' THEN NULL ELSE error_code END,
                 error_reason = CASE WHEN status = 'failed' THEN NULL ELSE error_reason END,
                 sent_at = COALESCE(sent_at, now()),
                 updated_at = now()
             WHERE id = $1 AND direction = 'outbound'",
        )
        .bind(id)
        .bind(provider_message_id.as_str())
        .execute(&mut *conn)
        .await?;
        conn.keep();
        Ok(())
    }

    /// The provider refused the answer for good. A row already sent stays sent.
    pub(super) async fn mark_failed(
        &self,
        outbound_id: &str,
        code: Option<&str>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let id = parse_id("outbound message", outbound_id)?;
        sqlx::query(
            "UPDATE messages SET status = 'failed', error_code = $2, error_reason = $3, updated_at = now()
             WHERE id = $1 AND direction = 'outbound' AND status IN ('pending', 'failed')",
        )
        .bind(id)
        .bind(code)
        .bind(mask_phones_in(reason))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use engine::ports::RelationalStore;

    use super::*;
    use crate::store::{SeedTenant, testing::TestDatabase};

    const PNID: &str = "PNID-MSG";
    const PHONE: &str = "33612345678";

    async fn setup() -> (TestDatabase, PgStore, ChannelContext) {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store
            .seed_tenant(&SeedTenant {
                name: "Messages".into(),
                phone_number_id: PNID.into(),
                plan: None,
                monthly_messages: None,
                provider: "sandbox".into(),
            })
            .await
            .unwrap();
        let ctx = store.resolve_channel(PNID).await.unwrap().unwrap();
        (db, store, ctx)
    }

    fn inbound(wamid: &str, job: &str, text: &str) -> NewInbound {
        NewInbound {
            provider_message_id: wamid.into(),
            from: PhoneNumber::new(PHONE),
            contact_name: Some("Jean".into()),
            message_type: "text".into(),
            text: Some(text.into()),
            sent_at: Utc::now(),
            job_id: job.into(),
        }
    }

    async fn count(db: &TestDatabase, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
    }

    #[tokio::test]
    async fn first_delivery_is_new_a_retry_of_its_job_is_recognised_and_another_job_is_a_duplicate() {
        let (db, store, ctx) = setup().await;

        let first = store.record_inbound(&ctx, &inbound("wamid.A", "stream:0:1-0", "Bonjour")).await.unwrap();
        assert_eq!(first.outcome, InboundOutcome::New);
        assert_eq!(first.conversation.quota_block, None);

        let retry = store.record_inbound(&ctx, &inbound("wamid.A", "stream:0:1-0", "Bonjour")).await.unwrap();
        assert_eq!(retry.outcome, InboundOutcome::RetryOfSameJob);
        assert_eq!(retry.conversation.id, first.conversation.id);

        let dup = store.record_inbound(&ctx, &inbound("wamid.A", "stream:0:2-0", "Bonjour")).await.unwrap();
        assert_eq!(dup.outcome, InboundOutcome::Duplicate { first_job_id: "stream:0:1-0".into() });

        let next = store.record_inbound(&ctx, &inbound("wamid.B", "stream:0:3-0", "Encore")).await.unwrap();
        assert_eq!(next.outcome, InboundOutcome::New);
        assert_eq!(next.conversation.id, first.conversation.id, "same user, same conversation");

        assert_eq!(count(&db, "SELECT count(*) FROM messages WHERE provider_message_id = 'wamid.A'").await, 1);
        assert_eq!(count(&db, "SELECT count(*) FROM conversations").await, 1);
        let (wa_id, name): (String, Option<String>) =
            sqlx::query_as("SELECT wa_id, contact_name FROM conversations").fetch_one(&db.pool).await.unwrap();
        assert_eq!(wa_id, PHONE, "the number is kept to reply");
        assert_eq!(name.as_deref(), Some("Jean"));
        db.drop_database().await;
    }

    #[tokio::test]
    async fn two_concurrent_deliveries_of_one_message_make_one_row_one_new_and_one_duplicate() {
        let (db, store, ctx) = setup().await;
        for round in 0..10 {
            let wamid = format!("wamid.race.{round}");
            let a = inbound(&wamid, "job-a", "Bonjour");
            let b = inbound(&wamid, "job-b", "Bonjour");
            let (ra, rb) = tokio::join!(store.record_inbound(&ctx, &a), store.record_inbound(&ctx, &b));
            let mut outcomes = [ra.unwrap().outcome, rb.unwrap().outcome];
            outcomes.sort_by_key(|o| matches!(o, InboundOutcome::Duplicate { .. }));
            assert_eq!(outcomes[0], InboundOutcome::New, "round {round}: {outcomes:?}");
            let InboundOutcome::Duplicate { first_job_id } = &outcomes[1] else {
                panic!("round {round}: expected a duplicate, got {outcomes:?}")
            };
            let stored: String = sqlx::query_scalar("SELECT job_id FROM messages WHERE provider_message_id = $1")
                .bind(&wamid)
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(first_job_id, &stored, "the duplicate names the job that recorded the row");
        }
        assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 10);
        assert_eq!(count(&db, "SELECT count(*) FROM conversations").await, 1);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn last_inbound_time_never_moves_back() {
        let (db, store, ctx) = setup().await;
        let late = Utc::now();
        let early = late - chrono::Duration::hours(3);
        store.record_inbound(&ctx, &NewInbound { sent_at: late, ..inbound("wamid.1", "j1", "a") }).await.unwrap();
        store.record_inbound(&ctx, &NewInbound { sent_at: early, ..inbound("wamid.2", "j2", "b") }).await.unwrap();
        let last: DateTime<Utc> =
            sqlx::query_scalar("SELECT last_inbound_at FROM conversations").fetch_one(&db.pool).await.unwrap();
        assert_eq!(last.timestamp(), late.timestamp());
        db.drop_database().await;
    }

    #[tokio::test]
    async fn quota_block_set_on_the_conversation_comes_back_with_the_next_message() {
        let (db, store, ctx) = setup().await;
        let first = store.record_inbound(&ctx, &inbound("wamid.1", "j1", "a")).await.unwrap();
        let block = QuotaBlock { period: "2026-11".into(), limit: 1000 };
        store.block_conversation_quota(&first.conversation.id, &block).await.unwrap();

        let next = store.record_inbound(&ctx, &inbound("wamid.2", "j2", "b")).await.unwrap();
        assert_eq!(next.conversation.quota_block, Some(block));
        db.drop_database().await;
    }

    fn outbound(ctx: &ChannelContext, conversation: &ConversationId, in_reply_to: &str, text: &str) -> NewOutbound {
        NewOutbound {
            tenant: ctx.tenant.id.clone(),
            channel: ctx.channel.id.clone(),
            conversation: conversation.clone(),
            in_reply_to: ProviderMessageId::new(in_reply_to),
            text: text.into(),
        }
    }

    #[tokio::test]
    async fn begin_outbound_records_one_answer_per_inbound_message() {
        let (db, store, ctx) = setup().await;
        let conv = store.record_inbound(&ctx, &inbound("wamid.in", "j1", "Bonjour")).await.unwrap().conversation.id;

        let first = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in", "Première réponse")).await.unwrap();
        assert_eq!(first.status, OutboundStatus::Pending);
        assert_eq!(first.text, "Première réponse");
        assert_eq!(first.provider_message_id, None);

        let again = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in", "Autre réponse")).await.unwrap();
        assert_eq!(again, first, "a retried job finds the recorded answer and its text");

        store.mark_outbound_sent(&first.id, &ProviderMessageId::new("wamid.out")).await.unwrap();
        let sent = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in", "x")).await.unwrap();
        assert_eq!(sent.status, OutboundStatus::Sent);
        assert_eq!(sent.provider_message_id, Some(ProviderMessageId::new("wamid.out")));

        let view = store.outbound_reply_to(PNID, "wamid.in").await.unwrap().expect("answer recorded");
        assert_eq!(view.text, "Première réponse");
        assert_eq!(view.status, "sent");
        assert_eq!(view.provider_message_id.as_deref(), Some("wamid.out"));
        assert_eq!(store.outbound_reply_to(PNID, "wamid.other").await.unwrap(), None);

        // Concurrent runs for the same inbound message agree on one row.
        for round in 0..10 {
            let wamid = format!("wamid.race.{round}");
            let a = outbound(&ctx, &conv, &wamid, "A");
            let b = outbound(&ctx, &conv, &wamid, "B");
            let (ra, rb) = tokio::join!(store.begin_outbound(&a), store.begin_outbound(&b));
            assert_eq!(ra.unwrap(), rb.unwrap(), "round {round}");
        }
        assert_eq!(count(&db, "SELECT count(*) FROM messages WHERE direction = 'outbound'").await, 11);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn a_permanent_failure_is_recorded_and_a_later_successful_send_clears_it() {
        let (db, store, ctx) = setup().await;
        let conv = store.record_inbound(&ctx, &inbound("wamid.in", "j1", "Bonjour")).await.unwrap().conversation.id;
        let row = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in", "Réponse")).await.unwrap();

        store.mark_outbound_failed(&row.id, Some("131026"), "undeliverable to +33612345678").await.unwrap();
        let failed = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in", "x")).await.unwrap();
        assert_eq!(failed.status, OutboundStatus::Failed);
        let (code, reason): (Option<String>, Option<String>) =
            sqlx::query_as("SELECT error_code, error_reason FROM messages WHERE direction = 'outbound'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(code.as_deref(), Some("131026"));
        assert!(!reason.unwrap_or_default().contains(PHONE), "the reason is stored masked");

        store.mark_outbound_sent(&row.id, &ProviderMessageId::new("wamid.out")).await.unwrap();
        let view = store.outbound_reply_to(PNID, "wamid.in").await.unwrap().unwrap();
        assert_eq!(view.status, "sent");
        assert_eq!(view.error_code, None);

        // A failure reported for a row already sent does not undo it.
        store.mark_outbound_failed(&row.id, Some("1"), "late").await.unwrap();
        assert_eq!(store.outbound_reply_to(PNID, "wamid.in").await.unwrap().unwrap().status, "sent");
        db.drop_database().await;
    }

    #[tokio::test]
    async fn statuses_move_forward_only_and_failed_is_terminal() {
        let (db, store, ctx) = setup().await;
        let conv = store.record_inbound(&ctx, &inbound("wamid.in", "j1", "Bonjour")).await.unwrap().conversation.id;
        let row = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in", "Réponse")).await.unwrap();
        store.mark_outbound_sent(&row.id, &ProviderMessageId::new("wamid.out")).await.unwrap();
        let status = || async { store.outbound_reply_to(PNID, "wamid.in").await.unwrap().unwrap() };

        assert!(!store.apply_status(PNID, "wamid.out", "sent", None, None).await.unwrap(), "already sent");
        assert!(store.apply_status(PNID, "wamid.out", "read", None, None).await.unwrap());
        assert!(!store.apply_status(PNID, "wamid.out", "delivered", None, None).await.unwrap(), "late delivered");
        assert_eq!(status().await.status, "read");
        assert!(!store.apply_status(PNID, "wamid.out", "failed", Some("131047"), None).await.unwrap());
        assert_eq!(status().await.status, "read", "a read message did not fail");

        // Another answer that fails: terminal, with its code.
        store.record_inbound(&ctx, &inbound("wamid.in2", "j2", "Encore")).await.unwrap();
        let row2 = store.begin_outbound(&outbound(&ctx, &conv, "wamid.in2", "Réponse 2")).await.unwrap();
        store.mark_outbound_sent(&row2.id, &ProviderMessageId::new("wamid.out2")).await.unwrap();
        assert!(
            store
                .apply_status(PNID, "wamid.out2", "failed", Some("131047"), Some("Re-engagement message"))
                .await
                .unwrap()
        );
        assert!(!store.apply_status(PNID, "wamid.out2", "delivered", None, None).await.unwrap());
        let view = store.outbound_reply_to(PNID, "wamid.in2").await.unwrap().unwrap();
        assert_eq!(view.status, "failed");
        assert_eq!(view.error_code.as_deref(), Some("131047"));

        assert!(!store.apply_status(PNID, "wamid.unknown", "read", None, None).await.unwrap());
        assert!(!store.apply_status("OTHER-PNID", "wamid.out", "read", None, None).await.unwrap());
        assert!(!store.apply_status(PNID, "wamid.out2", "deleted", None, None).await.unwrap());
        assert!(!store.apply_status(PNID, "wamid.in", "read", None, None).await.unwrap(), "inbound rows have none");
        db.drop_database().await;
    }

    #[tokio::test]
    async fn history_is_oldest_first_with_roles_and_without_failed_answers() {
        let (db, store, ctx) = setup().await;
        let conv = store.record_inbound(&ctx, &inbound("wamid.1", "j1", "Bonjour")).await.unwrap().conversation.id;
        let out = store.begin_outbound(&outbound(&ctx, &conv, "wamid.1", "Bonjour !")).await.unwrap();
        store.mark_outbound_sent(&out.id, &ProviderMessageId::new("wamid.o1")).await.unwrap();
        store.record_inbound(&ctx, &inbound("wamid.2", "j2", "Vos horaires ?")).await.unwrap();
        let lost = store.begin_outbound(&outbound(&ctx, &conv, "wamid.2", "Jamais reçu")).await.unwrap();
        store.mark_outbound_failed(&lost.id, Some("131026"), "undeliverable").await.unwrap();
        store.record_inbound(&ctx, &inbound("wamid.3", "j3", "Allô ?")).await.unwrap();

        let all = store.recent_messages(&conv, 10).await.unwrap();
        let texts: Vec<(ChatRole, &str)> = all.iter().map(|m| (m.role, m.text.as_str())).collect();
        assert_eq!(
            texts,
            [
                (ChatRole::User, "Bonjour"),
                (ChatRole::Assistant, "Bonjour !"),
                (ChatRole::User, "Vos horaires ?"),
                (ChatRole::User, "Allô ?")
            ]
        );
        assert_eq!(all[3].provider_message_id, Some(ProviderMessageId::new("wamid.3")));

        let last_two = store.recent_messages(&conv, 2).await.unwrap();
        assert_eq!(last_two.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["Vos horaires ?", "Allô ?"]);
        let other = store.recent_messages(&ConversationId::new(Uuid::new_v4().to_string()), 10).await.unwrap();
        assert!(other.is_empty());
        db.drop_database().await;
    }
}
