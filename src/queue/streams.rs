//! The queue on Redis Streams: one stream per shard (`{prefix}:inbound:{shard}`) read by the
//! consumer group `workers`, the attempts of each job (`{prefix}:attempts`), and the dead-letter
//! stream (`{prefix}:dead`).
//!
//! The life of an entry: [`Queue::enqueue`] adds it; the worker that holds the shard's lease reads
//! it with [`Queue::read_new`] (or takes it over with [`Queue::claim_pending`] after the previous
//! holder died); each try starts with [`Queue::begin_attempt`]; it ends with [`Queue::ack`]
//! (processed: removed from the stream) or [`Queue::dead_letter`] (given up: moved to the
//! dead-letter stream). Until one of those, it stays pending in the group, so a worker killed
//! mid-job loses nothing.
//!
//! Every call is bounded by the queue's operation timeout (blocking reads by their block time plus
//! that timeout). The keys of one call span several slots, so this targets a single Redis primary
//! (with replicas), not Redis Cluster.

use std::{fmt, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use engine::masking::mask_phones_in;
use redis::{
    RedisResult,
    aio::ConnectionManager,
    streams::{
        StreamClaimReply, StreamId, StreamInfoConsumersReply, StreamPendingCountReply, StreamRangeReply,
        StreamReadReply,
    },
};

use secrecy::SecretString;

use super::event::{AcceptedJob, QueuedEvent};
use crate::kv::{
    RedisError, bounded, bounded_raw, bounded_raw_reconnecting, bounded_reconnecting, connect_lazy, failed,
};

/// The key prefix used unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "parley";

/// The consumer group of every shard stream.
pub const GROUP: &str = "workers";

/// The default bound of one queue call. The webhook waits this long at most before it spools to
/// PostgreSQL instead.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest block a read may ask for; longer would only delay noticing a lost lease or a
/// shutdown.
pub const MAX_BLOCK: Duration = Duration::from_secs(10);

/// Between two non-blocking reads when the queue has no dedicated reader connection.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The dead-letter stream keeps about this many entries, so that a persistent failure cannot fill
/// Redis (which runs with `noeviction`: a full Redis would refuse new messages).
pub const DEAD_LETTER_MAXLEN: usize = 100_000;

/// Errors and dead-letter reasons are cut to this length.
const MAX_ERROR_CHARS: usize = 2_000;

/// The entry field that holds the event's JSON.
const EVENT_FIELD: &str = "event";

/// A queue call that failed. Never holds the Redis URL or a phone number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("the event could not be encoded: {0}")]
    Encode(String),
    #[error("unexpected reply from redis to {op}: {message}")]
    Reply { op: &'static str, message: String },
}

/// One more attempt at a job (field ARGV[1] of the attempts hash): an absent count stands for the
/// unrecorded first attempt, so the result is at least 2.
static NEXT_ATTEMPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if n == 1 then
  n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return n
",
    )
});

/// `{prefix}:inbound:{shard}`: the one place a shard stream's key is written.
fn stream_key_of(prefix: &str, shard: u32) -> String {
    format!("{prefix}:inbound:{shard}")
}

/// The XADDs of one [`Queue::enqueue`] call (stream key, event JSON), waiting to be sent.
struct PendingAdds {
    adds: Vec<(Arc<str>, String)>,
    timeout: Duration,
    reply: tokio::sync::oneshot::Sender<Result<Vec<String>, QueueError>>,
}

/// Sends the XADDs of concurrent [`Queue::enqueue`] calls together: one task takes every call
/// waiting at that moment, sends their commands as one pipeline (one write, one reply to read,
/// instead of one of each per webhook request) and hands each call its own ids.
///
/// It lets the other ready tasks run once before it takes a batch, so that the webhook requests
/// that arrived together are sent together; a lone request waits for nothing else. A batch that
/// fails fails every call in it, each of which then spools its events to PostgreSQL as a failed
/// XADD always did (the dedupe in PostgreSQL answers an event that was added and spooled once).
/// A batch is bounded by the shortest timeout of its calls (in practice they share the queue's),
/// so that each call is answered within its own: the call itself sets no timer.
#[derive(Clone)]
struct AddBatcher {
    tx: tokio::sync::mpsc::UnboundedSender<PendingAdds>,
}

/// The most calls sent in one pipeline.
const MAX_ADD_BATCH: usize = 256;

impl AddBatcher {
    /// Starts the batching task on the current runtime; it ends when the queue's last clone is
    /// dropped, or with the runtime.
    fn start(conn: ConnectionManager) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PendingAdds>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                tokio::task::yield_now().await;
                batch.push(first);
                while batch.len() < MAX_ADD_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let mut pipe = redis::pipe();
                let mut timeout = Duration::MAX;
                for pending in &batch {
                    timeout = timeout.min(pending.timeout);
                    for (key, json) in &pending.adds {
                        pipe.cmd("XADD").arg(&**key).arg("*").arg(EVENT_FIELD).arg(json);
                    }
                }
                // Sent in the background, so that the next batch forms while this one is in flight
                // (the connection keeps the commands in the order sent).
                let calls = std::mem::take(&mut batch);
                let conn = conn.clone();
                tokio::spawn(async move {
                    // Sent once more if Redis had closed the connection (a restart), so that
                    // intake stays on the streams instead of spooling once per connection. Twice
                    // is harmless: an event added twice is processed once (the worker's dedupe
                    // on the channel and message id), as for a batch spooled after a partial add.
                    let result: Result<Vec<String>, QueueError> = bounded_reconnecting("XADD", timeout, || {
                        let (pipe, mut conn) = (&pipe, conn.clone());
                        async move { pipe.query_async(&mut conn).await }
                    })
                    .await
                    .map_err(QueueError::from);
                    let mut ids = match result {
                        Ok(ids) => ids.into_iter(),
                        Err(e) => {
                            for call in calls {
                                let _ = call.reply.send(Err(e.clone()));
                            }
                            return;
                        }
                    };
                    for call in calls {
                        let own: Vec<String> = ids.by_ref().take(call.adds.len()).collect();
                        let _ = call.reply.send(Ok(own));
                    }
                });
            }
        });
        Self { tx }
    }

    /// Adds `adds` in one batch with whatever else is waiting; the ids in the same order.
    async fn add(&self, adds: Vec<(Arc<str>, String)>, timeout: Duration) -> Result<Vec<String>, QueueError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped =
            || QueueError::Redis(RedisError::Failed { op: "XADD", message: "the queue is shutting down".into() });
        self.tx.send(PendingAdds { adds, timeout, reply }).map_err(|_| stopped())?;
        // The batch's query is bounded by this call's timeout (see above); a batch task that
        // ended without answering dropped the sender.
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// One entry read from a shard stream.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    pub shard: u32,
    /// The stream entry id (`1700000000000-0`).
    pub entry_id: String,
    /// `stream:{shard}:{entry_id}`: the job's id in events (`jobId`) and in the attempts hash.
    pub job_id: String,
    /// The event, or why it could not be decoded. An undecodable entry must not crash the worker:
    /// it is dead-lettered as it is.
    pub event: Result<QueuedEvent, String>,
    /// The event's JSON as stored, kept for the dead-letter stream. Holds the user's number and
    /// text: never log it.
    pub payload: Option<String>,
    /// Read as a new entry (`XREADGROUP … >`): never delivered before, so this is its first
    /// attempt, known without asking Redis. False for an entry claimed from another consumer.
    pub first_delivery: bool,
}

/// An entry of the dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The id of the entry in the dead-letter stream.
    pub dead_id: String,
    pub job_id: String,
    pub shard: u32,
    /// The id the entry had in its shard stream.
    pub entry_id: String,
    /// Why the job was given up (phone numbers masked).
    pub error: String,
    pub attempts: u32,
    pub failed_at: Option<DateTime<Utc>>,
    pub event: Result<QueuedEvent, String>,
    pub payload: Option<String>,
}

/// The queue. Cheap to clone (the connections are shared).
///
/// A blocking read holds the connection it runs on for up to its block time, delaying every other
/// command sent on it. [`Queue::with_blocking_reads`] gives each shard a reader connection of its
/// own (opened on first use), so that reads of different shards wait side by side and the
/// webhook's and the stages' commands never queue behind them. Without it, [`Queue::read_new`]
/// waits by polling every 50 ms on the shared connection instead.
#[derive(Clone)]
pub struct Queue {
    conn: ConnectionManager,
    /// Gathers the XADDs of concurrent [`Queue::enqueue`] calls into one pipeline; started on first
    /// use, and again if the runtime it ran on has gone (a queue used from several runtimes).
    adds: Arc<std::sync::Mutex<Option<AddBatcher>>>,
    /// One per shard, indexed by shard.
    readers: Option<Arc<[ConnectionManager]>>,
    /// `{prefix}:inbound:{shard}`, indexed by shard.
    stream_keys: Arc<[Arc<str>]>,
    prefix: String,
    shards: u32,
    op_timeout: Duration,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("prefix", &self.prefix)
            .field("shards", &self.shards)
            .field("op_timeout", &self.op_timeout)
            .field("blocking_reads", &self.readers.is_some())
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// A queue of `shards` streams (at least 1) under `prefix` (see [`DEFAULT_PREFIX`]), with the
    /// [`DEFAULT_OP_TIMEOUT`].
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>, shards: u32) -> Self {
        let prefix = prefix.into();
        let shards = shards.max(1);
        Self {
            conn,
            adds: Arc::default(),
            readers: None,
            stream_keys: (0..shards).map(|shard| Arc::from(stream_key_of(&prefix, shard))).collect(),
            prefix,
            shards,
            op_timeout: DEFAULT_OP_TIMEOUT,
        }
    }

    /// Gives every shard a reader connection of its own to `redis_url`, used only by
    /// [`Queue::read_new`]. Connections open on first use (a worker opens one per shard it reads)
    /// and reconnect by themselves, like [`crate::kv::connect_lazy`]'s. Fails only for an
    /// unusable URL.
    pub fn with_blocking_reads(mut self, redis_url: &SecretString) -> Result<Self, RedisError> {
        let readers = (0..self.shards).map(|_| connect_lazy(redis_url)).collect::<Result<Vec<_>, _>>()?;
        self.readers = Some(readers.into());
        Ok(self)
    }

    /// This queue sending its commands on `conn` instead, with a batcher of its own: for a
    /// runtime that should not wake another one's tasks for each command (the HTTP threads).
    pub fn on_connection(&self, conn: ConnectionManager) -> Self {
        Self { conn, adds: Arc::default(), ..self.clone() }
    }

    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout;
        self
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The connection the queue sends its (non-blocking) commands on; the leases share it.
    pub fn connection(&self) -> &ConnectionManager {
        &self.conn
    }

    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// `{prefix}:inbound:{shard}`.
    pub fn stream_key(&self, shard: u32) -> String {
        stream_key_of(&self.prefix, shard)
    }

    /// [`Queue::stream_key`] of a shard of this queue, shared.
    fn shared_stream_key(&self, shard: u32) -> Arc<str> {
        match self.stream_keys.get(shard as usize) {
            Some(key) => Arc::clone(key),
            None => Arc::from(stream_key_of(&self.prefix, shard)),
        }
    }

    /// `{prefix}:dead`.
    pub fn dead_letter_key(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    /// `{prefix}:attempts`.
    pub fn attempts_key(&self) -> String {
        format!("{}:attempts", self.prefix)
    }

    /// Adds each event to its shard's stream, in the order given, in one pipelined round trip,
    /// and returns one job per event (same order). Never trims a stream: unprocessed work is not
    /// dropped to save memory.
    ///
    /// All or error: on an error some events may have been added anyway, and the caller spools
    /// the whole batch to PostgreSQL. Such an event then exists twice; the worker's dedupe on
    /// (channel, wamid) in PostgreSQL processes it once.
    pub async fn enqueue(&self, events: &[QueuedEvent]) -> Result<Vec<AcceptedJob>, QueueError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut adds = Vec::with_capacity(events.len());
        let mut shards = Vec::with_capacity(events.len());
        for event in events {
            let shard = event.shard(self.shards);
            let json = serde_json::to_string(event).map_err(|e| QueueError::Encode(e.to_string()))?;
            adds.push((self.shared_stream_key(shard), json));
            shards.push(shard);
        }
        let batcher = {
            let mut slot = self.adds.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(running) if !running.tx.is_closed() => running.clone(),
                _ => slot.insert(AddBatcher::start(self.conn.clone())).clone(),
            }
        };
        let ids = batcher.add(adds, self.op_timeout).await?;
        if ids.len() != events.len() {
            return Err(QueueError::Reply {
                op: "XADD",
                message: format!("{} ids for {} events", ids.len(), events.len()),
            });
        }
        Ok(shards
            .into_iter()
            .zip(ids)
            .map(|(shard, id)| AcceptedJob { job_id: job_id(shard, &id), durable_in: "redis", shard })
            .collect())
    }

    /// Creates the consumer group of a shard (and its stream) if missing; idempotent. The group
    /// starts at the beginning of the stream, so entries added before it existed are read too.
    pub async fn ensure_group(&self, shard: u32) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let created: RedisResult<()> = bounded_raw(
            "XGROUP CREATE",
            self.op_timeout,
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.stream_key(shard))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn),
        )
        .await?;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(failed("XGROUP CREATE", &e).into()),
        }
    }

    /// [`Queue::ensure_group`] for every shard.
    pub async fn ensure_groups(&self) -> Result<(), QueueError> {
        for shard in 0..self.shards {
            self.ensure_group(shard).await?;
        }
        Ok(())
    }

    /// Entries of the shard never delivered to any consumer, oldest first, at most `count`;
    /// now pending for `consumer`. Waits up to `block` (capped at [`MAX_BLOCK`]) for one to
    /// arrive; an empty result means none came. Recreates a missing consumer group (Redis
    /// restarted without persistence) instead of failing.
    ///
    /// `consumer` names this worker process in the group and must be unique per process run (a
    /// restarted worker is a new consumer; [`Queue::claim_pending`] recovers what the old one
    /// held). Run one read per shard at a time: with [`Queue::with_blocking_reads`], two reads of
    /// the same shard would wait one after the other on its connection.
    pub async fn read_new(
        &self,
        shard: u32,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>, QueueError> {
        let block = block.min(MAX_BLOCK);
        let reader = self.readers.as_ref().and_then(|r| r.get(shard as usize));
        let Some(reader) = reader else {
            return self.poll_new(shard, consumer, count, block).await;
        };
        match self.xreadgroup(reader, shard, consumer, count, Some(block)).await? {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group(shard).await?;
                self.xreadgroup(reader, shard, consumer, count, Some(block))
                    .await?
                    .map_err(|e| failed("XREADGROUP", &e).into())
            }
            other => other.map_err(|e| failed("XREADGROUP", &e).into()),
        }
    }

    /// The blocking read emulated with non-blocking reads on the shared connection.
    async fn poll_new(
        &self,
        shard: u32,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>, QueueError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let read = match self.xreadgroup(&self.conn, shard, consumer, count, None).await? {
                Err(e) if e.code() == Some("NOGROUP") => {
                    self.ensure_group(shard).await?;
                    Vec::new()
                }
                other => other.map_err(|e| failed("XREADGROUP", &e))?,
            };
            let now = tokio::time::Instant::now();
            if !read.is_empty() || now >= deadline {
                return Ok(read);
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// One XREADGROUP; the outer error is the timeout, the inner one Redis's answer.
    async fn xreadgroup(
        &self,
        conn: &ConnectionManager,
        shard: u32,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<RedisResult<Vec<QueueEntry>>, QueueError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(GROUP).arg(consumer).arg("COUNT").arg(count.max(1));
        if let Some(block) = block {
            // BLOCK 0 would mean "forever".
            cmd.arg("BLOCK").arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        cmd.arg("STREAMS").arg(self.stream_key(shard)).arg(">");
        let timeout = self.op_timeout + block.unwrap_or_default();
        // Sent once more on a connection Redis had closed (a restart), rather than a failed read
        // and the reader's pause. Entries a broken read had delivered stay pending for this
        // consumer, as after any failed read.
        let reply: RedisResult<Option<StreamReadReply>> = bounded_raw_reconnecting("XREADGROUP", timeout, || {
            let (cmd, mut conn) = (&cmd, conn.clone());
            async move { cmd.query_async(&mut conn).await }
        })
        .await?;
        Ok(reply.map(|reply| {
            reply
                .map(|r| r.keys)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|k| k.ids)
                .map(|id| entry(shard, id, true))
                .collect()
        }))
    }

    /// Takes over the entries of the shard that are pending for other consumers — delivered to a
    /// worker that no longer holds the shard — and returns them (oldest first, at most `count`),
    /// now pending for `consumer`. Call it after acquiring a shard's lease, before reading new
    /// entries: the lease guarantees the previous holder is gone, so no idle time is required.
    ///
    /// Entries already pending for `consumer` itself are left alone, so calling it again is
    /// harmless. Once no foreign entry is left, consumers of the group without pending entries are
    /// removed, so dead workers do not accumulate in the group.
    pub async fn claim_pending(&self, shard: u32, consumer: &str, count: usize) -> Result<Vec<QueueEntry>, QueueError> {
        const PAGE: usize = 100;
        let key = self.stream_key(shard);
        let mut conn = self.conn.clone();
        let mut foreign: Vec<String> = Vec::new();
        let mut start = "-".to_owned();
        let mut exhausted = false;
        while foreign.len() < count {
            let page: RedisResult<StreamPendingCountReply> = bounded_raw(
                "XPENDING",
                self.op_timeout,
                redis::cmd("XPENDING").arg(&key).arg(GROUP).arg(&start).arg("+").arg(PAGE).query_async(&mut conn),
            )
            .await?;
            let page = match page {
                Ok(page) => page,
                // No group yet: nothing can be pending.
                Err(e) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
                Err(e) => return Err(failed("XPENDING", &e).into()),
            };
            let Some(last) = page.ids.last() else {
                exhausted = true;
                break;
            };
            start = format!("({}", last.id);
            let full = page.ids.len() == PAGE;
            foreign.extend(page.ids.into_iter().filter(|p| p.consumer != consumer).map(|p| p.id));
            if !full {
                exhausted = true;
                break;
            }
        }
        foreign.truncate(count);

        let mut claimed = Vec::new();
        if !foreign.is_empty() {
            let reply: StreamClaimReply = bounded(
                "XCLAIM",
                self.op_timeout,
                redis::cmd("XCLAIM").arg(&key).arg(GROUP).arg(consumer).arg(0).arg(&foreign).query_async(&mut conn),
            )
            .await?;
            claimed = reply.ids.into_iter().map(|id| entry(shard, id, false)).collect();
        }
        if exhausted {
            self.forget_idle_consumers(&key, consumer).await?;
        }
        Ok(claimed)
    }

    async fn forget_idle_consumers(&self, key: &str, keep: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let info: StreamInfoConsumersReply = bounded(
            "XINFO CONSUMERS",
            self.op_timeout,
            redis::cmd("XINFO").arg("CONSUMERS").arg(key).arg(GROUP).query_async(&mut conn),
        )
        .await?;
        let idle: Vec<String> =
            info.consumers.into_iter().filter(|c| c.pending == 0 && c.name != keep).map(|c| c.name).collect();
        if idle.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for name in &idle {
            pipe.cmd("XGROUP").arg("DELCONSUMER").arg(key).arg(GROUP).arg(name).ignore();
        }
        bounded("XGROUP DELCONSUMER", self.op_timeout, pipe.query_async::<()>(&mut conn)).await?;
        Ok(())
    }

    /// Marks the entry processed: acknowledged, deleted from its stream (processed entries need
    /// not stay, and the stream length is then the backlog) and its attempt count forgotten — in
    /// one transaction. Acking an entry twice is harmless.
    pub async fn ack(&self, entry: &QueueEntry) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.finish(&mut pipe, entry);
        // Twice is harmless (see above); failed, the job would run again once reclaimed.
        bounded_reconnecting("ack", self.op_timeout, || {
            let (pipe, mut conn) = (&pipe, self.conn.clone());
            async move { pipe.query_async::<()>(&mut conn).await }
        })
        .await?;
        Ok(())
    }

    fn finish(&self, pipe: &mut redis::Pipeline, entry: &QueueEntry) {
        let key = self.stream_key(entry.shard);
        pipe.cmd("XACK").arg(&key).arg(GROUP).arg(&entry.entry_id).ignore();
        pipe.cmd("XDEL").arg(&key).arg(&entry.entry_id).ignore();
        pipe.cmd("HDEL").arg(self.attempts_key()).arg(&entry.job_id).ignore();
    }

    /// The number of the attempt about to start at the entry's job: 1 for a newly read entry
    /// (no Redis call: every message's first attempt costs nothing here), else one more than the
    /// attempts counted so far. Kept in Redis, so the count survives worker restarts and takeovers.
    ///
    /// The first attempt is never written down: when the count is absent, an entry that is not
    /// newly read (a retry, or one claimed from a dead consumer) is at least at its second attempt.
    /// An entry claimed from a consumer that died before starting it thus counts one attempt it
    /// never had — erring towards the dead-letter stream, never towards retrying forever.
    pub async fn begin_attempt(&self, entry: &QueueEntry) -> Result<u32, QueueError> {
        if entry.first_delivery {
            return Ok(1);
        }
        self.count_attempt(entry).await
    }

    /// [`Queue::begin_attempt`] for a retry of an entry already being processed by this worker.
    pub async fn begin_retry(&self, entry: &QueueEntry) -> Result<u32, QueueError> {
        self.count_attempt(entry).await
    }

    async fn count_attempt(&self, entry: &QueueEntry) -> Result<u32, QueueError> {
        let mut conn = self.conn.clone();
        let mut invocation = NEXT_ATTEMPT.key(self.attempts_key());
        invocation.arg(&entry.job_id);
        let n: i64 = bounded("next attempt", self.op_timeout, invocation.invoke_async(&mut conn)).await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Gives the job up: copies the entry to the dead-letter stream with `error` (phone numbers
    /// masked, cut to 2,000 characters), `attempts` and the time, then acks it — in one transaction,
    /// so the entry is never both lost and acked nor both dead and pending.
    pub async fn dead_letter(&self, entry: &QueueEntry, error: &str, attempts: u32) -> Result<(), QueueError> {
        let error: String = mask_phones_in(error).chars().take(MAX_ERROR_CHARS).collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let xadd = pipe
            .cmd("XADD")
            .arg(self.dead_letter_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_LETTER_MAXLEN)
            .arg("*")
            .arg("job_id")
            .arg(&entry.job_id)
            .arg("shard")
            .arg(entry.shard)
            .arg("entry_id")
            .arg(&entry.entry_id)
            .arg("error")
            .arg(&error)
            .arg("attempts")
            .arg(attempts)
            .arg("failed_at")
            .arg(Utc::now().to_rfc3339());
        if let Some(payload) = &entry.payload {
            xadd.arg(EVENT_FIELD).arg(payload);
        }
        xadd.ignore();
        self.finish(&mut pipe, entry);
        let mut conn = self.conn.clone();
        bounded("dead_letter", self.op_timeout, pipe.query_async::<()>(&mut conn)).await?;
        Ok(())
    }

    /// The oldest `count` entries of the dead-letter stream (for operators and tests).
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = bounded(
            "XRANGE",
            self.op_timeout,
            redis::cmd("XRANGE")
                .arg(self.dead_letter_key())
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut conn),
        )
        .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|id| {
                let payload: Option<String> = id.get(EVENT_FIELD);
                DeadLetter {
                    job_id: id.get("job_id").unwrap_or_default(),
                    shard: id.get("shard").unwrap_or_default(),
                    entry_id: id.get("entry_id").unwrap_or_default(),
                    error: id.get("error").unwrap_or_default(),
                    attempts: id.get("attempts").unwrap_or_default(),
                    failed_at: id
                        .get::<String>("failed_at")
                        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                        .map(|t| t.with_timezone(&Utc)),
                    event: decode(payload.as_deref()),
                    payload,
                    dead_id: id.id,
                }
            })
            .collect())
    }

    /// Entries not yet processed across all shards: waiting or in progress (acked entries are
    /// deleted, so this is the sum of the stream lengths). For `/ready`, metrics and tests.
    pub async fn backlog(&self) -> Result<u64, QueueError> {
        let mut pipe = redis::pipe();
        for shard in 0..self.shards {
            pipe.cmd("XLEN").arg(self.stream_key(shard));
        }
        let mut conn = self.conn.clone();
        let lengths: Vec<u64> = bounded("XLEN", self.op_timeout, pipe.query_async(&mut conn)).await?;
        Ok(lengths.into_iter().sum())
    }
}

fn job_id(shard: u32, entry_id: &str) -> String {
    format!("stream:{shard}:{entry_id}")
}

fn entry(shard: u32, id: StreamId, first_delivery: bool) -> QueueEntry {
    let payload: Option<String> = id.get(EVENT_FIELD);
    QueueEntry {
        shard,
        job_id: job_id(shard, &id.id),
        event: decode(payload.as_deref()),
        payload,
        entry_id: id.id,
        first_delivery,
    }
}

/// The event of an entry. A decoding error may quote a piece of the payload: numbers masked.
fn decode(payload: Option<&str>) -> Result<QueuedEvent, String> {
    match payload {
        Some(json) => serde_json::from_str(json).map_err(|e| mask_phones_in(&format!("undecodable event: {e}"))),
        None => Err(format!("the entry has no `{EVENT_FIELD}` field")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::Utc;

    use super::*;
    use crate::{
        kv::{
            connect_lazy,
            tests::{OwnRedis, SHARED_REDIS, delete_prefix, shared_redis, test_prefix},
        },
        queue::{InboundMessageEvent, QueuedEvent},
    };

    pub(crate) fn message(from: &str, wamid: &str, text: &str) -> QueuedEvent {
        QueuedEvent::Message(InboundMessageEvent {
            phone_number_id: "PHONE_NUMBER_ID".into(),
            provider_message_id: wamid.into(),
            from: from.into(),
            contact_name: None,
            timestamp: 1_700_000_000,
            message_type: "text".into(),
            text: Some(text.into()),
            received_at: Utc::now(),
            raw: serde_json::json!({}).into(),
        })
    }

    fn wamid(entry: &QueueEntry) -> String {
        entry.event.as_ref().map(|e| e.provider_message_id().to_owned()).unwrap_or_default()
    }

    async fn queue(shards: u32) -> (Queue, String) {
        let prefix = test_prefix();
        (Queue::new(shared_redis().await, prefix.clone(), shards), prefix)
    }

    async fn raw_xadd(queue: &Queue, shard: u32, fields: &[(&str, &str)]) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(queue.stream_key(shard)).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        let _: String = cmd.query_async(&mut queue.connection().clone()).await.unwrap();
    }

    #[tokio::test]
    async fn an_enqueue_after_a_redis_restart_goes_through_on_a_new_connection() {
        let mut redis = OwnRedis::start().await;
        let queue = Queue::new(connect_lazy(&redis.url()).unwrap(), "parley", 1);
        queue.enqueue(&[message("33612345678", "wamid.before", "hi")]).await.unwrap();

        // Redis restarts while the connection is idle: the connection held is now closed.
        redis.stop().await;
        redis.restart().await;
        let jobs = queue.enqueue(&[message("33612345678", "wamid.after", "hi")]).await;

        let jobs = jobs.expect("the first enqueue after the restart must reconnect, not fail");
        assert_eq!(jobs[0].durable_in, "redis");
        assert_eq!(queue.backlog().await.unwrap(), 1, "the restarted Redis holds the new entry, once");
        redis.stop().await;
    }

    #[tokio::test]
    async fn a_blocking_read_after_a_redis_restart_goes_through_on_a_new_connection() {
        let mut redis = OwnRedis::start().await;
        let queue =
            Queue::new(connect_lazy(&redis.url()).unwrap(), "parley", 1).with_blocking_reads(&redis.url()).unwrap();
        queue.ensure_group(0).await.unwrap();
        queue.enqueue(&[message("33612345678", "wamid.before", "hi")]).await.unwrap();
        assert_eq!(queue.read_new(0, "w1", 10, Duration::from_millis(10)).await.unwrap().len(), 1);

        // Redis restarts (empty) while the reader's connection is idle.
        redis.stop().await;
        redis.restart().await;
        queue.enqueue(&[message("33612345678", "wamid.after", "hi")]).await.unwrap();
        let read = queue.read_new(0, "w1", 10, Duration::from_millis(10)).await;

        let read = read.expect("the first read after the restart must reconnect, not fail");
        assert_eq!(read.iter().map(wamid).collect::<Vec<_>>(), ["wamid.after"]);
        redis.stop().await;
    }

    #[tokio::test]
    async fn a_shards_entries_are_read_in_order_and_leave_the_backlog_once_acked() {
        let (queue, prefix) = queue(1).await;
        queue.ensure_group(0).await.unwrap();
        let events: Vec<_> = (1..=3).map(|i| message("33612345678", &format!("wamid.{i}"), "hi")).collect();

        let jobs = queue.enqueue(&events).await.unwrap();
        assert_eq!(queue.backlog().await.unwrap(), 3);
        let read = queue.read_new(0, "w1", 10, Duration::from_millis(10)).await.unwrap();

        assert_eq!(read.iter().map(wamid).collect::<Vec<_>>(), ["wamid.1", "wamid.2", "wamid.3"]);
        assert_eq!(
            read.iter().map(|e| e.job_id.clone()).collect::<Vec<_>>(),
            jobs.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>()
        );
        assert!(jobs.iter().all(|j| j.durable_in == "redis" && j.job_id.starts_with("stream:0:")));
        assert_eq!(read[0].event.as_ref().unwrap(), &events[0]);

        for entry in &read {
            queue.ack(entry).await.unwrap();
        }
        queue.ack(&read[0]).await.unwrap();
        assert_eq!(queue.backlog().await.unwrap(), 0);
        assert!(queue.read_new(0, "w1", 10, Duration::from_millis(10)).await.unwrap().is_empty());
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn one_conversations_events_always_land_in_one_shard_in_arrival_order() {
        let (queue, prefix) = queue(8).await;
        let events: Vec<_> = (0..10)
            .flat_map(|i| {
                [message("33611111111", &format!("a.{i}"), "a"), message("33622222222", &format!("b.{i}"), "b")]
            })
            .collect();

        let jobs = queue.enqueue(&events).await.unwrap();

        let shard_a = jobs[0].shard;
        assert!(jobs.iter().step_by(2).all(|j| j.shard == shard_a));
        assert!(jobs.iter().skip(1).step_by(2).all(|j| j.shard == jobs[1].shard));
        let read = queue.read_new(shard_a, "w1", 100, Duration::from_millis(10)).await.unwrap();
        let a: Vec<String> = read.iter().map(wamid).filter(|w| w.starts_with("a.")).collect();
        assert_eq!(a, (0..10).map(|i| format!("a.{i}")).collect::<Vec<_>>());
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_enqueues_sent_together_each_get_the_ids_of_their_own_events() {
        let (queue, prefix) = queue(1).await;
        queue.ensure_group(0).await.unwrap();
        let calls: Vec<_> = (0..50)
            .map(|c| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    let events: Vec<_> =
                        (0..2).map(|i| message("33612345678", &format!("wamid.{c}.{i}"), "hi")).collect();
                    let jobs = queue.enqueue(&events).await.unwrap();
                    (c, jobs)
                })
            })
            .collect();
        let mut returned = Vec::new();
        for call in calls {
            returned.push(call.await.unwrap());
        }

        let read = queue.read_new(0, "w1", 200, Duration::from_millis(10)).await.unwrap();
        assert_eq!(read.len(), 100);
        let by_job: std::collections::HashMap<String, String> =
            read.iter().map(|e| (e.job_id.clone(), wamid(e))).collect();
        for (c, jobs) in returned {
            let wamids: Vec<&str> = jobs.iter().map(|j| by_job[&j.job_id].as_str()).collect();
            assert_eq!(wamids, [format!("wamid.{c}.0"), format!("wamid.{c}.1")]);
        }
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[test]
    fn a_queue_keeps_adding_after_the_runtime_of_its_first_add_is_gone() {
        // The connection's own task runs on a runtime that stays; the adds come from two others.
        let stays = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (queue, prefix) = stays.block_on(queue(1));
        let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let first = rt().block_on(queue.enqueue(&[message("33612345678", "wamid.a", "hi")])).unwrap();
        let second = rt().block_on(queue.enqueue(&[message("33612345678", "wamid.b", "hi")])).unwrap();
        assert_ne!(first[0].job_id, second[0].job_id);
        stays.block_on(delete_prefix(queue.connection(), &prefix));
    }

    #[tokio::test]
    async fn entries_added_before_the_group_existed_are_not_skipped() {
        let (queue, prefix) = queue(1).await;
        queue.enqueue(&[message("33612345678", "wamid.early", "hi")]).await.unwrap();

        // No ensure_group: the read creates the missing group itself, from the stream's start.
        let read = queue.read_new(0, "w1", 10, Duration::from_millis(10)).await.unwrap();

        assert_eq!(read.iter().map(wamid).collect::<Vec<_>>(), ["wamid.early"]);
        queue.ensure_group(0).await.unwrap();
        queue.ensure_groups().await.unwrap();
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn blocking_reads_of_every_shard_wake_up_for_their_new_entries() {
        let (queue, prefix) = queue(2).await;
        let queue = queue.with_blocking_reads(&SecretString::from(SHARED_REDIS)).unwrap();
        queue.ensure_groups().await.unwrap();
        assert!(queue.read_new(0, "w1", 10, Duration::from_millis(20)).await.unwrap().is_empty());

        // One waiting read per shard, side by side, as the worker runs them.
        let waiting: Vec<_> = (0..2)
            .map(|shard| {
                let reader = queue.clone();
                tokio::spawn(async move { reader.read_new(shard, "w1", 10, Duration::from_secs(5)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let events: Vec<_> =
            (0..20).map(|i| message(&format!("336000000{i:02}"), &format!("wamid.{i}"), "hi")).collect();
        let jobs = queue.enqueue(&events).await.unwrap();
        assert!(jobs.iter().any(|j| j.shard == 0) && jobs.iter().any(|j| j.shard == 1), "{jobs:?}");

        for (shard, read) in waiting.into_iter().enumerate() {
            let read = read.await.unwrap().unwrap();
            assert!(!read.is_empty(), "the read of shard {shard} woke up");
            assert!(read.iter().all(|e| e.shard == shard as u32));
        }
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn a_second_worker_takes_over_the_first_workers_pending_entries() {
        let (queue, prefix) = queue(1).await;
        queue.ensure_group(0).await.unwrap();
        let events: Vec<_> = (1..=3).map(|i| message("33612345678", &format!("wamid.{i}"), "hi")).collect();
        queue.enqueue(&events).await.unwrap();
        let first = queue.read_new(0, "worker-1", 10, Duration::from_millis(10)).await.unwrap();
        queue.ack(&first[0]).await.unwrap();
        // worker-1 dies holding wamid.2 and wamid.3; worker-2 acquires the shard's lease.

        let taken = queue.claim_pending(0, "worker-2", 100).await.unwrap();

        assert_eq!(taken.iter().map(wamid).collect::<Vec<_>>(), ["wamid.2", "wamid.3"]);
        assert_eq!(taken[0].job_id, first[1].job_id, "the job keeps its id across the takeover");
        assert!(queue.claim_pending(0, "worker-2", 100).await.unwrap().is_empty(), "its own entries are left alone");
        let consumers: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(queue.stream_key(0))
            .arg(GROUP)
            .query_async(&mut queue.connection().clone())
            .await
            .unwrap();
        let names: Vec<_> = consumers.consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["worker-2"], "the dead worker is forgotten");
        for entry in &taken {
            queue.ack(entry).await.unwrap();
        }
        assert_eq!(queue.backlog().await.unwrap(), 0);
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn a_large_takeover_comes_in_batches_oldest_first_without_repeats() {
        let (queue, prefix) = queue(1).await;
        let events: Vec<_> = (0..150).map(|i| message("33612345678", &format!("wamid.{i:03}"), "hi")).collect();
        queue.enqueue(&events).await.unwrap();
        let dead_workers = queue.read_new(0, "worker-1", 120, Duration::from_millis(10)).await.unwrap();
        let own = queue.read_new(0, "worker-2", 30, Duration::from_millis(10)).await.unwrap();
        assert_eq!((dead_workers.len(), own.len()), (120, 30));

        let first = queue.claim_pending(0, "worker-2", 50).await.unwrap();
        let rest = queue.claim_pending(0, "worker-2", 1000).await.unwrap();

        let taken: Vec<String> = first.iter().chain(&rest).map(wamid).collect();
        assert_eq!(taken, (0..120).map(|i| format!("wamid.{i:03}")).collect::<Vec<_>>());
        assert!(queue.claim_pending(0, "worker-2", 1000).await.unwrap().is_empty());
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn claiming_a_shard_nobody_used_finds_nothing() {
        let (queue, prefix) = queue(1).await;
        assert!(queue.claim_pending(0, "w1", 10).await.unwrap().is_empty());
        queue.ensure_group(0).await.unwrap();
        assert!(queue.claim_pending(0, "w1", 10).await.unwrap().is_empty());
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn attempts_are_counted_across_worker_restarts_and_forgotten_once_acked() {
        let (queue, prefix) = queue(1).await;
        queue.enqueue(&[message("33612345678", "wamid.1", "hi")]).await.unwrap();
        let entry = queue.read_new(0, "w1", 1, Duration::from_millis(10)).await.unwrap().remove(0);

        assert_eq!(queue.begin_attempt(&entry).await.unwrap(), 1);
        assert_eq!(queue.begin_retry(&entry).await.unwrap(), 2);
        let restarted = Queue::new(shared_redis().await, prefix.clone(), 1);
        let taken = restarted.claim_pending(0, "w2", 10).await.unwrap().remove(0);
        assert!(!taken.first_delivery);
        assert_eq!(restarted.begin_attempt(&taken).await.unwrap(), 3);

        restarted.ack(&taken).await.unwrap();
        let left: bool = redis::cmd("HEXISTS")
            .arg(queue.attempts_key())
            .arg(&entry.job_id)
            .query_async(&mut queue.connection().clone())
            .await
            .unwrap();
        assert!(!left);
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn a_first_attempt_costs_no_redis_call_and_a_takeover_after_it_counts_as_the_second() {
        let (queue, prefix) = queue(1).await;
        queue.enqueue(&[message("33612345678", "wamid.1", "hi")]).await.unwrap();
        let entry = queue.read_new(0, "w1", 1, Duration::from_millis(10)).await.unwrap().remove(0);

        assert!(entry.first_delivery);
        assert_eq!(queue.begin_attempt(&entry).await.unwrap(), 1);
        let written: bool = redis::cmd("HEXISTS")
            .arg(queue.attempts_key())
            .arg(&entry.job_id)
            .query_async(&mut queue.connection().clone())
            .await
            .unwrap();
        assert!(!written, "the first attempt is not written down");
        // w1 dies during its first attempt; w2 takes the entry over.
        let taken = queue.claim_pending(0, "w2", 10).await.unwrap().remove(0);
        assert_eq!(queue.begin_attempt(&taken).await.unwrap(), 2);
        assert_eq!(queue.begin_retry(&taken).await.unwrap(), 3);
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn a_dead_lettered_entry_leaves_its_stream_with_its_error_and_attempts() {
        let (queue, prefix) = queue(1).await;
        let event = message("33612345678", "wamid.doomed", "hi");
        queue.enqueue(std::slice::from_ref(&event)).await.unwrap();
        let entry = queue.read_new(0, "w1", 1, Duration::from_millis(10)).await.unwrap().remove(0);

        queue.dead_letter(&entry, "llm: 500 while answering +33612345678", 5).await.unwrap();

        let dead = queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].job_id, entry.job_id);
        assert_eq!(dead[0].entry_id, entry.entry_id);
        assert_eq!(dead[0].attempts, 5);
        assert!(dead[0].error.starts_with("llm: 500 while answering"), "{}", dead[0].error);
        assert!(!dead[0].error.contains("33612345678"), "numbers are masked: {}", dead[0].error);
        assert_eq!(dead[0].event.as_ref().unwrap(), &event);
        assert!(dead[0].failed_at.is_some());
        assert_eq!(queue.backlog().await.unwrap(), 0);
        assert!(queue.claim_pending(0, "w2", 10).await.unwrap().is_empty(), "nothing left pending");
        delete_prefix(queue.connection(), &prefix).await;
    }

    #[tokio::test]
    async fn an_undecodable_entry_comes_back_as_an_error_and_can_be_dead_lettered() {
        let (queue, prefix) = queue(1).await;
        raw_xadd(&queue, 0, &[("event", "{not json")]).await;
        raw_xadd(&queue, 0, &[("something", "else")]).await;

        let read = queue.read_new(0, "w1", 10, Duration::from_millis(10)).await.unwrap();

        assert_eq!(read.len(), 2);
        assert!(read.iter().all(|e| e.event.is_err()), "{read:?}");
        for entry in &read {
            let reason = entry.event.as_ref().unwrap_err();
            queue.dead_letter(entry, reason, 1).await.unwrap();
        }
        let dead = queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 2);
        assert_eq!(dead[0].payload.as_deref(), Some("{not json"), "the payload is kept for inspection");
        assert!(dead[0].error.starts_with("undecodable event"), "{}", dead[0].error);
        assert_eq!(queue.backlog().await.unwrap(), 0);
        delete_prefix(queue.connection(), &prefix).await;
    }
}
