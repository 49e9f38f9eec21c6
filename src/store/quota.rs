//! Monthly message quotas: counting a message against its tenant's period atomically and once per
//! message, and the block a refused conversation carries.

use engine::{
    ids::{ConversationId, ProviderMessageId, TenantId},
    message::QuotaBlock,
    ports::QuotaDecision,
};

use super::{PgStore, StoreError, parse_id, to_u64};

#[derive(sqlx::FromRow)]
struct ConsumeRow {
    prior_used: Option<i64>,
    granted_used: Option<i64>,
    snapshot_used: Option<i64>,
}

impl PgStore {
    /// Counts `message` against `tenant`'s `period` if fewer than `limit` are used.
    ///
    /// One statement: the increment is a conditional upsert (`WHERE used < limit`), which
    /// PostgreSQL re-checks on the latest row version under its row lock, so concurrent messages
    /// can never overshoot; the consumption row is inserted only when the increment happened, so a
    /// refused message counts nothing. A message counted before returns its first answer. Two runs
    /// of the same message racing both increment, but the second then violates the consumption's
    /// primary key, which rolls its whole statement back (its increment included): it then reads
    /// the first one's answer.
    pub(super) async fn consume_quota(
        &self,
        tenant: &TenantId,
        period: &str,
        limit: u64,
        message: &ProviderMessageId,
    ) -> Result<QuotaDecision, StoreError> {
        let tenant = parse_id("tenant", tenant.as_str())?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut conn = self.hot().await?;
        let result = sqlx::query_as::<_, ConsumeRow>(
            "WITH prior AS (
                 SELECT used_after FROM quota_consumptions WHERE tenant_id = $1 AND provider_message_id = $4
             ), bump AS (
                 INSERT INTO monthly_usage AS u (tenant_id, period, used)
                 SELECT $1, $2, 1 WHERE $3 > 0 AND NOT EXISTS (SELECT 1 FROM prior)
                 ON CONFLICT (tenant_id, period) DO UPDATE SET used = u.used + 1, updated_at = now()
                     WHERE u.used < $3
                 RETURNING used
             ), counted AS (
                 INSERT INTO quota_consumptions (tenant_id, period, provider_message_id, used_after)
                 SELECT $1, $2, $4, used FROM bump
                 RETURNING used_after
             )
             SELECT (SELECT used_after FROM prior) AS prior_used,
                    (SELECT used_after FROM counted) AS granted_used,
                    (SELECT used FROM monthly_usage WHERE tenant_id = $1 AND period = $2) AS snapshot_used",
        )
        .bind(tenant)
        .bind(period)
        .bind(limit)
        .bind(message.as_str())
        .fetch_one(&mut *conn)
        .await;
        let row = match result {
            Ok(row) => {
                conn.keep();
                row
            }
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("quota_consumptions_pkey") => {
                let used = self
                    .counted(tenant, message)
                    .await?
                    .ok_or_else(|| StoreError::Other("the conflicting quota consumption vanished".into()))?;
                return Ok(QuotaDecision::Granted { used: to_u64(used) });
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(used) = row.prior_used.or(row.granted_used) {
            return Ok(QuotaDecision::Granted { used: to_u64(used) });
        }
        // Refused — unless a concurrent run of this same message took the last unit after this
        // statement's snapshot (rare, and refusals are rare: one per blocked conversation).
        if let Some(used) = self.counted(tenant, message).await? {
            return Ok(QuotaDecision::Granted { used: to_u64(used) });
        }
        // The latest count is at least the limit, though the snapshot may predate the increments
        // that got it there.
        Ok(QuotaDecision::Refused { used: to_u64(row.snapshot_used.unwrap_or(0).max(limit)) })
    }

    /// The count right after `message` was granted, if it was.
    async fn counted(&self, tenant: uuid::Uuid, message: &ProviderMessageId) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT used_after FROM quota_consumptions WHERE tenant_id = $1 AND provider_message_id = $2",
        )
        .bind(tenant)
        .bind(message.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    pub(super) async fn block_conversation(
        &self,
        conversation: &ConversationId,
        block: &QuotaBlock,
    ) -> Result<(), StoreError> {
        let conversation = parse_id("conversation", conversation.as_str())?;
        sqlx::query(
            "UPDATE conversations SET quota_blocked_period = $2, quota_blocked_limit = $3, updated_at = now()
             WHERE id = $1",
        )
        .bind(conversation)
        .bind(&block.period)
        .bind(i64::try_from(block.limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use engine::ports::RelationalStore;

    use super::*;
    use crate::store::{SeedTenant, testing::TestDatabase};

    const PERIOD: &str = "2026-11";

    async fn setup() -> (TestDatabase, PgStore, TenantId) {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        let seeded = store
            .seed_tenant(&SeedTenant {
                name: "Quota".into(),
                phone_number_id: "PNID-Q".into(),
                plan: None,
                monthly_messages: Some(3),
                provider: "sandbox".into(),
            })
            .await
            .unwrap();
        (db, store, TenantId::new(seeded.tenant_id.to_string()))
    }

    fn wamid(i: usize) -> ProviderMessageId {
        ProviderMessageId::new(format!("wamid.q.{i}"))
    }

    async fn used(db: &TestDatabase, period: &str) -> i64 {
        sqlx::query_scalar("SELECT COALESCE(sum(used), 0)::bigint FROM monthly_usage WHERE period = $1")
            .bind(period)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn messages_are_counted_up_to_the_limit_then_refused_without_counting() {
        let (db, store, tenant) = setup().await;
        for i in 1..=3 {
            let decision = store.consume_monthly_quota(&tenant, PERIOD, 3, &wamid(i)).await.unwrap();
            assert_eq!(decision, QuotaDecision::Granted { used: i as u64 });
        }
        assert_eq!(
            store.consume_monthly_quota(&tenant, PERIOD, 3, &wamid(4)).await.unwrap(),
            QuotaDecision::Refused { used: 3 }
        );
        assert_eq!(used(&db, PERIOD).await, 3, "a refused message counts nothing");

        // A new month starts from zero; a higher limit lets the refused message through.
        assert_eq!(
            store.consume_monthly_quota(&tenant, "2026-12", 3, &wamid(5)).await.unwrap(),
            QuotaDecision::Granted { used: 1 }
        );
        assert_eq!(
            store.consume_monthly_quota(&tenant, PERIOD, 4, &wamid(4)).await.unwrap(),
            QuotaDecision::Granted { used: 4 }
        );
        assert_eq!(
            store.consume_monthly_quota(&tenant, PERIOD, 0, &wamid(6)).await.unwrap(),
            QuotaDecision::Refused { used: 4 }
        );
        db.drop_database().await;
    }

    #[tokio::test]
    async fn a_retried_message_counts_once_and_gets_its_first_answer() {
        let (db, store, tenant) = setup().await;
        let first = store.consume_monthly_quota(&tenant, PERIOD, 3, &wamid(1)).await.unwrap();
        store.consume_monthly_quota(&tenant, PERIOD, 3, &wamid(2)).await.unwrap();
        let again = store.consume_monthly_quota(&tenant, PERIOD, 3, &wamid(1)).await.unwrap();
        assert_eq!(again, first);
        assert_eq!(first, QuotaDecision::Granted { used: 1 });
        assert_eq!(used(&db, PERIOD).await, 2);

        // The same message racing itself (a job redelivered while its first run is still going):
        // with room to spare, and for the last unit of the month.
        for round in 0..10u64 {
            let m = wamid(100 + round as usize);
            let (a, b) = tokio::join!(
                store.consume_monthly_quota(&tenant, PERIOD, 1000, &m),
                store.consume_monthly_quota(&tenant, PERIOD, 1000, &m)
            );
            let expected = QuotaDecision::Granted { used: 3 + round };
            assert_eq!((a.unwrap(), b.unwrap()), (expected, expected), "round {round}");
        }
        for round in 0..10u64 {
            let m = wamid(200 + round as usize);
            let limit = 13 + round;
            let (a, b) = tokio::join!(
                store.consume_monthly_quota(&tenant, PERIOD, limit, &m),
                store.consume_monthly_quota(&tenant, PERIOD, limit, &m)
            );
            let expected = QuotaDecision::Granted { used: limit };
            assert_eq!((a.unwrap(), b.unwrap()), (expected, expected), "last unit, round {round}");
        }
        assert_eq!(used(&db, PERIOD).await, 22, "each message counted once");
        db.drop_database().await;
    }

    #[tokio::test]
    async fn fifty_concurrent_messages_against_a_limit_of_ten_grant_exactly_ten() {
        let (db, store, tenant) = setup().await;
        let store = Arc::new(store);
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (store, tenant) = (store.clone(), tenant.clone());
                tokio::spawn(async move { store.consume_monthly_quota(&tenant, PERIOD, 10, &wamid(i)).await })
            })
            .collect();
        let mut granted = Vec::new();
        let mut refused = 0;
        for task in tasks {
            match task.await.unwrap().unwrap() {
                QuotaDecision::Granted { used } => granted.push(used),
                QuotaDecision::Refused { used } => {
                    assert!(used >= 10);
                    refused += 1;
                }
            }
        }
        granted.sort_unstable();
        assert_eq!(granted, (1..=10).collect::<Vec<u64>>(), "each grant saw its own count");
        assert_eq!(refused, 40);
        assert_eq!(used(&db, PERIOD).await, 10);
        let consumptions: i64 =
            sqlx::query_scalar("SELECT count(*) FROM quota_consumptions").fetch_one(&db.pool).await.unwrap();
        assert_eq!(consumptions, 10);
        db.drop_database().await;
    }
}
