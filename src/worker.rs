//! The worker: takes shards through leases, reads their streams (and the PostgreSQL spool while
//! Redis is down), and runs each message through the pipeline of its tenant's tier — one
//! conversation's messages in arrival order and never concurrently, many conversations at once.
//! Failed jobs are retried with backoff inside their conversation's lane, then dead-lettered.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{TimeZone, Utc};
use engine::{
    events::{Event, EventSink, names},
    ids::{JobId, PhoneNumber, ProviderMessageId},
    masking::mask_phone,
    message::{InboundText, JobInfo, Message},
    reload::Reloader,
    runtime::Outcome,
};
use tokio::{
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    knowledge::ObjectStorage,
    providers::whatsapp::{
        media::MediaSource,
        media_intake::{MediaIntake, MediaTurn},
    },
    queue::{
        InboundMessageEvent, QueuedEvent, StatusEvent,
        leases::{Leases, fair_share},
        streams::{Queue, QueueEntry},
    },
    store::{InboundOutcome, NewInbound, PgStore, SpoolRow},
};

/// How a worker behaves; built from the settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub id: String,
    pub concurrency: usize,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub lease_ttl: Duration,
    /// How long a read blocks waiting for new entries.
    pub read_block: Duration,
    /// How often the spool is polled.
    pub spool_poll: Duration,
    /// How long shutdown waits for jobs in flight.
    pub drain_timeout: Duration,
}

impl WorkerConfig {
    pub fn new(id: impl Into<String>, concurrency: usize, max_attempts: u32, base: Duration, max: Duration) -> Self {
        Self {
            id: id.into(),
            concurrency,
            max_attempts,
            backoff_base: base,
            backoff_max: max,
            lease_ttl: Duration::from_secs(15),
            read_block: Duration::from_millis(500),
            spool_poll: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
        }
    }

    /// The delay before attempt `next` (2, 3, …): exponential from the base, capped, with jitter.
    fn backoff(&self, next: u32) -> Duration {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.backoff_base)
            .with_max_delay(self.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        delays.nth(next.saturating_sub(2) as usize).unwrap_or(self.backoff_max)
    }
}

/// What the worker needs from the rest of the service.
#[derive(Clone)]
pub struct WorkerDeps {
    pub store: PgStore,
    pub queue: Queue,
    pub leases: Leases,
    pub reloader: Arc<Reloader>,
    pub events: Arc<dyn EventSink>,
    /// The provider's media API, for inbound images, voice messages, videos, documents and
    /// stickers; `None` with the sandbox (answered from their caption or a placeholder).
    pub media: Option<Arc<dyn MediaSource>>,
    /// Where fetched media files are kept.
    pub media_storage: Arc<dyn ObjectStorage>,
}

/// Where a job came from, to finish it in the right place.
enum Source {
    Stream(QueueEntry),
    Spool(SpoolRow),
}

struct Job {
    source: Source,
    job_id: String,
    event: QueuedEvent,
    /// Held while the job is queued or running: bounds what a worker takes on.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// For a stream job: counts it against its shard while it is queued or running.
    _shard: Option<ShardJob>,
}

/// One job counted in [`Worker::shard_jobs`] until dropped.
struct ShardJob {
    counts: Arc<[AtomicUsize]>,
    shard: usize,
}

impl ShardJob {
    fn new(counts: &Arc<[AtomicUsize]>, shard: u32) -> Option<Self> {
        let shard = shard as usize;
        counts.get(shard)?.fetch_add(1, Ordering::SeqCst);
        Some(Self { counts: Arc::clone(counts), shard })
    }
}

impl Drop for ShardJob {
    fn drop(&mut self) {
        if let Some(count) = self.counts.get(self.shard) {
            count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The reader of a shard this worker holds.
struct ShardReader {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A shard given up (rebalance, shutdown) whose lease is kept until its reader has stopped and
/// its jobs are finished, or until `deadline`: released earlier, the next holder would claim the
/// entries still queued or running here and run them a second time, side by side.
struct DrainingShard {
    reader: JoinHandle<()>,
    deadline: Instant,
}

/// How one attempt of a job ended.
enum Attempt {
    Done,
    Retry { error: String, stage: Option<String> },
    Fail { error: String, stage: Option<String> },
}

/// A running worker. Cheap to clone; every clone drives the same worker.
#[derive(Clone)]
pub struct Worker {
    config: Arc<WorkerConfig>,
    deps: WorkerDeps,
    /// Jobs waiting per conversation; a key is present while its lane runs.
    lanes: Arc<Mutex<HashMap<String, VecDeque<Job>>>>,
    /// Jobs accepted but not finished (queued in lanes or running).
    slots: Arc<Semaphore>,
    running: Arc<Semaphore>,
    /// Stream jobs queued or running, per shard.
    shard_jobs: Arc<[AtomicUsize]>,
    tasks: tokio_util::task::TaskTracker,
}

impl Worker {
    pub fn new(config: WorkerConfig, deps: WorkerDeps) -> Self {
        let concurrency = config.concurrency.max(1);
        let shard_jobs = (0..deps.queue.shards()).map(|_| AtomicUsize::new(0)).collect();
        Self {
            config: Arc::new(config),
            deps,
            lanes: Arc::default(),
            slots: Arc::new(Semaphore::new(concurrency * 4)),
            running: Arc::new(Semaphore::new(concurrency)),
            shard_jobs,
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Runs until `shutdown` is cancelled, then stops taking work, lets the jobs in flight finish
    /// (up to the drain timeout) while keeping the leases of their shards, releases its shards and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) {
        self.deps.events.emit(
            Event::info(names::WORKER_STARTED)
                .with("workerId", self.id())
                .with("concurrency", self.config.concurrency)
                .with("shards", self.deps.queue.shards()),
        );
        let mut background = JoinSet::new();
        background.spawn(self.clone().manage_shards(shutdown.clone()));
        background.spawn(self.clone().poll_spool(shutdown.clone()));
        shutdown.cancelled().await;
        let deadline = Instant::now() + self.config.drain_timeout;
        while background.join_next().await.is_some() {}
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait()).await.is_err() {
            tracing::warn!(worker = self.id(), "jobs still running after the drain timeout; they will be redelivered");
        }
        for shard in 0..self.deps.queue.shards() {
            let _ = self.deps.leases.release(shard, self.id()).await;
        }
        // Not counted as live any more: the others take their new share now, not after the TTL.
        let _ = self.deps.leases.retire(self.id()).await;
        self.deps.events.emit(Event::info(names::WORKER_STOPPED).with("workerId", self.id()));
    }

    /// Heartbeats, keeps the shards this worker owns, takes its fair share of free shards and
    /// gives back the extra, starting and stopping a reader per shard. A shard given back, or held
    /// at shutdown, stays leased until its jobs are finished (see [`DrainingShard`]); at shutdown
    /// this returns once every shard is released.
    async fn manage_shards(self, shutdown: CancellationToken) {
        let ttl = self.config.lease_ttl;
        let tick = ttl / 3;
        let shards = self.deps.queue.shards();
        let mut owned: HashMap<u32, ShardReader> = HashMap::new();
        let mut draining: HashMap<u32, DrainingShard> = HashMap::new();
        loop {
            let stopping = shutdown.is_cancelled();
            if stopping {
                let deadline = Instant::now() + self.config.drain_timeout;
                for (shard, reader) in owned.drain() {
                    reader.stop.cancel();
                    draining.insert(shard, DrainingShard { reader: reader.task, deadline });
                }
            }
            let _ = self.deps.leases.heartbeat(self.id(), ttl).await;
            // Renew what we hold; a shard we could not renew is no longer ours: stop reading it.
            let mut lost = Vec::new();
            for shard in owned.keys().copied().collect::<Vec<_>>() {
                if !matches!(self.deps.leases.renew(shard, self.id(), ttl).await, Ok(true)) {
                    lost.push(shard);
                }
            }
            for shard in lost {
                if let Some(reader) = owned.remove(&shard) {
                    reader.stop.cancel();
                    self.shard_event(names::SHARD_RELEASED, shard, "lease lost");
                }
            }
            for shard in draining.keys().copied().collect::<Vec<_>>() {
                let Some(d) = draining.get(&shard) else { continue };
                let drained = d.reader.is_finished() && self.jobs_of(shard) == 0;
                if drained || Instant::now() >= d.deadline {
                    draining.remove(&shard);
                    let _ = self.deps.leases.release(shard, self.id()).await;
                    self.shard_event(names::SHARD_RELEASED, shard, if stopping { "shutdown" } else { "rebalance" });
                } else if !matches!(self.deps.leases.renew(shard, self.id(), ttl).await, Ok(true)) {
                    draining.remove(&shard);
                    self.shard_event(names::SHARD_RELEASED, shard, "lease lost");
                }
            }
            if stopping {
                if draining.is_empty() {
                    break;
                }
                // Release each shard as soon as it is drained.
                tokio::time::sleep(tick.min(Duration::from_millis(100))).await;
                continue;
            }
            let live = self.deps.leases.live_workers().await.map(|w| w.len()).unwrap_or(1).max(1);
            let share = fair_share(shards, live);
            // Start from a worker-specific shard so that workers starting together spread out.
            let start = crate::queue::event::shard_of(self.id(), shards);
            for i in 0..shards {
                if owned.len() >= share {
                    break;
                }
                let shard = (start + i) % shards;
                if owned.contains_key(&shard) || draining.contains_key(&shard) {
                    continue;
                }
                if matches!(self.deps.leases.acquire(shard, self.id(), ttl).await, Ok(true)) {
                    let stop = shutdown.child_token();
                    let task = tokio::spawn(self.clone().read_shard(shard, stop.clone()));
                    owned.insert(shard, ShardReader { stop, task });
                    self.shard_event(names::SHARD_ACQUIRED, shard, "free");
                }
            }
            while owned.len() > share {
                let Some(&shard) = owned.keys().max() else { break };
                if let Some(reader) = owned.remove(&shard) {
                    reader.stop.cancel();
                    let deadline = Instant::now() + self.config.drain_timeout;
                    draining.insert(shard, DrainingShard { reader: reader.task, deadline });
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    fn jobs_of(&self, shard: u32) -> usize {
        self.shard_jobs.get(shard as usize).map_or(0, |n| n.load(Ordering::SeqCst))
    }

    fn shard_event(&self, name: &'static str, shard: u32, reason: &str) {
        self.deps
            .events
            .emit(Event::debug(name).with("workerId", self.id()).with("shard", shard).with("reason", reason));
    }

    /// Reads one shard: first the entries a previous owner left pending, then new ones.
    async fn read_shard(self, shard: u32, stop: CancellationToken) {
        let queue = &self.deps.queue;
        let mut group_ready = false;
        let mut reclaimed = false;
        while !stop.is_cancelled() {
            if !group_ready {
                group_ready = queue.ensure_group(shard).await.is_ok();
                if !group_ready {
                    self.pause(&stop, Duration::from_millis(500)).await;
                    continue;
                }
            }
            let room = self.slots.available_permits().min(64);
            if room == 0 {
                self.pause(&stop, Duration::from_millis(20)).await;
                continue;
            }
            let read = if reclaimed {
                queue.read_new(shard, self.id(), room, self.config.read_block).await
            } else {
                let pending = queue.claim_pending(shard, self.id(), room).await;
                if matches!(&pending, Ok(entries) if entries.len() < room) {
                    reclaimed = true;
                }
                pending
            };
            match read {
                Ok(entries) => {
                    for entry in entries {
                        self.accept_stream_entry(entry).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = self.id(), shard, error = %e, "cannot read the shard; retrying");
                    self.pause(&stop, Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn pause(&self, stop: &CancellationToken, d: Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    async fn accept_stream_entry(&self, entry: QueueEntry) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else { return };
        match entry.event.clone() {
            Ok(event) => {
                let job_id = entry.job_id.clone();
                let shard = ShardJob::new(&self.shard_jobs, entry.shard);
                self.dispatch(Job { source: Source::Stream(entry), job_id, event, _slot: slot, _shard: shard });
            }
            Err(reason) => {
                let error = format!("undecodable queue entry: {reason}");
                let _ = self.deps.queue.dead_letter(&entry, &error, 1).await;
                self.deps.events.emit(
                    Event::error(names::JOB_FAILED)
                        .with("jobId", &entry.job_id)
                        .with("error", &error)
                        .with("attempts", 1),
                );
            }
        }
    }

    /// Drains the spool (events accepted while Redis was down), straight from PostgreSQL.
    async fn poll_spool(self, shutdown: CancellationToken) {
        let lease = self.config.backoff_max + Duration::from_secs(60);
        loop {
            let room = self.slots.available_permits().min(64) as i64;
            let mut claimed = 0;
            if room > 0 {
                match self.deps.store.spool_claim(room, lease).await {
                    Ok(rows) => {
                        claimed = rows.len();
                        for row in rows {
                            let Ok(slot) = self.slots.clone().acquire_owned().await else { return };
                            let job_id = format!("spool:{}", row.id);
                            let event = row.event.clone();
                            self.dispatch(Job { source: Source::Spool(row), job_id, event, _slot: slot, _shard: None });
                        }
                    }
                    Err(e) => tracing::debug!(worker = self.id(), error = %e, "cannot poll the spool"),
                }
            }
            if claimed == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.config.spool_poll) => {}
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Queues the job behind the other jobs of its conversation, starting the lane if idle.
    fn dispatch(&self, job: Job) {
        let key = job.event.conversation_key();
        let start_lane = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            match lanes.get_mut(&key) {
                Some(queue) => {
                    queue.push_back(job);
                    false
                }
                None => {
                    lanes.insert(key.clone(), VecDeque::from([job]));
                    true
                }
            }
        };
        if start_lane {
            let me = self.clone();
            self.tasks.spawn(async move { me.run_lane(key).await });
        }
    }

    /// Runs a conversation's jobs one after the other until its queue is empty.
    async fn run_lane(self, key: String) {
        loop {
            let job = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
                match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(job) => job,
                    None => {
                        lanes.remove(&key);
                        return;
                    }
                }
            };
            let Ok(_running) = self.running.clone().acquire_owned().await else { return };
            self.run_job(job).await;
        }
    }

    /// Runs a job until it is done, dead-lettered, or — for spool rows — handed back for later.
    async fn run_job(&self, job: Job) {
        let mut attempt = match &job.source {
            Source::Stream(entry) => self.deps.queue.begin_attempt(entry).await.unwrap_or(1),
            Source::Spool(row) => u32::try_from(row.attempts).unwrap_or(0) + 1,
        };
        loop {
            let result = self.attempt(&job, attempt).await;
            match result {
                Attempt::Done => {
                    self.finish(&job).await;
                    return;
                }
                Attempt::Retry { error, stage } if attempt < self.config.max_attempts => {
                    let delay = self.config.backoff(attempt + 1);
                    self.job_event(Event::warn(names::JOB_RETRY), &job)
                        .with("attempt", attempt)
                        .with("maxAttempts", self.config.max_attempts)
                        .with("delayMs", u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                        .with("stage", &stage)
                        .with("error", &error)
                        .emit(&*self.deps.events);
                    if let Source::Spool(row) = &job.source {
                        // The spool keeps the row (and the conversation's later rows) until then.
                        let _ = self.deps.store.spool_retry(row.id, delay, &error).await;
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    attempt = match &job.source {
                        Source::Stream(entry) => self.deps.queue.begin_retry(entry).await.unwrap_or(attempt + 1),
                        Source::Spool(_) => attempt + 1,
                    };
                }
                Attempt::Retry { error, stage } | Attempt::Fail { error, stage } => {
                    self.job_event(Event::error(names::JOB_FAILED), &job)
                        .with("attempts", attempt)
                        .with("stage", &stage)
                        .with("error", &error)
                        .emit(&*self.deps.events);
                    match &job.source {
                        Source::Stream(entry) => {
                            let _ = self.deps.queue.dead_letter(entry, &error, attempt).await;
                        }
                        Source::Spool(row) => {
                            let _ = self.deps.store.spool_done(row.id).await;
                        }
                    }
                    return;
                }
            }
        }
    }

    async fn finish(&self, job: &Job) {
        let result = match &job.source {
            Source::Stream(entry) => self.deps.queue.ack(entry).await.map_err(|e| e.to_string()),
            Source::Spool(row) => self.deps.store.spool_done(row.id).await.map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            // The job ran; it will be delivered again and recognised as done (same job id).
            tracing::warn!(job = %job.job_id, error = %e, "job done but not acknowledged");
        }
    }

    fn job_event(&self, event: Event, job: &Job) -> JobEvent {
        JobEvent(
            event
                .with("jobId", &job.job_id)
                .with("providerMessageId", job.event.provider_message_id())
                .with("workerId", self.id()),
        )
    }

    async fn attempt(&self, job: &Job, attempt: u32) -> Attempt {
        match &job.event {
            QueuedEvent::Status(status) => self.apply_status(status).await,
            QueuedEvent::Message(message) => self.process_message(job, message, attempt).await,
        }
    }

    async fn apply_status(&self, status: &StatusEvent) -> Attempt {
        match self
            .deps
            .store
            .apply_status(
                &status.phone_number_id,
                &status.provider_message_id,
                &status.status,
                status.error_code.as_deref(),
                status.error_title.as_deref(),
            )
            .await
        {
            Ok(changed) => {
                self.deps.events.emit(
                    Event::debug(names::STATUS_UPDATED)
                        .with("sentMessageId", &status.provider_message_id)
                        .with("status", &status.status)
                        .with("errorCode", &status.error_code)
                        .with("changed", changed),
                );
                Attempt::Done
            }
            Err(e) => Attempt::Retry { error: e.to_string(), stage: None },
        }
    }

    async fn process_message(&self, job: &Job, event: &InboundMessageEvent, attempt: u32) -> Attempt {
        let store = &self.deps.store;
        let ctx = match store.resolve_channel_cached(&event.phone_number_id).await {
            Ok(Some(ctx)) => ctx,
            Ok(None) => {
                return Attempt::Fail {
                    error: format!("no channel for phone_number_id {}", event.phone_number_id),
                    stage: None,
                };
            }
            Err(e) => return Attempt::Retry { error: e.to_string(), stage: None },
        };
        let from = PhoneNumber::new(event.from.clone());
        let sent_at = Utc.timestamp_opt(event.timestamp, 0).single().unwrap_or(event.received_at);
        let inbound = NewInbound {
            provider_message_id: event.provider_message_id.clone(),
            from: from.clone(),
            contact_name: event.contact_name.clone(),
            message_type: event.message_type.clone(),
            text: event.text.clone(),
            sent_at,
            job_id: job.job_id.clone(),
        };
        let recorded = match store.record_inbound(&ctx, &inbound).await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry { error: e.to_string(), stage: None },
        };
        let correlate = |e: Event| {
            e.with("providerMessageId", &event.provider_message_id)
                .with("tenantId", ctx.tenant.id.as_str())
                .with("conversationId", recorded.conversation.id.as_str())
                .with("jobId", &job.job_id)
        };
        if let InboundOutcome::Duplicate { first_job_id } = &recorded.outcome {
            self.deps.events.emit(correlate(
                Event::info(names::DUPLICATE_MESSAGE_DROPPED)
                    .with("firstJobId", first_job_id)
                    .with("detectedBy", "database"),
            ));
            return Attempt::Done;
        }
        let intake = MediaIntake {
            source: self.deps.media.as_deref(),
            storage: &*self.deps.media_storage,
            store,
            events: &*self.deps.events,
        };
        let last_attempt = attempt >= self.config.max_attempts;
        let text = match intake.receive(&ctx, event, last_attempt, &correlate).await {
            MediaTurn::NotMedia => event.text.clone().filter(|t| !t.trim().is_empty()),
            MediaTurn::Answer(text) => Some(text),
            MediaTurn::Unanswered => None,
            MediaTurn::Retry(error) => return Attempt::Retry { error, stage: None },
        };
        let Some(text) = text else {
            self.deps.events.emit(correlate(
                Event::info(names::MESSAGE_IGNORED)
                    .with("messageType", &event.message_type)
                    .with("reason", "no text to answer")
                    .with("from", mask_phone(&event.from)),
            ));
            return Attempt::Done;
        };
        let mut msg = Message::new(
            JobInfo { id: JobId::new(job.job_id.clone()), attempt },
            ctx.tenant.clone(),
            ctx.channel.clone(),
            recorded.conversation.clone(),
            InboundText {
                provider_message_id: ProviderMessageId::new(event.provider_message_id.clone()),
                from,
                text,
                sent_at,
            },
        );
        let generation = self.deps.reloader.runtime().snapshot();
        let pipeline = generation.pipeline(msg.tenant.tier.as_deref()).clone();
        match pipeline.run(&mut msg, &*self.deps.events, generation.number).await {
            Outcome::Completed | Outcome::Replied { .. } | Outcome::Dropped { .. } => Attempt::Done,
            Outcome::Failed { stage, error, retryable: true, .. } => {
                Attempt::Retry { error: error.to_string(), stage: Some(stage) }
            }
            Outcome::Failed { stage, error, retryable: false, .. } => {
                Attempt::Fail { error: error.to_string(), stage: Some(stage) }
            }
        }
    }
}

/// An event being built for a job, emitted once complete.
struct JobEvent(Event);

impl JobEvent {
    fn with(self, key: &'static str, value: impl serde::Serialize) -> Self {
        Self(self.0.with(key, value))
    }
    fn emit(self, sink: &dyn EventSink) {
        sink.emit(self.0);
    }
}
