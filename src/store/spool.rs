//! The inbound spool: webhook events kept in PostgreSQL while Redis is down, claimed by workers
//! with a lease, one conversation at a time and in order.

use std::time::Duration;

use engine::masking::mask_phones_in;

use super::{PgStore, StoreError};
use crate::queue::QueuedEvent;

/// A claimed spool row. `attempts` counts this claim.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolRow {
    pub id: i64,
    pub event: QueuedEvent,
    pub attempts: i32,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    event: serde_json::Value,
    attempts: i32,
}

impl PgStore {
    /// Stores `events` in one statement, in order; returns their row ids in the same order.
    pub async fn spool_insert(&self, events: &[QueuedEvent], shards: u32) -> Result<Vec<i64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut json = Vec::with_capacity(events.len());
        let mut shard = Vec::with_capacity(events.len());
        let mut key = Vec::with_capacity(events.len());
        for event in events {
            json.push(
                serde_json::to_value(event)
                    .map_err(|e| StoreError::Invalid(format!("event cannot be serialised: {e}")))?,
            );
            shard.push(i32::try_from(event.shard(shards)).unwrap_or(i32::MAX));
            key.push(event.conversation_key());
        }
        // Ids come from the sequence in the order the rows are inserted, which ORDER BY fixes to
        // the input order: sorted, they line up with `events`.
        let mut ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO inbound_spool (event, shard, conversation_key)
             SELECT e, s, k FROM UNNEST($1::jsonb[], $2::int[], $3::text[]) WITH ORDINALITY AS t (e, s, k, n)
             ORDER BY n
             RETURNING id",
        )
        .bind(json)
        .bind(shard)
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Claims up to `limit` due rows for `lease`, oldest first. A row is due when it is unfinished,
    /// its retry delay has passed, no live lease holds it, and no older row of its conversation is
    /// unfinished — so a conversation's events run one at a time, in order. `SKIP LOCKED` lets
    /// concurrent claimers take disjoint rows without waiting for each other.
    pub async fn spool_claim(&self, limit: i64, lease: Duration) -> Result<Vec<SpoolRow>, StoreError> {
        let claimed: Vec<ClaimedRow> = sqlx::query_as(
            "WITH due AS (
                 SELECT s.id FROM inbound_spool s
                 WHERE s.done_at IS NULL AND s.available_at <= now()
                   AND (s.locked_until IS NULL OR s.locked_until <= now())
                   AND NOT EXISTS (
                       SELECT 1 FROM inbound_spool older
                       WHERE older.conversation_key = s.conversation_key AND older.id < s.id
                         AND older.done_at IS NULL
                   )
                 ORDER BY s.id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE inbound_spool s
             SET locked_until = now() + make_interval(secs => $2), attempts = s.attempts + 1
             FROM due WHERE s.id = due.id
             RETURNING s.id, s.event, s.attempts",
        )
        .bind(limit.max(0))
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;

        let mut rows = Vec::with_capacity(claimed.len());
        for row in claimed {
            match serde_json::from_value::<QueuedEvent>(row.event) {
                Ok(event) => rows.push(SpoolRow { id: row.id, event, attempts: row.attempts }),
                // Written by a version that no longer reads the same: set aside with the reason, so
                // that it does not hold its conversation back for ever.
                Err(e) => {
                    let reason = format!("unreadable event: {e}");
                    tracing::error!(spool_id = row.id, error = %mask_phones_in(&reason), "spool row set aside");
                    sqlx::query("UPDATE inbound_spool SET done_at = now(), last_error = $2 WHERE id = $1")
                        .bind(row.id)
                        .bind(mask_phones_in(&reason))
                        .execute(&self.pool)
                        .await?;
                }
            }
        }
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    /// The row was processed (or dead-lettered): it no longer holds its conversation back.
    pub async fn spool_done(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE inbound_spool SET done_at = now(), locked_until = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The row failed: it becomes due again after `delay`, and still holds its conversation back.
    pub async fn spool_retry(&self, id: i64, delay: Duration, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE inbound_spool
             SET available_at = now() + make_interval(secs => $2), locked_until = NULL, last_error = $3
             WHERE id = $1 AND done_at IS NULL",
        )
        .bind(id)
        .bind(delay.as_secs_f64())
        .bind(mask_phones_in(error))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rows not finished yet (claimed or not).
    pub async fn spool_pending(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM inbound_spool WHERE done_at IS NULL").fetch_one(&self.pool).await?)
    }

    /// Deletes rows finished more than `older_than` ago; returns how many. Finished rows are kept
    /// a while for inspection, and cost the claim nothing (its indexes cover unfinished rows only).
    pub async fn spool_purge_done(&self, older_than: Duration) -> Result<u64, StoreError> {
        let result = sqlx::query("DELETE FROM inbound_spool WHERE done_at < now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use chrono::Utc;

    use super::*;
    use crate::{
        queue::{InboundMessageEvent, StatusEvent},
        store::testing::TestDatabase,
    };

    const LEASE: Duration = Duration::from_secs(60);

    fn message(from: &str, wamid: &str) -> QueuedEvent {
        QueuedEvent::Message(InboundMessageEvent {
            phone_number_id: "PNID".into(),
            provider_message_id: wamid.into(),
            from: from.into(),
            contact_name: None,
            timestamp: 1_700_000_000,
            message_type: "text".into(),
            text: Some(format!("texte de {wamid}")),
            received_at: Utc::now(),
            raw: serde_json::json!({"id": wamid}).into(),
        })
    }

    async fn setup() -> (TestDatabase, PgStore) {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        (db, store)
    }

    #[tokio::test]
    async fn events_are_stored_claimed_in_order_and_finished() {
        let (db, store) = setup().await;
        let status = QueuedEvent::Status(StatusEvent {
            phone_number_id: "PNID".into(),
            provider_message_id: "wamid.out".into(),
            status: "read".into(),
            recipient: Some("33699999999".into()),
            timestamp: 1_700_000_001,
            error_code: None,
            error_title: None,
        });
        let events = vec![message("33611111111", "wamid.1"), message("33622222222", "wamid.2"), status];
        let ids = store.spool_insert(&events, 16).await.unwrap();
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(store.spool_pending().await.unwrap(), 3);
        let shard: i32 = sqlx::query_scalar("SELECT shard FROM inbound_spool WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(shard as u32, events[0].shard(16));

        let claimed = store.spool_claim(10, LEASE).await.unwrap();
        assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        assert_eq!(claimed.iter().map(|r| r.event.clone()).collect::<Vec<_>>(), events, "events round-trip");
        assert!(claimed.iter().all(|r| r.attempts == 1));
        assert!(store.spool_claim(10, LEASE).await.unwrap().is_empty(), "leased rows are not claimed twice");

        for id in &ids {
            store.spool_done(*id).await.unwrap();
        }
        assert_eq!(store.spool_pending().await.unwrap(), 0);
        assert!(store.spool_claim(10, LEASE).await.unwrap().is_empty());
        assert_eq!(store.spool_purge_done(Duration::ZERO).await.unwrap(), 3);
        assert!(store.spool_insert(&[], 16).await.unwrap().is_empty());
        db.drop_database().await;
    }

    #[tokio::test]
    async fn a_retried_row_waits_for_its_delay_and_keeps_its_error_masked() {
        let (db, store) = setup().await;
        let ids = store.spool_insert(&[message("33611111111", "wamid.1")], 16).await.unwrap();
        let first = store.spool_claim(10, LEASE).await.unwrap();
        assert_eq!(first.len(), 1);

        store.spool_retry(ids[0], Duration::from_secs(3600), "send failed for +33611111111").await.unwrap();
        assert!(store.spool_claim(10, LEASE).await.unwrap().is_empty(), "not due before its delay");
        assert_eq!(store.spool_pending().await.unwrap(), 1);
        let error: String =
            sqlx::query_scalar("SELECT last_error FROM inbound_spool").fetch_one(&db.pool).await.unwrap();
        assert!(error.contains("+336XXXXXX11"), "{error}");

        store.spool_retry(ids[0], Duration::ZERO, "again").await.unwrap();
        let second = store.spool_claim(10, LEASE).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].attempts, 2);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn an_expired_lease_makes_the_row_claimable_again() {
        let (db, store) = setup().await;
        store.spool_insert(&[message("33611111111", "wamid.1")], 16).await.unwrap();
        assert_eq!(store.spool_claim(10, Duration::ZERO).await.unwrap().len(), 1);
        let again = store.spool_claim(10, LEASE).await.unwrap();
        assert_eq!(again.len(), 1, "a dead worker's row is taken over");
        assert_eq!(again[0].attempts, 2);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn a_later_event_of_a_conversation_waits_for_the_earlier_one() {
        let (db, store) = setup().await;
        let ids = store
            .spool_insert(
                &[
                    message("33611111111", "wamid.1"),
                    message("33611111111", "wamid.2"),
                    message("33622222222", "wamid.3"),
                ],
                16,
            )
            .await
            .unwrap();

        let claimed: Vec<i64> = store.spool_claim(10, LEASE).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(claimed, [ids[0], ids[2]], "wamid.2 waits for wamid.1 of the same conversation");

        // Still waiting while the first is being retried.
        store.spool_retry(ids[0], Duration::from_secs(3600), "boom").await.unwrap();
        assert!(store.spool_claim(10, LEASE).await.unwrap().is_empty());

        store.spool_done(ids[0]).await.unwrap();
        let next: Vec<i64> = store.spool_claim(10, LEASE).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(next, [ids[1]]);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn concurrent_claimers_take_disjoint_rows() {
        let (db, store) = setup().await;
        let events: Vec<QueuedEvent> = (0..40).map(|i| message(&format!("336{i:08}"), &format!("wamid.{i}"))).collect();
        store.spool_insert(&events, 16).await.unwrap();

        let claim = || async { store.spool_claim(7, LEASE).await.unwrap() };
        let (a, b, c, d) = tokio::join!(claim(), claim(), claim(), claim());
        let all: Vec<i64> = [a, b, c, d].iter().flatten().map(|r| r.id).collect();
        let distinct: HashSet<i64> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "a row was claimed twice: {all:?}");
        assert_eq!(all.len(), 28);
        db.drop_database().await;
    }

    #[tokio::test]
    async fn an_unreadable_row_is_set_aside_instead_of_blocking_its_conversation() {
        let (db, store) = setup().await;
        sqlx::query(
            "INSERT INTO inbound_spool (event, shard, conversation_key) VALUES ('{\"kind\": \"martian\"}', 0, 'k')",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        assert!(store.spool_claim(10, LEASE).await.unwrap().is_empty());
        assert_eq!(store.spool_pending().await.unwrap(), 0);
        db.drop_database().await;
    }
}
