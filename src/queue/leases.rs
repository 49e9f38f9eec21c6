//! Shard leases and worker heartbeats: which worker processes which shard, so that one
//! conversation's messages are never processed by two workers at once.
//!
//! A lease is a key `{prefix}:lease:{shard}` holding the worker id, with a TTL; a heartbeat is a
//! key `{prefix}:worker:{id}` with a TTL. Only the holder can renew or release a lease, and a lease
//! nobody renews expires, so a dead worker's shards become free after at most one TTL.
//!
//! # The protocol a worker follows
//!
//! With `ttl` the lease TTL (e.g. 15 s) and every step repeated every `ttl / 3`:
//! 1. [`Leases::heartbeat`], so that the others count it in [`Leases::live_workers`];
//! 2. [`Leases::renew`] each shard it holds; **a failed renew (false, or an error for longer than
//!    the TTL) means the shard may already be someone else's: stop taking new work from it at
//!    once** and drop it from the held set (jobs in flight finish; their acks are harmless);
//! 3. compute `fair = fair_share(shards, live_workers().len())`, find free shards with
//!    [`Leases::holders`], and follow [`rebalance`]: [`Leases::acquire`] free shards while holding
//!    fewer than `fair`, [`Leases::release`] the extra ones while holding more (after finishing
//!    their jobs in flight), so that a newly started worker gets its share;
//! 4. after acquiring a shard: `Queue::claim_pending` (take over what the previous holder left),
//!    then read new entries.
//!
//! On shutdown it releases its shards and calls [`Leases::retire`], so that the others take over
//! without waiting for the TTL.

use std::{fmt, sync::LazyLock, time::Duration};

use redis::{Script, aio::ConnectionManager};

use super::streams::{DEFAULT_OP_TIMEOUT, QueueError};
use crate::kv::{bounded, bounded_reconnecting};

/// Takes a free lease, or extends one we already hold.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
",
    )
});

/// Extends a lease only if we hold it.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Deletes a lease only if we hold it: a worker whose lease expired and was taken must not free
/// its successor's.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Shard leases and worker heartbeats under a key prefix (the queue's). Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    conn: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
}

impl fmt::Debug for Leases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leases").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl Leases {
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self { conn, prefix: prefix.into(), op_timeout: DEFAULT_OP_TIMEOUT }
    }

    /// The leases of a queue: same connection, prefix and timeout.
    pub fn of(queue: &super::Queue) -> Self {
        Self { conn: queue.connection().clone(), prefix: queue.prefix().to_owned(), op_timeout: queue.op_timeout() }
    }

    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout;
        self
    }

    /// `{prefix}:lease:{shard}`.
    pub fn lease_key(&self, shard: u32) -> String {
        format!("{}:lease:{shard}", self.prefix)
    }

    /// `{prefix}:worker:{id}`.
    pub fn heartbeat_key(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.prefix)
    }

    /// Takes the shard's lease for `ttl` if nobody holds it (true), or extends it if `worker_id`
    /// already does (true); false if another worker holds it.
    pub async fn acquire(&self, shard: u32, worker_id: &str, ttl: Duration) -> Result<bool, QueueError> {
        self.run("acquire lease", &ACQUIRE, shard, worker_id, Some(ttl)).await
    }

    /// Extends the lease for `ttl` only if `worker_id` holds it. False: the lease expired or
    /// another worker took it — stop processing the shard.
    pub async fn renew(&self, shard: u32, worker_id: &str, ttl: Duration) -> Result<bool, QueueError> {
        self.run("renew lease", &RENEW, shard, worker_id, Some(ttl)).await
    }

    /// Frees the lease if `worker_id` holds it (true); never frees another worker's.
    pub async fn release(&self, shard: u32, worker_id: &str) -> Result<bool, QueueError> {
        self.run("release lease", &RELEASE, shard, worker_id, None).await
    }

    async fn run(
        &self,
        op: &'static str,
        script: &Script,
        shard: u32,
        worker_id: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, QueueError> {
        let mut invocation = script.key(self.lease_key(shard));
        invocation.arg(worker_id);
        if let Some(ttl) = ttl {
            invocation.arg(millis(ttl));
        }
        // Each lease script is idempotent for its worker (take or extend its own lease, free its
        // own): safe to send again on a connection Redis had closed (see `bounded_reconnecting`).
        let done: i64 = bounded_reconnecting(op, self.op_timeout, || {
            let (invocation, mut conn) = (&invocation, self.conn.clone());
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
        Ok(done == 1)
    }

    /// Who holds each of `shards` (same order), `None` for a free shard — one round trip.
    pub async fn holders(&self, shards: &[u32]) -> Result<Vec<Option<String>>, QueueError> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = shards.iter().map(|&s| self.lease_key(s)).collect();
        let mut conn = self.conn.clone();
        let holders: Vec<Option<String>> =
            bounded("MGET", self.op_timeout, redis::cmd("MGET").arg(&keys).query_async(&mut conn)).await?;
        Ok(holders)
    }

    /// Announces `worker_id` as alive for `ttl`.
    pub async fn heartbeat(&self, worker_id: &str, ttl: Duration) -> Result<(), QueueError> {
        let mut set = redis::cmd("SET");
        set.arg(self.heartbeat_key(worker_id)).arg(chrono::Utc::now().to_rfc3339()).arg("PX").arg(millis(ttl));
        bounded_reconnecting("heartbeat", self.op_timeout, || {
            let (set, mut conn) = (&set, self.conn.clone());
            async move { set.query_async::<()>(&mut conn).await }
        })
        .await?;
        Ok(())
    }

    /// Withdraws `worker_id`'s heartbeat (clean shutdown), so that the fair share grows at once.
    pub async fn retire(&self, worker_id: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        bounded(
            "retire",
            self.op_timeout,
            redis::cmd("DEL").arg(self.heartbeat_key(worker_id)).query_async::<()>(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// The ids of the workers whose heartbeat has not expired, sorted.
    pub async fn live_workers(&self) -> Result<Vec<String>, QueueError> {
        let head = format!("{}:worker:", self.prefix);
        let pattern = format!("{}*", escape_glob(&head));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut workers = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = bounded(
                "SCAN",
                self.op_timeout,
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(&mut conn),
            )
            .await?;
            workers.extend(keys.into_iter().filter_map(|k| k.strip_prefix(&head).map(str::to_owned)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key twice.
        workers.sort_unstable();
        workers.dedup();
        Ok(workers)
    }
}

/// How many shards each live worker should hold: `shards / live_workers`, rounded up (so that
/// every shard is held), with at least one worker counted (the caller itself).
pub fn fair_share(shards: u32, live_workers: usize) -> usize {
    (shards as usize).div_ceil(live_workers.max(1))
}

/// What a worker should do with its leases in one round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebalance {
    /// Free shards to try to acquire (another worker may win some).
    pub acquire: Vec<u32>,
    /// Held shards to release, after their jobs in flight finish.
    pub release: Vec<u32>,
}

/// Step 3 of the protocol: from the shards held and the free ones, what to acquire (up to the
/// fair share) or release (beyond it). Deterministic: the lowest free shards are tried first, the
/// highest held shards are released first.
pub fn rebalance(held: &[u32], free: &[u32], fair_share: usize) -> Rebalance {
    let mut held = held.to_vec();
    held.sort_unstable();
    let mut free = free.to_vec();
    free.sort_unstable();
    if held.len() < fair_share {
        free.truncate(fair_share - held.len());
        Rebalance { acquire: free, release: Vec::new() }
    } else {
        let release = held.split_off(fair_share);
        Rebalance { acquire: Vec::new(), release }
    }
}

/// Milliseconds for PX/PEXPIRE, at least 1: Redis refuses a zero expiry.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Escapes the characters SCAN's MATCH treats as a pattern, so that a prefix matches literally.
fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{
        connect,
        tests::{OwnRedis, delete_prefix, shared_redis, test_prefix},
    };

    const TTL: Duration = Duration::from_secs(15);

    async fn leases() -> (Leases, String) {
        let prefix = test_prefix();
        (Leases::new(shared_redis().await, prefix.clone()), prefix)
    }

    #[tokio::test]
    async fn the_first_lease_calls_after_a_redis_restart_go_through_on_a_new_connection() {
        let mut redis = OwnRedis::start().await;
        let leases = Leases::new(connect(&redis.url()).await.unwrap(), "parley");
        assert!(leases.acquire(0, "w1", TTL).await.unwrap());

        // Redis restarts (empty) while the connection is idle: the worker's next round.
        redis.stop().await;
        redis.restart().await;

        leases.heartbeat("w1", TTL).await.expect("the heartbeat must reconnect, not fail");
        assert!(!leases.renew(0, "w1", TTL).await.unwrap(), "the lease went with the empty Redis");
        redis.stop().await;
        redis.restart().await;
        assert!(leases.acquire(0, "w1", TTL).await.expect("so must a lease script"), "the free shard is taken again");
        redis.stop().await;
    }

    #[tokio::test]
    async fn a_lease_is_held_by_one_worker_at_a_time() {
        let (leases, prefix) = leases().await;

        assert!(leases.acquire(3, "w1", TTL).await.unwrap());
        assert!(!leases.acquire(3, "w2", TTL).await.unwrap(), "w2 must not take w1's shard");
        assert!(leases.acquire(3, "w1", TTL).await.unwrap(), "acquiring again what one holds extends it");
        assert!(leases.acquire(4, "w2", TTL).await.unwrap());
        assert_eq!(leases.holders(&[3, 4, 5]).await.unwrap(), [Some("w1".to_owned()), Some("w2".to_owned()), None]);
        delete_prefix(&shared_redis().await, &prefix).await;
    }

    #[tokio::test]
    async fn only_the_holder_renews_or_releases_a_lease() {
        let (leases, prefix) = leases().await;
        leases.acquire(0, "w1", TTL).await.unwrap();

        assert!(leases.renew(0, "w1", TTL).await.unwrap());
        assert!(!leases.renew(0, "w2", TTL).await.unwrap());
        assert!(!leases.release(0, "w2").await.unwrap());
        assert_eq!(leases.holders(&[0]).await.unwrap(), [Some("w1".to_owned())]);

        assert!(leases.release(0, "w1").await.unwrap());
        assert!(!leases.renew(0, "w1", TTL).await.unwrap(), "a released lease cannot be renewed");
        assert!(leases.acquire(0, "w2", TTL).await.unwrap(), "a released shard is free for the others");
        delete_prefix(&shared_redis().await, &prefix).await;
    }

    #[tokio::test]
    async fn an_expired_lease_goes_to_another_worker_and_the_old_holder_learns_it_on_renew() {
        let (leases, prefix) = leases().await;
        leases.acquire(1, "w1", Duration::from_millis(50)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;

        assert!(leases.acquire(1, "w2", TTL).await.unwrap());
        assert!(!leases.renew(1, "w1", TTL).await.unwrap());
        assert!(!leases.release(1, "w1").await.unwrap(), "the old holder cannot free its successor's lease");
        assert_eq!(leases.holders(&[1]).await.unwrap(), [Some("w2".to_owned())]);
        delete_prefix(&shared_redis().await, &prefix).await;
    }

    #[tokio::test]
    async fn live_workers_are_those_with_a_fresh_heartbeat() {
        let (leases, prefix) = leases().await;
        leases.heartbeat("worker-b", TTL).await.unwrap();
        leases.heartbeat("worker-a", TTL).await.unwrap();
        leases.heartbeat("worker-gone", Duration::from_millis(30)).await.unwrap();
        leases.heartbeat("worker-retired", TTL).await.unwrap();
        leases.retire("worker-retired").await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;

        assert_eq!(leases.live_workers().await.unwrap(), ["worker-a", "worker-b"]);
        delete_prefix(&shared_redis().await, &prefix).await;
    }

    #[test]
    fn the_fair_share_rounds_up_so_every_shard_is_held() {
        assert_eq!(fair_share(16, 1), 16);
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 4), 4);
        assert_eq!(fair_share(16, 0), 16, "the caller counts itself");
        assert_eq!(fair_share(2, 5), 1);
    }

    #[test]
    fn a_worker_below_its_share_acquires_and_one_above_releases() {
        assert_eq!(rebalance(&[], &[9, 2, 5], 2), Rebalance { acquire: vec![2, 5], release: vec![] });
        assert_eq!(rebalance(&[1], &[3], 4), Rebalance { acquire: vec![3], release: vec![] });
        assert_eq!(rebalance(&[7, 1, 4], &[2], 2), Rebalance { acquire: vec![], release: vec![7] });
        assert_eq!(rebalance(&[1, 2], &[3], 2), Rebalance::default());
    }

    #[test]
    fn a_prefix_matches_literally_in_scan_patterns() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
