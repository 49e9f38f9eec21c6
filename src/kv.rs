//! The Redis adapter: connecting to Redis (timeouts, automatic reconnection), the readiness probes,
//! and [`RedisKv`], the engine's key-value port — idempotence claims and rate-limit windows, each
//! one atomic Lua script. The queue (`crate::queue`) runs on the same connections.
//!
//! Every call is bounded by a timeout so that a Redis that is down or hung costs a stage its
//! timeout, never a stuck worker or webhook; errors never carry the URL or its password.

use std::{fmt, future::Future, sync::LazyLock, time::Duration};

use async_trait::async_trait;
use engine::ports::{Claim, HitOnce, KeyValueStore, PortError, WindowCount, WindowKey};
use redis::{
    Client, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use secrecy::{ExposeSecret, SecretString};

/// How long establishing one TCP connection (and the initial `connect` ping) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default bound of one key-value call: a rate-limit or dedupe check that takes longer is
/// better skipped (the stages fail open) than waited for.
pub const DEFAULT_KV_TIMEOUT: Duration = Duration::from_millis(500);

/// The connection's own response timeout: a backstop above every per-call timeout, including the
/// queue's blocking reads, so that a hung Redis eventually gets its connection replaced.
const RESPONSE_BACKSTOP: Duration = Duration::from_secs(30);

/// The longest pause between reconnection attempts: once Redis is back, the service notices
/// within about this long.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A Redis call that failed. Messages never contain the URL, the password or a phone number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// REDIS_URL could not be used (settings validate it first, so this is rare).
    #[error("REDIS_URL is not usable: {0}")]
    InvalidUrl(String),
    /// No answer within the call's timeout: Redis is down, unreachable or overloaded.
    #[error("redis did not answer {op} within {} ms", after.as_millis())]
    Timeout { op: &'static str, after: Duration },
    /// Redis answered with an error, or the connection failed.
    #[error("redis {op} failed: {message}")]
    Failed { op: &'static str, message: String },
}

impl From<RedisError> for PortError {
    fn from(e: RedisError) -> Self {
        PortError::unavailable("redis", e.to_string())
    }
}

/// Runs one Redis call bounded by `timeout`, mapping its error to a [`RedisError`] named after `op`.
pub(crate) async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, RedisError> {
    bounded_raw(op, timeout, call).await?.map_err(|e| failed(op, &e))
}

/// Like [`bounded`], but hands Redis's own error back, for callers that act on its code
/// (`BUSYGROUP`, `NOGROUP`). Only the timeout is an `Err` here.
pub(crate) async fn bounded_raw<T>(
    op: &'static str,
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<RedisResult<T>, RedisError> {
    tokio::time::timeout(timeout, call).await.map_err(|_| RedisError::Timeout { op, after: timeout })
}

/// Like [`bounded`], for a call that may safely reach Redis twice: a connection that Redis closed
/// (a restart, a failover) fails the first command sent on it and reconnects in the background,
/// so a call failing that way is made once more, on the new connection, within `timeout` in all.
/// Without it, each connection would fail one call after every Redis restart (a webhook spooling
/// to PostgreSQL, a stage failing open). `call` makes the call afresh each time. Only for calls
/// whose repetition is harmless: the first may have reached Redis before the connection broke.
pub(crate) async fn bounded_reconnecting<T, F, Fut>(
    op: &'static str,
    timeout: Duration,
    call: F,
) -> Result<T, RedisError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    bounded_raw_reconnecting(op, timeout, call).await?.map_err(|e| failed(op, &e))
}

/// [`bounded_reconnecting`] handing Redis's own error back, as [`bounded_raw`] does.
pub(crate) async fn bounded_raw_reconnecting<T, F, Fut>(
    op: &'static str,
    timeout: Duration,
    mut call: F,
) -> Result<RedisResult<T>, RedisError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    let started = tokio::time::Instant::now();
    match bounded_raw(op, timeout, call()).await? {
        Err(e) if e.is_unrecoverable_error() => {
            bounded_raw(op, timeout.saturating_sub(started.elapsed()), call()).await
        }
        result => Ok(result),
    }
}

/// The [`RedisError`] of a failed call.
pub(crate) fn failed(op: &'static str, e: &redis::RedisError) -> RedisError {
    RedisError::Failed { op, message: e.to_string() }
}

/// A connection manager for `redis_url` that connects on first use and reconnects by itself after
/// a failure (each attempt bounded by [`CONNECT_TIMEOUT`], at most [`MAX_RECONNECT_DELAY`] apart).
///
/// Never fails because Redis is down — only for a URL it cannot use — so the service can start
/// while Redis is away (the webhook spools to PostgreSQL meanwhile). Calls on it fail until Redis
/// is reachable, then succeed again without intervention. Call it inside the Tokio runtime (the
/// manager starts a background task).
pub fn connect_lazy(redis_url: &SecretString) -> Result<ConnectionManager, RedisError> {
    let client = Client::open(redis_url.expose_secret())
        .map_err(|e| RedisError::InvalidUrl(scrub(&e.to_string(), redis_url)))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_BACKSTOP))
        .set_max_delay(MAX_RECONNECT_DELAY);
    client.get_connection_manager_lazy(config).map_err(|e| RedisError::InvalidUrl(scrub(&e.to_string(), redis_url)))
}

/// Like [`connect_lazy`], then checks that Redis answers a PING within [`CONNECT_TIMEOUT`]: for
/// commands and start-ups that need Redis now.
pub async fn connect(redis_url: &SecretString) -> Result<ConnectionManager, RedisError> {
    let conn = connect_lazy(redis_url)?;
    ping(&conn).await.map_err(|e| match e {
        RedisError::Failed { op, message } => RedisError::Failed { op, message: scrub(&message, redis_url) },
        other => other,
    })?;
    Ok(conn)
}

/// PING, bounded by [`CONNECT_TIMEOUT`]: the readiness check.
pub async fn ping(conn: &ConnectionManager) -> Result<(), RedisError> {
    let mut conn = conn.clone();
    let pong: String = bounded("PING", CONNECT_TIMEOUT, redis::cmd("PING").query_async(&mut conn)).await?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(RedisError::Failed { op: "PING", message: format!("unexpected answer {pong:?}") })
    }
}

/// Redis's `maxmemory-policy`. Anything but `noeviction` lets Redis drop queued jobs under memory
/// pressure ([`eviction_policy_is_safe`]); `/ready` warns about it.
pub async fn eviction_policy(conn: &ConnectionManager) -> Result<String, RedisError> {
    let mut conn = conn.clone();
    let reply: Vec<String> = bounded(
        "CONFIG GET",
        CONNECT_TIMEOUT,
        redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query_async(&mut conn),
    )
    .await?;
    // The reply is [name, value]; managed Redis services that disable CONFIG answer an error instead.
    reply
        .into_iter()
        .nth(1)
        .ok_or(RedisError::Failed { op: "CONFIG GET", message: "no maxmemory-policy in the reply".to_owned() })
}

/// Whether a `maxmemory-policy` keeps the queue safe: only `noeviction` does. The go-live
/// checklist suggests an LRU policy, which is right for a cache and wrong for a job queue: Redis
/// would silently evict unprocessed messages.
pub fn eviction_policy_is_safe(policy: &str) -> bool {
    policy == "noeviction"
}

/// Removes the URL and its password from a message, in case a client error ever quotes them.
fn scrub(message: &str, redis_url: &SecretString) -> String {
    let url = redis_url.expose_secret();
    let mut out = message.replace(url, "<REDIS_URL>");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(password) = parsed.password().filter(|p| !p.is_empty())
    {
        out = out.replace(password, "<redacted>");
    }
    out
}

// ---------------------------------------------------------------------------------------------

/// `SET NX PX`, or the value already held — in one step, so two deliveries of the same message
/// can never both see the key free.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, ARGV[1]}
end
return {0, redis.call('GET', KEYS[1]) or ''}
",
    )
});

/// One increment per key; a key's first increment starts its window. Returns count and PTTL per
/// key, flattened. A key without a TTL cannot arise inside a script, but one left by an older
/// version or a manual SET would count forever, so it gets its window back.
static HIT_WINDOWS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = tonumber(ARGV[1])
local counting = true
if #KEYS > n then
  counting = redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', ARGV[n + 2]) and true or false
end
local out = {}
for i = 1, n do
  local key = KEYS[i]
  local window = tonumber(ARGV[i + 1])
  local count
  if counting then
    count = redis.call('INCR', key)
    if count == 1 then
      redis.call('PEXPIRE', key, window)
    end
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    if count > 0 then
      redis.call('PEXPIRE', key, window)
    end
    ttl = window
  end
  out[#out + 1] = count
  out[#out + 1] = ttl
end
return out
",
    )
});

/// The engine's key-value port on Redis. Cheap to clone; every call is bounded by the timeout
/// given to [`RedisKv::new`] and fails with [`PortError::unavailable`] (which the dedupe and
/// ratelimit stages treat as "fail open").
///
/// `hit_windows` touches several keys in one script: on Redis Cluster they would need a common
/// hash tag. Parley targets a single primary (with replicas), where this is not a concern.
#[derive(Clone)]
pub struct RedisKv {
    conn: ConnectionManager,
    timeout: Duration,
}

impl RedisKv {
    pub fn new(conn: ConnectionManager, timeout: Duration) -> Self {
        Self { conn, timeout }
    }
}

impl fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKv").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// Milliseconds for PX/PEXPIRE, at least 1: Redis refuses a zero expiry.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl KeyValueStore for RedisKv {
    async fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<Claim, PortError> {
        let mut invocation = CLAIM.key(key);
        invocation.arg(value).arg(millis(ttl));
        // Twice is harmless: a claim already taken by this very value answers `HeldBy(value)`,
        // which the dedupe stage reads as its own.
        let (acquired, held): (i64, String) = bounded_reconnecting("claim", self.timeout, || {
            let (invocation, mut conn) = (&invocation, self.conn.clone());
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
        Ok(if acquired == 1 { Claim::Acquired } else { Claim::HeldBy(held) })
    }

    async fn hit_windows(&self, keys: &[WindowKey], once: Option<&HitOnce>) -> Result<Vec<WindowCount>, PortError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = HIT_WINDOWS.prepare_invoke();
        invocation.arg(keys.len());
        for w in keys {
            invocation.key(&w.key).arg(millis(w.window));
        }
        if let Some(once) = once {
            invocation.key(&once.key).arg(millis(once.ttl));
        }
        // Twice counts once with `once` (the rate limit's way); without it, a count the broken
        // connection had delivered would be counted again: a limit stricter by one, once.
        let flat: Vec<i64> = bounded_reconnecting("hit_windows", self.timeout, || {
            let (invocation, mut conn) = (&invocation, self.conn.clone());
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
        if flat.len() != keys.len() * 2 {
            return Err(PortError::unavailable(
                "redis",
                format!("hit_windows: {} values for {} keys", flat.len(), keys.len()),
            ));
        }
        Ok(flat
            .chunks_exact(2)
            .map(|pair| WindowCount {
                count: u64::try_from(pair[0]).unwrap_or(0),
                resets_in: Duration::from_millis(u64::try_from(pair[1]).unwrap_or(0)),
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{net::TcpListener, process::Stdio};

    use secrecy::SecretString;
    use tokio::process::{Child, Command};

    use super::*;

    pub(crate) const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

    pub(crate) async fn shared_redis() -> ConnectionManager {
        match connect(&SecretString::from(SHARED_REDIS)).await {
            Ok(conn) => conn,
            Err(e) => panic!("the tests need Redis at {SHARED_REDIS}: {e}"),
        }
    }

    /// A key prefix of its own per test, so that tests share the machine's Redis safely.
    pub(crate) fn test_prefix() -> String {
        format!("parley-test-{}", uuid::Uuid::new_v4())
    }

    /// Deletes every key under `prefix` (SCAN, never FLUSHALL: the Redis is shared).
    pub(crate) async fn delete_prefix(conn: &ConnectionManager, prefix: &str) {
        let mut conn = conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    /// A port nothing listens on (bound then released; good enough on loopback in a test).
    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// A throwaway redis-server of the test's own, without persistence, killed on drop.
    pub(crate) struct OwnRedis {
        pub(crate) port: u16,
        child: Option<Child>,
    }

    impl OwnRedis {
        pub(crate) async fn start() -> Self {
            let mut own = Self { port: free_port(), child: None };
            own.restart().await;
            own
        }

        pub(crate) fn url(&self) -> SecretString {
            SecretString::from(format!("redis://127.0.0.1:{}", self.port))
        }

        pub(crate) async fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                child.kill().await.unwrap();
            }
        }

        /// Starts the server on the same port and waits until it answers.
        pub(crate) async fn restart(&mut self) {
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server must be installed for the tests");
            self.child = Some(child);
            for _ in 0..100 {
                if connect(&self.url()).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server did not start on port {}", self.port);
        }
    }

    async fn pttl(conn: &ConnectionManager, key: &str) -> i64 {
        let mut conn = conn.clone();
        redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap()
    }

    #[tokio::test]
    async fn a_claim_is_acquired_once_and_then_names_its_holder() {
        let conn = shared_redis().await;
        let prefix = test_prefix();
        let kv = RedisKv::new(conn.clone(), DEFAULT_KV_TIMEOUT);
        let key = format!("{prefix}:idempotence:msg:tenant:wamid.1");

        assert_eq!(kv.claim(&key, "job-1", Duration::from_secs(86_400)).await.unwrap(), Claim::Acquired);
        assert_eq!(
            kv.claim(&key, "job-2", Duration::from_secs(86_400)).await.unwrap(),
            Claim::HeldBy("job-1".to_owned())
        );
        let ttl = pttl(&conn, &key).await;
        assert!(ttl > 0 && ttl <= 86_400_000, "the claim keeps its 24 h TTL: {ttl}");

        delete_prefix(&conn, &prefix).await;
    }

    #[tokio::test]
    async fn windows_count_each_hit_and_expire_with_their_window() {
        let conn = shared_redis().await;
        let prefix = test_prefix();
        let kv = RedisKv::new(conn.clone(), DEFAULT_KV_TIMEOUT);
        let keys = [
            WindowKey { key: format!("{prefix}:ratelimit:conv:c1"), window: Duration::from_secs(30) },
            WindowKey { key: format!("{prefix}:ratelimit:sender:t:s1"), window: Duration::from_secs(300) },
        ];

        let first = kv.hit_windows(&keys, None).await.unwrap();
        let second = kv.hit_windows(&keys, None).await.unwrap();

        assert_eq!(first.iter().map(|w| w.count).collect::<Vec<_>>(), [1, 1]);
        assert_eq!(second.iter().map(|w| w.count).collect::<Vec<_>>(), [2, 2]);
        assert!(second[0].resets_in <= Duration::from_secs(30) && second[0].resets_in > Duration::ZERO);
        assert!(second[1].resets_in <= Duration::from_secs(300) && second[1].resets_in > Duration::from_secs(30));
        let ttl = pttl(&conn, &keys[0].key).await;
        assert!(ttl > 0 && ttl <= 30_000, "the conversation window expires within 30 s: {ttl}");

        assert!(kv.hit_windows(&[], None).await.unwrap().is_empty());
        delete_prefix(&conn, &prefix).await;
    }

    #[tokio::test]
    async fn a_message_counts_once_however_often_its_job_is_retried() {
        let conn = shared_redis().await;
        let prefix = test_prefix();
        let kv = RedisKv::new(conn.clone(), DEFAULT_KV_TIMEOUT);
        let keys = [
            WindowKey { key: format!("{prefix}:ratelimit:conv:c1"), window: Duration::from_secs(30) },
            WindowKey { key: format!("{prefix}:ratelimit:sender:t:s1"), window: Duration::from_secs(300) },
        ];
        let once = |id: &str| HitOnce { key: format!("{prefix}:ratelimit:seen:{id}"), ttl: Duration::from_secs(300) };

        let first = kv.hit_windows(&keys, Some(&once("wamid.1"))).await.unwrap();
        let retried = kv.hit_windows(&keys, Some(&once("wamid.1"))).await.unwrap();
        let next = kv.hit_windows(&keys, Some(&once("wamid.2"))).await.unwrap();

        assert_eq!(first.iter().map(|w| w.count).collect::<Vec<_>>(), [1, 1]);
        assert_eq!(retried.iter().map(|w| w.count).collect::<Vec<_>>(), [1, 1], "the retry only reads");
        assert!(retried[0].resets_in > Duration::ZERO && retried[0].resets_in <= Duration::from_secs(30));
        assert_eq!(next.iter().map(|w| w.count).collect::<Vec<_>>(), [2, 2], "another message counts");
        let fresh = [WindowKey { key: format!("{prefix}:ratelimit:conv:never"), window: Duration::from_secs(30) }];
        let read = kv.hit_windows(&fresh, Some(&once("wamid.1"))).await.unwrap();
        assert_eq!(read[0].count, 0, "reading a missing counter does not create it");
        assert_eq!(pttl(&conn, &fresh[0].key).await, -2);
        delete_prefix(&conn, &prefix).await;
    }

    #[tokio::test]
    async fn fifty_concurrent_hits_count_exactly_one_to_fifty_in_both_scopes() {
        let conn = shared_redis().await;
        let prefix = test_prefix();
        let kv = RedisKv::new(conn.clone(), DEFAULT_KV_TIMEOUT);
        let keys = vec![
            WindowKey { key: format!("{prefix}:conv"), window: Duration::from_secs(30) },
            WindowKey { key: format!("{prefix}:sender"), window: Duration::from_secs(300) },
        ];

        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (kv, keys) = (kv.clone(), keys.clone());
                tokio::spawn(async move { kv.hit_windows(&keys, None).await.unwrap() })
            })
            .collect();
        let mut pairs = Vec::new();
        for t in tasks {
            let counts = t.await.unwrap();
            pairs.push((counts[0].count, counts[1].count));
        }
        pairs.sort_unstable();

        // Atomic across both scopes: each call saw the same position in both counters.
        assert_eq!(pairs, (1..=50).map(|n| (n, n)).collect::<Vec<_>>());
        delete_prefix(&conn, &prefix).await;
    }

    #[tokio::test]
    async fn a_counter_left_without_expiry_gets_its_window_back() {
        let conn = shared_redis().await;
        let prefix = test_prefix();
        let key = format!("{prefix}:ratelimit:conv:stuck");
        let _: () = redis::cmd("SET").arg(&key).arg(7).query_async(&mut conn.clone()).await.unwrap();
        let kv = RedisKv::new(conn.clone(), DEFAULT_KV_TIMEOUT);

        let counts =
            kv.hit_windows(&[WindowKey { key: key.clone(), window: Duration::from_secs(30) }], None).await.unwrap();

        assert_eq!(counts[0].count, 8);
        let ttl = pttl(&conn, &key).await;
        assert!(ttl > 0 && ttl <= 30_000, "the counter expires again: {ttl}");
        delete_prefix(&conn, &prefix).await;
    }

    #[tokio::test]
    async fn a_redis_that_is_not_there_is_an_error_without_the_password() {
        let url = SecretString::from(format!("redis://:hunter2-secret@127.0.0.1:{}", free_port()));

        let err = connect(&url).await.unwrap_err();
        assert!(!err.to_string().contains("hunter2-secret"), "{err}");

        let kv = RedisKv::new(connect_lazy(&url).unwrap(), DEFAULT_KV_TIMEOUT);
        let err = kv.claim("k", "v", Duration::from_secs(1)).await.unwrap_err();
        assert!(err.is_retryable(), "a dead Redis is a transient failure: {err}");
        assert_eq!(err.service, "redis");
        assert!(!err.to_string().contains("hunter2-secret"), "{err}");
        let err =
            kv.hit_windows(&[WindowKey { key: "k".into(), window: Duration::from_secs(1) }], None).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }

    #[tokio::test]
    async fn an_unusable_url_is_refused_without_echoing_it() {
        let err = connect_lazy(&SecretString::from("http://user:hunter2@example.com")).unwrap_err();
        assert!(matches!(err, RedisError::InvalidUrl(_)), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn calls_fail_while_redis_is_gone_and_succeed_again_once_it_returns() {
        let mut redis = OwnRedis::start().await;
        let kv = RedisKv::new(connect(&redis.url()).await.unwrap(), DEFAULT_KV_TIMEOUT);
        assert_eq!(kv.claim("before", "v", Duration::from_secs(60)).await.unwrap(), Claim::Acquired);

        redis.stop().await;
        // Bounded by the call's timeout whatever state the connection is in (broken, reconnecting).
        for _ in 0..3 {
            let err = kv.claim("during", "v", Duration::from_secs(60)).await.unwrap_err();
            assert!(err.is_retryable(), "{err}");
        }

        redis.restart().await;
        let mut recovered = None;
        for _ in 0..100 {
            if let Ok(claim) = kv.claim("after", "v", Duration::from_secs(60)).await {
                recovered = Some(claim);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(recovered, Some(Claim::Acquired), "the same RedisKv works again once Redis is back");
        redis.stop().await;
    }

    #[tokio::test]
    async fn the_first_calls_after_a_redis_restart_go_through_on_a_new_connection() {
        let mut redis = OwnRedis::start().await;
        let kv = RedisKv::new(connect(&redis.url()).await.unwrap(), DEFAULT_KV_TIMEOUT);
        assert_eq!(kv.claim("before", "job-1", Duration::from_secs(60)).await.unwrap(), Claim::Acquired);

        // Redis restarts while the connection is idle: the connection held is now closed.
        redis.stop().await;
        redis.restart().await;

        let claim = kv.claim("after", "job-1", Duration::from_secs(60)).await;
        assert_eq!(claim.unwrap(), Claim::Acquired, "the first claim after the restart must reconnect, not fail");
        redis.stop().await;
        redis.restart().await;
        let windows = [WindowKey { key: "window".into(), window: Duration::from_secs(30) }];
        let counted = kv.hit_windows(&windows, None).await;
        assert_eq!(counted.unwrap()[0].count, 1, "so must the first rate-limit count");
        redis.stop().await;
    }

    #[tokio::test]
    async fn the_eviction_policy_is_read_and_judged() {
        let conn = shared_redis().await;
        let policy = eviction_policy(&conn).await.unwrap();
        assert!(!policy.is_empty());
        assert!(eviction_policy_is_safe("noeviction"));
        assert!(!eviction_policy_is_safe("allkeys-lru"));
        ping(&conn).await.unwrap();
    }
}
