//! The webhook's durable intake: events go to the Redis streams, or to the PostgreSQL spool while
//! Redis is down (the checklist's scenario F), and the webhook answers 200 only once one of them
//! holds every event of the body.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use engine::masking::mask_phones_in;

use super::{
    event::{AcceptedJob, Intake, IntakeError, QueuedEvent},
    streams::Queue,
};

/// Where events go when Redis cannot take them: the `inbound_spool` table.
#[async_trait]
pub trait SpoolSink: Send + Sync {
    /// Stores `events` (all or nothing) and returns their row ids in the same order. `shards` is
    /// the queue's shard count, to record each event's shard. The error must hold no secret.
    async fn spool(&self, events: &[QueuedEvent], shards: u32) -> Result<Vec<i64>, String>;
}

/// How long the intake sends events straight to the spool after Redis failed, before trying Redis
/// again: while Redis is down, each webhook call would otherwise wait the queue's timeout first.
pub const DEFAULT_REDIS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The [`Intake`] of the service: [`Queue::enqueue`] first; on any queue error, the whole batch
/// goes to the spool (`durable_in = "postgres"`, job ids `spool:{row id}`); both failing is an
/// [`IntakeError`] (the webhook answers 500 and the provider retries).
///
/// After a Redis failure the next calls skip Redis for a short while
/// ([`DEFAULT_REDIS_RETRY_AFTER`]); the first call after that tries Redis again, so intake returns
/// to the streams on its own once Redis is back.
pub struct DurableIntake {
    queue: Queue,
    spool: Arc<dyn SpoolSink>,
    retry_redis_after: Duration,
    redis_skipped_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for DurableIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableIntake").field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl DurableIntake {
    pub fn new(queue: Queue, spool: Arc<dyn SpoolSink>) -> Self {
        Self { queue, spool, retry_redis_after: DEFAULT_REDIS_RETRY_AFTER, redis_skipped_until: Mutex::new(None) }
    }

    /// How long to skip Redis after it failed; zero tries it on every call.
    pub fn with_redis_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_redis_after = retry_after;
        self
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    fn redis_skipped(&self) -> bool {
        let until = *self.redis_skipped_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    fn mark_redis(&self, healthy: bool) {
        let mut until = self.redis_skipped_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *until = if healthy { None } else { Some(Instant::now() + self.retry_redis_after) };
    }

    async fn spool(&self, events: &[QueuedEvent], redis: String) -> Result<Vec<AcceptedJob>, IntakeError> {
        let shards = self.queue.shards();
        match self.spool.spool(events, shards).await {
            Ok(ids) if ids.len() == events.len() => {
                tracing::warn!(events = events.len(), redis_error = %redis, "redis unavailable: events spooled to postgres");
                Ok(ids
                    .into_iter()
                    .zip(events)
                    .map(|(id, event)| AcceptedJob {
                        job_id: format!("spool:{id}"),
                        durable_in: "postgres",
                        shard: event.shard(shards),
                    })
                    .collect())
            }
            Ok(ids) => Err(IntakeError {
                redis,
                postgres: format!("the spool returned {} ids for {} events", ids.len(), events.len()),
            }),
            Err(postgres) => Err(IntakeError { redis, postgres: mask_phones_in(&postgres) }),
        }
    }
}

#[async_trait]
impl Intake for DurableIntake {
    async fn accept(&self, events: &[QueuedEvent]) -> Result<Vec<AcceptedJob>, IntakeError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if self.redis_skipped() {
            return self.spool(events, "skipped: redis failed moments ago".to_owned()).await;
        }
        match self.queue.enqueue(events).await {
            Ok(jobs) => {
                self.mark_redis(true);
                Ok(jobs)
            }
            Err(e) => {
                self.mark_redis(false);
                self.spool(events, e.to_string()).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::{
        kv::{
            connect_lazy,
            tests::{OwnRedis, delete_prefix, free_port, shared_redis, test_prefix},
        },
        queue::streams::tests::message,
    };

    /// A spool that records what it was given, or refuses everything.
    #[derive(Default)]
    struct FakeSpool {
        down: bool,
        rows: Mutex<Vec<QueuedEvent>>,
    }

    #[async_trait]
    impl SpoolSink for FakeSpool {
        async fn spool(&self, events: &[QueuedEvent], _shards: u32) -> Result<Vec<i64>, String> {
            if self.down {
                return Err("postgres unavailable: connection refused".to_owned());
            }
            let mut rows = self.rows.lock().unwrap();
            let first = rows.len() as i64 + 1;
            rows.extend_from_slice(events);
            Ok((first..first + events.len() as i64).collect())
        }
    }

    fn dead_queue() -> Queue {
        let url = SecretString::from(format!("redis://127.0.0.1:{}", free_port()));
        Queue::new(connect_lazy(&url).unwrap(), test_prefix(), 4).with_op_timeout(Duration::from_millis(300))
    }

    fn body() -> Vec<QueuedEvent> {
        vec![message("33612345678", "wamid.1", "hello"), message("33698765432", "wamid.2", "bonjour")]
    }

    #[tokio::test]
    async fn with_redis_up_events_go_to_the_streams() {
        let prefix = test_prefix();
        let conn = shared_redis().await;
        let spool = Arc::new(FakeSpool::default());
        let intake = DurableIntake::new(Queue::new(conn.clone(), prefix.clone(), 4), spool.clone());

        let jobs = intake.accept(&body()).await.unwrap();

        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.durable_in == "redis" && j.job_id.starts_with("stream:")), "{jobs:?}");
        assert!(spool.rows.lock().unwrap().is_empty());
        assert_eq!(intake.queue().backlog().await.unwrap(), 2);
        delete_prefix(&conn, &prefix).await;
    }

    #[tokio::test]
    async fn with_redis_down_events_are_spooled_to_postgres() {
        let spool = Arc::new(FakeSpool::default());
        let intake = DurableIntake::new(dead_queue(), spool.clone());
        let events = body();

        let jobs = intake.accept(&events).await.unwrap();

        assert_eq!(jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), ["spool:1", "spool:2"]);
        assert!(jobs.iter().all(|j| j.durable_in == "postgres"));
        assert_eq!(jobs[0].shard, events[0].shard(4));
        assert_eq!(*spool.rows.lock().unwrap(), events);

        // The next body skips the dead Redis instead of waiting for it again.
        let jobs = intake.accept(&[message("33612345678", "wamid.3", "again")]).await.unwrap();
        assert_eq!(jobs[0].job_id, "spool:3");
    }

    #[tokio::test]
    async fn with_redis_and_postgres_down_intake_fails_so_the_provider_retries() {
        let intake = DurableIntake::new(dead_queue(), Arc::new(FakeSpool { down: true, ..Default::default() }));

        let err = intake.accept(&body()).await.unwrap_err();

        assert!(err.redis.contains("redis"), "{err}");
        assert!(err.postgres.contains("connection refused"), "{err}");
        assert!(!err.to_string().contains("33612345678"), "{err}");
    }

    #[tokio::test]
    async fn intake_returns_to_the_streams_once_redis_is_back() {
        let mut redis = OwnRedis::start().await;
        let conn = connect_lazy(&redis.url()).unwrap();
        let spool = Arc::new(FakeSpool::default());
        let queue = Queue::new(conn, "parley", 2).with_op_timeout(Duration::from_millis(300));
        let intake = DurableIntake::new(queue, spool.clone()).with_redis_retry_after(Duration::ZERO);
        assert_eq!(intake.accept(&body()).await.unwrap()[0].durable_in, "redis");

        redis.stop().await;
        assert_eq!(intake.accept(&body()).await.unwrap()[0].durable_in, "postgres");

        redis.restart().await;
        let mut back = false;
        for _ in 0..50 {
            if intake.accept(&body()).await.unwrap()[0].durable_in == "redis" {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(back, "intake must use Redis again once it returns");
        redis.stop().await;
    }
}
