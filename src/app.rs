//! Start-up: builds the service from its settings (PostgreSQL, Redis, providers, the pipeline
//! runtime) and runs its roles — the HTTP API, the workers, or both — until SIGTERM/SIGINT.
//! Tests start it on port 0 the same way (`start`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use async_trait::async_trait;
use engine::{
    events::EventSink,
    ports::{Resources, SystemClock},
    reload::{Reloader, WatchHandle},
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::{Server, listener::TcpAcceptor};
use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    http::{self, DependencyState, HttpState, Readiness, ReadyReport},
    kv::{self, RedisKv},
    providers::{
        self,
        credentials::ChannelCredentialCache,
        whatsapp::pacing::{PacedSender, RecipientPacing},
    },
    queue::{DurableIntake, QueuedEvent, SpoolSink, leases::Leases, streams::Queue},
    settings::Settings,
    store::{self, PgStore},
    worker::{Worker, WorkerConfig, WorkerDeps},
};

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API and the workers in one process.
    Serve,
    /// Only the HTTP API (webhook, admin, health).
    Api,
    /// Only the workers.
    Worker,
}

impl Role {
    fn http(self) -> bool {
        matches!(self, Self::Serve | Self::Api)
    }
    fn workers(self) -> bool {
        matches!(self, Self::Serve | Self::Worker)
    }
}

/// How long a Redis call of the anti-abuse stages may take before they fail open.
const KV_TIMEOUT: Duration = Duration::from_millis(500);
/// How soon a saved pipeline file is picked up.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(250);

/// The service's shared parts, built once per process.
#[derive(Clone)]
pub struct App {
    pub settings: Arc<Settings>,
    pub store: PgStore,
    pub redis: ConnectionManager,
    pub queue: Queue,
    pub events: Arc<dyn EventSink>,
    pub reloader: Arc<Reloader>,
    pub resources: Resources,
    pub metrics: Option<PrometheusHandle>,
    /// The channels' own credentials (360dialog webhook tokens, API keys), cached.
    pub channel_credentials: Option<Arc<ChannelCredentialCache>>,
    /// Where the knowledge originals (and media) are kept: KNOWLEDGE_DIR or GCS_BUCKET_NAME.
    pub storage: Arc<dyn crate::knowledge::ObjectStorage>,
}

impl App {
    /// Connects to PostgreSQL (migrating it unless MIGRATE_ON_START=false) and Redis, builds the
    /// providers and loads the pipeline. Redis may be down at start: the webhook spools to
    /// PostgreSQL until it returns.
    pub async fn build(settings: Settings, events: Arc<dyn EventSink>) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let pool =
            store::connect(&settings.database_url).await.context("cannot connect to PostgreSQL (DATABASE_URL)")?;
        if settings.migrate_on_start {
            store::migrate(&pool).await.context("cannot migrate the database")?;
        }
        let store = PgStore::new(pool);
        let redis = kv::connect_lazy(&settings.redis_url).context("invalid REDIS_URL")?;
        let providers = providers::build_with(&settings, events.clone(), Some(Arc::new(store.clone())))
            .context("cannot set up the providers")?;
        providers::check_embedding_dimension(providers.embedder.as_ref(), store.pool())
            .await
            .map_err(anyhow::Error::msg)?;
        // Meta's limits: a bucket per business number, and pacing per recipient (never drops).
        let sender: Arc<dyn engine::ports::OutboundSender> =
            Arc::new(PacedSender::new(providers.sender, settings.whatsapp_send_rate, Some(RecipientPacing::default())));
        let resources = Resources {
            kv: Arc::new(RedisKv::new(redis.clone(), KV_TIMEOUT)),
            store: Arc::new(store.clone()),
            llm: providers.llm,
            embedder: providers.embedder,
            sender,
            clock: Arc::new(SystemClock),
            events: events.clone(),
            pseudonym_key: Arc::from(settings.pseudonym_key()),
        };
        let reloader = Reloader::start(&settings.pipeline_file, resources.clone())
            .map_err(|e| anyhow::anyhow!("the pipeline file is invalid:\n{e}"))?;
        let storage = crate::knowledge::build_storage(&settings).context("cannot set up the object storage")?;
        // Blocking stream reads get their own connections, so that they never hold up the
        // webhook's writes or the stages' calls on the shared one.
        let queue = Queue::new(redis.clone(), settings.queue_prefix.clone(), settings.queue_shards)
            .with_blocking_reads(&settings.redis_url)
            .context("invalid REDIS_URL")?;
        Ok(Self {
            settings,
            store,
            redis,
            queue,
            events,
            reloader: Arc::new(reloader),
            resources,
            metrics: prometheus(),
            channel_credentials: providers.channel_credentials,
            storage,
        })
    }

    pub fn http_state(&self) -> HttpState {
        self.http_state_with(self.queue.clone())
    }

    /// The handlers' state, the webhook's events queued through `queue`.
    fn http_state_with(&self, queue: Queue) -> HttpState {
        let intake = DurableIntake::new(queue, Arc::new(PgSpool(self.store.clone())));
        HttpState {
            settings: self.settings.clone(),
            intake: Arc::new(intake),
            events: self.events.clone(),
            readiness: Arc::new(AppReadiness { app: self.clone() }),
            reloader: Some(self.reloader.clone()),
            metrics: self.metrics.clone(),
            reload_broadcast: Some(Arc::new(RedisReloadBroadcast {
                conn: self.redis.clone(),
                channel: self.reload_channel(),
            })),
            channel_credentials: self.channel_credentials.clone(),
            knowledge: Some(http::knowledge::KnowledgeDeps::new(self.store.clone(), self.storage.clone())),
        }
    }

    /// The Redis pub/sub channel on which replicas ask each other to reload.
    fn reload_channel(&self) -> String {
        format!("{}:pipeline-reload", self.settings.queue_prefix)
    }

    pub fn worker(&self, id: impl Into<String>) -> Worker {
        let s = &self.settings;
        let mut config =
            WorkerConfig::new(id, s.worker_concurrency, s.job_max_attempts, s.job_backoff_base, s.job_backoff_max);
        config.lease_ttl = s.worker_lease_ttl;
        Worker::new(
            config,
            WorkerDeps {
                store: self.store.clone(),
                queue: self.queue.clone(),
                leases: Leases::of(&self.queue),
                reloader: self.reloader.clone(),
                events: self.events.clone(),
                media: providers::whatsapp::media::MediaFetcher::source_for(
                    s,
                    self.channel_credentials.clone(),
                    self.events.clone(),
                ),
                media_storage: self.storage.clone(),
            },
        )
    }
}

impl App {
    /// The knowledge worker: indexes the documents that uploads queue.
    pub fn knowledge_worker(&self, id: impl Into<String>) -> crate::knowledge::KnowledgeWorker {
        crate::knowledge::KnowledgeWorker::new(
            crate::knowledge::KnowledgeWorkerConfig::from_settings(id, &self.settings),
            self.store.clone(),
            self.resources.embedder.clone(),
            self.storage.clone(),
            self.events.clone(),
        )
    }
}

/// The Prometheus recorder is process-wide: installed once, shared by every app in the process.
fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().ok()).clone()
}

struct RedisReloadBroadcast {
    conn: ConnectionManager,
    channel: String,
}

#[async_trait]
impl http::admin::ReloadBroadcast for RedisReloadBroadcast {
    async fn publish(&self) {
        let mut conn = self.conn.clone();
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PUBLISH").arg(&self.channel).arg("reload").query_async::<i64>(&mut conn),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            tracing::warn!(
                "cannot ask the other replicas to reload; they pick up the file on their own when it changes"
            );
        }
    }
}

/// Reloads when another replica asks to (after an admin reload there). Reconnects while Redis is
/// down; a replica that misses a broadcast still reloads when its file changes.
async fn follow_reload_broadcasts(app: App, stop: CancellationToken) {
    let channel = app.reload_channel();
    let Ok(client) = redis::Client::open(secrecy::ExposeSecret::expose_secret(&app.settings.redis_url)) else { return };
    while !stop.is_cancelled() {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            Ok(Ok(p)) => p,
            _ => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                next = futures_next(&mut messages) => match next {
                    Some(_) => { let _ = app.reloader.reload("broadcast").await; }
                    None => break,
                },
            }
        }
    }
}

async fn futures_next<S: futures_core::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx)).await
}

/// The spool is the `inbound_spool` table.
struct PgSpool(PgStore);

#[async_trait]
impl SpoolSink for PgSpool {
    async fn spool(&self, events: &[QueuedEvent], shards: u32) -> Result<Vec<i64>, String> {
        self.0.spool_insert(events, shards).await.map_err(|e| e.to_string())
    }
}

struct AppReadiness {
    app: App,
}

#[async_trait]
impl Readiness for AppReadiness {
    async fn check(&self) -> ReadyReport {
        let app = &self.app;
        let postgres = match app.store.ping().await {
            Ok(()) => DependencyState::Up,
            Err(e) => DependencyState::Down(e.to_string()),
        };
        let (redis, policy) = match kv::ping(&app.redis).await {
            Ok(()) => (DependencyState::Up, kv::eviction_policy(&app.redis).await.ok()),
            Err(e) => (DependencyState::Down(e.to_string()), None),
        };
        let live_workers = Leases::of(&app.queue).live_workers().await.ok().map(|w| w.len() as u64);
        let spool_backlog = app.store.spool_pending().await.ok().and_then(|n| u64::try_from(n).ok());
        ReadyReport {
            postgres,
            redis,
            redis_eviction_policy: policy,
            pipeline_generation: Some(app.reloader.runtime().generation()),
            live_workers,
            spool_backlog,
        }
    }
}

/// A started process: its address (with an HTTP role) and the handle that stops it.
pub struct Running {
    pub addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    _watch: Option<WatchHandle>,
}

impl Running {
    /// Stops intake, lets jobs in flight finish, and waits for everything to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The HTTP server threads of `role` (see `HTTP_THREADS` in docs/operations.md): `auto` is one per
/// CPU in `parley api`, none in `parley serve` (its HTTP server shares the workers' runtime).
pub fn http_threads(settings: &Settings, role: Role) -> usize {
    match (settings.http_threads, role) {
        (_, Role::Worker) => 0,
        (Some(n), _) => n,
        (None, Role::Api) => cpus(),
        (None, Role::Serve) => 0,
    }
}

/// The threads of the process's runtime when `TOKIO_WORKER_THREADS` does not set them: the CPUs
/// the HTTP threads leave, at least one — all of them for the workers of `parley serve` and
/// `parley worker`, one beside `parley api`'s HTTP threads.
///
/// `parley serve` with one HTTP thread and a one-thread runtime (`HTTP_THREADS=1
/// TOKIO_WORKER_THREADS=1`) measured ~10 % less CPU per message on two CPUs, but a fatter tail: when
/// the VM's host paused the one thread that runs every job, all of them waited (paced p99 added
/// latency up to 150-450 ms in some runs, 8-9 ms with two threads), so it is not the default.
pub fn runtime_threads(settings: &Settings, role: Role) -> usize {
    cpus().saturating_sub(http_threads(settings, role)).max(1)
}

/// `count` listening sockets on `bind`, sharing its port (`SO_REUSEPORT`: the kernel spreads the
/// connections over them); port 0 picks a free port for all of them.
///
/// A port already in use fails as it did with one socket, even when its holder is another Parley
/// with sockets of its own on it: the port is first bound without `SO_REUSEPORT`, which any
/// listening socket refuses, so that two processes never silently share one port.
fn listen(bind: SocketAddr, count: usize) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let new_socket =
        |at: SocketAddr| if at.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    if count > 1 && bind.port() != 0 {
        let probe = new_socket(bind)?;
        probe.set_reuseaddr(true)?;
        probe.bind(bind).with_context(|| format!("cannot listen on {bind}"))?;
    }
    let mut listeners: Vec<tokio::net::TcpListener> = Vec::with_capacity(count);
    let mut at = bind;
    for _ in 0..count {
        let socket = new_socket(at)?;
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        if count > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(at).with_context(|| format!("cannot listen on {at}"))?;
        let listener = socket.listen(1024).with_context(|| format!("cannot listen on {at}"))?;
        at = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves `routes` on `listener` until `stop`, then lets the requests in progress finish (10 s).
async fn serve_http(
    listener: tokio::net::TcpListener,
    routes: poem::endpoint::BoxEndpoint<'static>,
    stop: CancellationToken,
) {
    let acceptor = match TcpAcceptor::from_tokio(listener) {
        Ok(acceptor) => acceptor,
        Err(e) => {
            tracing::error!(error = %e, "the HTTP server cannot accept connections");
            return;
        }
    };
    let server = Server::new_with_acceptor(acceptor);
    if let Err(e) = server
        .run_with_graceful_shutdown(routes, async move { stop.cancelled().await }, Some(Duration::from_secs(10)))
        .await
    {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}

/// An HTTP server on a thread of its own, with a single-threaded runtime and a Redis connection
/// of its own for the webhook's XADDs: its requests, their batch and its reply never wake another
/// thread, which on two cores cost the webhook ~12 % of its CPU (BENCHMARKS.md). The rest of the
/// state (PostgreSQL pool, caches, events) is shared with the process's runtime. The task
/// returned ends when the thread has served its last request.
fn http_thread(
    index: usize,
    listener: tokio::net::TcpListener,
    app: &App,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = listener.into_std()?;
    let conn = kv::connect_lazy(&app.settings.redis_url).context("invalid REDIS_URL")?;
    let state = app.http_state_with(app.queue.on_connection(conn));
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name(format!("http-{index}")).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start an HTTP thread's runtime");
                return;
            }
        };
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve_http(listener, http::routes(state), stop).await,
                Err(e) => tracing::error!(error = %e, "the HTTP server cannot accept connections"),
            }
        });
        drop(runtime);
        let _ = done.send(());
    })?;
    Ok(tokio::spawn(async move {
        let _ = finished.await;
    }))
}

/// Starts the roles of `role`. The HTTP API listens on `bind` (port 0 picks a free port).
pub async fn start(app: App, role: Role, bind: SocketAddr, worker_id: String) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut addr = None;
    if role.http() {
        let threads = http_threads(&app.settings, role);
        let listeners = listen(bind, threads.max(1))?;
        let local = listeners[0].local_addr()?;
        addr = Some(local);
        if threads == 0 {
            let listener = listeners.into_iter().next().context("no listener")?;
            let routes = http::routes(app.http_state());
            tasks.push(tokio::spawn(serve_http(listener, routes, shutdown.clone())));
        } else {
            for (i, listener) in listeners.into_iter().enumerate() {
                tasks.push(http_thread(i, listener, &app, shutdown.clone())?);
            }
        }
        tracing::info!(%local, threads, "listening");
    }
    if role.workers() {
        let worker = app.worker(worker_id.clone());
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move { worker.run(stop).await }));
        let knowledge = app.knowledge_worker(format!("{worker_id}-knowledge"));
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move { knowledge.run(stop).await }));
    }
    tasks.push(tokio::spawn(follow_reload_broadcasts(app.clone(), shutdown.clone())));
    let watch = match app.reloader.watch(RELOAD_DEBOUNCE) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the pipeline file; reload with SIGHUP or the admin API");
            None
        }
    };
    #[cfg(unix)]
    if let Ok(task) = app.reloader.reload_on_sighup() {
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            stop.cancelled().await;
            task.abort();
        }));
    }
    Ok(Running { addr, shutdown, tasks, _watch: watch })
}

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_threads_share_a_port_that_no_other_process_can_join() {
        let group = listen("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert!(group.iter().all(|l| l.local_addr().unwrap().port() == port), "one port for all");

        // A second group (another process) on the same port is refused, as one socket would be.
        let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let err = listen(at, 2).unwrap_err();
        assert!(format!("{err:#}").contains(&format!("cannot listen on {at}")), "{err:#}");
        assert!(listen(at, 1).is_err());

        // Every socket of the group accepts connections.
        drop(group);
        let group = listen(at, 2).unwrap();
        let mut accepted = [0usize; 2];
        for _ in 0..64 {
            let _client = tokio::net::TcpStream::connect(at).await.unwrap();
            let (a, b) = (&group[0], &group[1]);
            tokio::select! {
                r = a.accept() => { r.unwrap(); accepted[0] += 1; }
                r = b.accept() => { r.unwrap(); accepted[1] += 1; }
            }
        }
        assert!(accepted.iter().all(|&n| n > 0), "the kernel spreads connections over the sockets: {accepted:?}");
    }
}
