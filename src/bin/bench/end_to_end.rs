//! Scenarios `e2e` and `memory`: the whole path of a message — signed webhook, Redis stream,
//! worker, pipeline (dedupe, ratelimit, quota, knowledge search, LLM, send), PostgreSQL — with an
//! OpenAI-compatible LLM that answers after a fixed delay and a Meta API that notes when each reply
//! arrives. Parley runs as real processes (`parley serve`, or `parley api` + `parley worker`), so
//! that their memory and CPU are theirs alone; PostgreSQL is reached through a proxy that counts
//! round trips.
//!
//! Two phases, each on conversations of its own: a burst (every message posted as fast as the
//! webhook takes them: the messages per second the workers sustain), then a paced phase at a
//! fraction of that rate (the latency Parley adds when it is not saturated). Each conversation
//! gets `messages / conversations` messages per phase, under the base pipeline's limit of 5 per
//! 30 s, so no message is rate-limited and the pipeline file is the shipped one.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    BenchError,
    fake_providers::{FakeLlm, FakeMeta, MetaAnomalies},
    fixture::{self, Fixture, PHONE_NUMBER_ID},
    http_load::{self, Run},
    latency::Distribution,
    pg_round_trips::{PgRoundTripCounter, RoundTrips},
    processes::{CpuSnapshot, PeakSampler, Spawned, mib},
    report::{Table, Verdict},
    webhook_payload::{QUESTIONS, TextMessage, sender, signed_request},
};

#[derive(Debug, Clone)]
pub struct EndToEndOptions {
    pub messages: usize,
    pub conversations: usize,
    pub connections: usize,
    pub llm_delay: Duration,
    /// The paced phase's rate as a fraction of the burst's throughput.
    pub paced_fraction: f64,
    /// `WORKER_CONCURRENCY`; `None`: Parley's default.
    pub worker_concurrency: Option<usize>,
    pub idle_seconds: u64,
    /// Chunks in the tenant's knowledge base (0: none).
    pub knowledge_chunks: usize,
    pub parley: PathBuf,
    pub keep_logs: bool,
    /// Extra environment of the Parley processes, applied last.
    pub parley_env: Vec<(String, String)>,
}

/// How Parley is deployed for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// `parley serve`: API and workers in one process.
    Serve,
    /// `parley api` and `parley worker`, two processes.
    Split,
}

/// `WHATSAPP_SEND_RATE` of the runs (Meta's highest throughput tier).
pub const SEND_RATE: u32 = 1_000;

/// Parley's default shard count: every lease taken means the workers are ready.
const SHARDS: usize = 16;
/// How long a phase may take to be fully answered.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// One process's figures over the run.
#[derive(Debug, Clone)]
pub struct ProcessFigures {
    pub name: String,
    /// `VmRSS` at the end of the idle window, KiB.
    pub idle_rss_kib: u64,
    /// The highest `VmRSS` sampled (every 50 ms) during the phases, KiB.
    pub peak_rss_kib: u64,
    /// `VmHWM` at the end, KiB.
    pub hwm_kib: u64,
    /// CPU per second while idle (background: leases, blocking reads, spool polls).
    pub idle_cpu_per_sec: Duration,
    /// CPU during each phase's window.
    pub phase_cpu: Vec<Duration>,
}

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct PhaseFigures {
    pub name: &'static str,
    pub messages: usize,
    /// The paced phase's rate; `None` for the burst.
    pub rate: Option<f64>,
    pub accepted: usize,
    pub answered: usize,
    /// Webhook answer times.
    pub webhook: Distribution,
    /// Reply received − webhook accepted − LLM delay, per answered message.
    pub added: Distribution,
    /// First request sent → last reply received.
    pub window: Duration,
    /// Paced phase: the p99 of how late requests started after their scheduled time.
    pub lag_p99: Duration,
    pub round_trips: RoundTrips,
    pub neighbour_cpu: NeighbourCpu,
}

/// The CPU the rest of the machine's actors used during a phase.
#[derive(Debug, Clone, Copy)]
pub struct NeighbourCpu {
    /// `None`: Redis is not on this machine.
    pub redis: Option<Duration>,
    /// The run database's backends.
    pub postgres: Duration,
    /// This process: load generator, fake LLM and Meta API, round-trip counter.
    pub bench: Duration,
}

/// The machine's other actors whose CPU a phase accounts for.
struct Neighbours<'a> {
    fixture: &'a Fixture,
    redis_pid: Option<u32>,
}

impl Neighbours<'_> {
    fn pids(&self, backends: &[u32]) -> Vec<u32> {
        let mut pids = backends.to_vec();
        pids.extend(self.redis_pid);
        pids.push(std::process::id());
        pids
    }
}

impl PhaseFigures {
    pub fn throughput(&self) -> f64 {
        self.answered as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct EndToEndOutcome {
    pub topology: Topology,
    pub options: EndToEndOptions,
    pub phases: Vec<PhaseFigures>,
    pub processes: Vec<ProcessFigures>,
    pub idle_round_trips_per_sec: f64,
    /// Round trips seen by the proxy over the processes' whole life.
    pub lifetime_round_trips: u64,
    /// `xact_commit` of the run's database over the processes' whole life.
    pub lifetime_commits: Option<i64>,
    pub llm_requests: usize,
    pub sends: MetaAnomalies,
}

impl EndToEndOutcome {
    /// CPU per message of a phase, all Parley processes together; `net`: minus each one's idle
    /// background over the phase's window.
    pub fn cpu_per_message(&self, phase: usize, net: bool) -> Duration {
        let p = &self.phases[phase];
        let total: Duration = self
            .processes
            .iter()
            .map(|proc| {
                let gross = proc.phase_cpu[phase];
                if net { gross.saturating_sub(proc.idle_cpu_per_sec.mul_f64(p.window.as_secs_f64())) } else { gross }
            })
            .sum();
        total / p.answered.max(1) as u32
    }

    /// Round trips per message of a phase, net of the idle background.
    pub fn round_trips_per_message(&self, phase: usize) -> f64 {
        let p = &self.phases[phase];
        let background = self.idle_round_trips_per_sec * p.window.as_secs_f64();
        (p.round_trips.round_trips as f64 - background).max(0.0) / p.answered.max(1) as f64
    }
}

pub async fn run(options: &EndToEndOptions, topology: Topology) -> Result<EndToEndOutcome, BenchError> {
    let fixture = Fixture::create(options.knowledge_chunks).await?;
    let result = measure(options, topology, &fixture).await;
    fixture.cleanup(options.keep_logs || result.is_err()).await;
    result
}

async fn measure(
    options: &EndToEndOptions,
    topology: Topology,
    fixture: &Fixture,
) -> Result<EndToEndOutcome, BenchError> {
    let counter = PgRoundTripCounter::start(fixture.postgres_addr()?).await?;
    let meta = FakeMeta::start().await?;
    let llm = FakeLlm::start(options.llm_delay).await?;
    let port = fixture::free_port()?;
    let mut env = fixture.parley_env(fixture.database_url(Some(counter.addr))?, port);
    env.insert("WHATSAPP_API_URL".into(), meta.api_url());
    env.insert("LLM_PROVIDER".into(), "openai".into());
    env.insert("LLM_BASE_URL".into(), llm.base_url());
    env.insert("LLM_MODEL".into(), "bench-model".into());
    // Every reply of the run goes out through one business number: at Meta's default throughput
    // (80/s, Parley's default pacing) the pacing, not Parley, would set the rate. 1,000/s is Meta's
    // highest tier; `--parley-env WHATSAPP_SEND_RATE=80` measures the default.
    env.insert("WHATSAPP_SEND_RATE".into(), SEND_RATE.to_string());
    if let Some(n) = options.worker_concurrency {
        env.insert("WORKER_CONCURRENCY".into(), n.to_string());
    }
    env.extend(options.parley_env.iter().cloned());

    // From here on only Parley's connections use the run's database.
    fixture.close_pool().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let commits_before = fixture.committed_transactions().await.ok();

    let roles: &[(&str, &str)] = match topology {
        Topology::Serve => &[("serve", "serve")],
        Topology::Split => &[("api", "api"), ("worker", "worker")],
    };
    let mut processes = Vec::new();
    for (role, name) in roles {
        processes.push(Spawned::parley(&options.parley, role, name, &env, &fixture::workspace(), &fixture.logs)?);
    }
    let webhook = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    processes[0].wait_healthy(webhook, Duration::from_secs(30)).await?;
    wait_for_leases(fixture, &mut processes).await?;

    // Idle: what the processes cost with nothing to do.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = Duration::from_secs(options.idle_seconds.max(1));
    let (cpu0, rt0) = (cpu_of(&processes), counter.now());
    tokio::time::sleep(idle).await;
    let (cpu1, rt1) = (cpu_of(&processes), counter.now());
    let idle_rss: Vec<u64> = processes.iter().map(|p| p.memory().rss_kib).collect();
    let idle_cpu_per_sec: Vec<Duration> =
        cpu1.iter().zip(&cpu0).map(|(a, b)| a.saturating_sub(*b).div_f64(idle.as_secs_f64())).collect();
    let idle_round_trips_per_sec = (rt1 - rt0).round_trips as f64 / idle.as_secs_f64();

    let sampler = PeakSampler::start(processes.iter().map(|p| p.pid).collect());
    let mut phases = Vec::new();
    let mut phase_cpu: Vec<Vec<Duration>> = vec![Vec::new(); processes.len()];

    let burst = Phase::new("burst", 0, options, fixture, webhook);
    eprintln!("e2e: burst of {} messages over {} conversations", options.messages, options.conversations);
    let redis_pid = fixture.redis_pid().await;
    let neighbours = Neighbours { fixture, redis_pid };
    let (figures, cpu) = burst.run(&meta, &counter, &processes, &neighbours, options.connections, None).await?;
    let paced_rate = figures.throughput() * options.paced_fraction;
    eprintln!("e2e: burst answered at {:.0} msg/s; paced phase at {paced_rate:.0} msg/s", figures.throughput());
    phases.push(figures);
    cpu.iter().enumerate().for_each(|(i, c)| phase_cpu[i].push(*c));

    let paced = Phase::new("paced", options.conversations, options, fixture, webhook);
    let (figures, cpu) =
        paced.run(&meta, &counter, &processes, &neighbours, options.connections, Some(paced_rate)).await?;
    phases.push(figures);
    cpu.iter().enumerate().for_each(|(i, c)| phase_cpu[i].push(*c));

    let peaks = sampler.stop().await;
    let mut figures = Vec::new();
    for (i, process) in processes.iter().enumerate() {
        figures.push(ProcessFigures {
            name: process.name.clone(),
            idle_rss_kib: idle_rss[i],
            peak_rss_kib: peaks.get(i).copied().unwrap_or(0),
            hwm_kib: process.memory().hwm_kib,
            idle_cpu_per_sec: idle_cpu_per_sec[i],
            phase_cpu: phase_cpu[i].clone(),
        });
    }
    for process in processes {
        process.terminate(Duration::from_secs(20)).await;
    }
    // A backend flushes its statistics as it exits, just after its client has gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let commits_after = fixture.committed_transactions().await.ok();
    let sends = meta.anomalies();
    Ok(EndToEndOutcome {
        topology,
        options: options.clone(),
        phases,
        processes: figures,
        idle_round_trips_per_sec,
        lifetime_round_trips: counter.now().round_trips,
        lifetime_commits: commits_before.zip(commits_after).map(|(b, a)| a - b),
        llm_requests: llm.requests(),
        sends,
    })
}

fn cpu_of(processes: &[Spawned]) -> Vec<Duration> {
    processes.iter().map(Spawned::cpu).collect()
}

/// Waits until the workers hold every shard's lease: from then on, messages are read at once.
async fn wait_for_leases(fixture: &Fixture, processes: &mut [Spawned]) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = fixture.redis.clone();
    loop {
        for p in processes.iter_mut() {
            p.check_alive()?;
        }
        let mut held = 0;
        for shard in 0..SHARDS {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{}:lease:{shard}", fixture.queue_prefix))
                .query_async(&mut conn)
                .await
                .unwrap_or(false);
            held += usize::from(exists);
        }
        if held == SHARDS {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Failed(format!("the workers hold {held} of {SHARDS} shard leases after 30 s")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A phase's messages: `options.messages` over `options.conversations` conversations numbered
/// from `first_conversation`, message `i` in conversation `i % conversations` (so that one
/// conversation's messages are spread over the phase).
struct Phase {
    name: &'static str,
    webhook: std::net::SocketAddr,
    llm_delay: Duration,
    wamids: Vec<String>,
    requests: Arc<Vec<Vec<u8>>>,
}

impl Phase {
    fn new(
        name: &'static str,
        first_conversation: usize,
        options: &EndToEndOptions,
        fixture: &Fixture,
        webhook: std::net::SocketAddr,
    ) -> Self {
        let mut wamids = Vec::with_capacity(options.messages);
        let mut requests = Vec::with_capacity(options.messages);
        for i in 0..options.messages {
            let message = TextMessage {
                phone_number_id: PHONE_NUMBER_ID.into(),
                from: sender(first_conversation + i % options.conversations.max(1)),
                wamid: format!("wamid.e2e-{name}-{i}"),
                text: QUESTIONS[i % QUESTIONS.len()].into(),
            };
            requests.push(signed_request(webhook, &fixture.app_secret, &message));
            wamids.push(message.wamid);
        }
        Self { name, webhook, llm_delay: options.llm_delay, wamids, requests: Arc::new(requests) }
    }

    /// Posts the phase's messages (all at once, or paced at `rate`), waits for every reply, and
    /// returns the phase's figures and each process's CPU over the phase.
    async fn run(
        self,
        meta: &FakeMeta,
        counter: &PgRoundTripCounter,
        processes: &[Spawned],
        neighbours: &Neighbours<'_>,
        connections: usize,
        rate: Option<f64>,
    ) -> Result<(PhaseFigures, Vec<Duration>), BenchError> {
        let backends_before = neighbours.fixture.postgres_backends().await;
        let others_before = CpuSnapshot::take(&neighbours.pids(&backends_before));
        let (cpu0, rt0) = (cpu_of(processes), counter.now());
        let run: Run = match rate {
            None => http_load::closed_loop(self.webhook, self.requests.clone(), connections).await?,
            Some(rate) => http_load::paced(self.webhook, self.requests.clone(), connections, rate).await?,
        };
        let answered = meta.wait_for(&self.wamids, PHASE_TIMEOUT).await;
        let (cpu1, rt1) = (cpu_of(processes), counter.now());
        let backends = neighbours.fixture.postgres_backends().await;
        let others = CpuSnapshot::take(&neighbours.pids(&backends));
        let mut all_backends = backends_before.clone();
        all_backends.extend(backends.iter().filter(|p| !backends_before.contains(p)));
        let neighbour_cpu = NeighbourCpu {
            redis: neighbours.redis_pid.map(|p| others.used_since(&others_before, &[p])),
            postgres: others.used_since(&others_before, &all_backends),
            bench: others.used_since(&others_before, &[std::process::id()]),
        };
        if answered < self.wamids.len() {
            eprintln!("e2e: {}: only {answered} of {} messages answered", self.name, self.wamids.len());
        }
        let replies = meta.reply_times(&self.wamids);
        let first_sent = run.outcomes.iter().map(|o| o.sent).min().unwrap_or_else(Instant::now);
        let last_reply = replies.iter().flatten().max().copied().unwrap_or(first_sent);
        let mut added = Vec::with_capacity(replies.len());
        for outcome in run.outcomes.iter().filter(|o| o.status == 200) {
            if let Some(Some(reply)) = replies.get(outcome.index) {
                added.push(reply.saturating_duration_since(outcome.done).saturating_sub(self.llm_delay));
            }
        }
        let figures = PhaseFigures {
            name: self.name,
            messages: self.wamids.len(),
            rate,
            accepted: run.ok(),
            answered,
            webhook: Distribution::new(run.latencies()),
            added: Distribution::new(added),
            window: last_reply.saturating_duration_since(first_sent),
            lag_p99: run.lag_p99(),
            round_trips: rt1 - rt0,
            neighbour_cpu,
        };
        let cpu = cpu1.iter().zip(&cpu0).map(|(a, b)| a.saturating_sub(*b)).collect();
        Ok((figures, cpu))
    }
}

/// The `e2e` scenario's table (`parley serve`).
pub fn table(outcome: &EndToEndOutcome) -> Table {
    let o = &outcome.options;
    let concurrency = o.worker_concurrency.unwrap_or(DEFAULT_WORKER_CONCURRENCY);
    let mut table = Table::new(format!(
        "e2e — `parley serve`, {} messages per phase over {} conversations, LLM answering after {} ms, \
         WORKER_CONCURRENCY={concurrency}, WHATSAPP_SEND_RATE={SEND_RATE}, knowledge base of {} chunks",
        o.messages,
        o.conversations,
        o.llm_delay.as_millis(),
        o.knowledge_chunks
    ));
    if !o.parley_env.is_empty() {
        table.note(format!("Parley's environment overridden: {}", crate::ingest::env_list(&o.parley_env)));
    }
    phase_rows(&mut table, outcome);
    for (i, phase) in outcome.phases.iter().enumerate() {
        let gross = outcome.cpu_per_message(i, false);
        let net = outcome.cpu_per_message(i, true);
        table.target(
            format!("{}: Parley CPU per message (gross / net of idle)", phase.name),
            format!("{} / {}", ms3(gross), ms3(net)),
            "≤ 0.3 ms",
            Verdict::of(gross <= Duration::from_micros(300)),
        );
    }
    for phase in &outcome.phases {
        table.info(format!("{}: CPU per message elsewhere", phase.name), neighbour_cpu_per_message(phase));
    }
    for p in &outcome.processes {
        table.info(format!("{}: CPU while idle", p.name), format!("{} per s", ms3(p.idle_cpu_per_sec)));
    }
    round_trip_rows(&mut table, outcome);
    for p in &outcome.processes {
        memory_rows(&mut table, p, outcome.topology == Topology::Serve);
    }
    let bound = concurrency as f64 / o.llm_delay.as_secs_f64().max(1e-9);
    table.note(format!(
        "With {concurrency} jobs in flight and a {} ms LLM, the workers cannot exceed {bound:.0} messages/s; the \
         burst reached {:.0} % of that.",
        o.llm_delay.as_millis(),
        outcome.phases.first().map(|p| p.throughput() / bound * 100.0).unwrap_or(0.0)
    ));
    table.note(
        "Added latency = reply received by the fake Meta API − webhook 200 received by the client − the LLM's delay. \
         In the burst it includes the wait for a free job slot.",
    );
    table
}

/// Parley's default `WORKER_CONCURRENCY`.
pub const DEFAULT_WORKER_CONCURRENCY: usize = 64;

pub fn phase_rows(table: &mut Table, outcome: &EndToEndOutcome) {
    for phase in &outcome.phases {
        let rate = phase
            .rate
            .map(|r| format!(", posted at {r:.0}/s (start lag p99 {})", crate::latency::ms(phase.lag_p99)))
            .unwrap_or_default();
        table.info(
            format!("{}: messages answered", phase.name),
            format!("{} of {} (webhook 200: {}){rate}", phase.answered, phase.messages, phase.accepted),
        );
        table.info(format!("{}: throughput", phase.name), format!("{:.0} messages/s", phase.throughput()));
        table.info(format!("{}: added latency", phase.name), phase.added.summary());
        table.info(format!("{}: webhook latency", phase.name), phase.webhook.summary());
    }
    let expected: usize = outcome.phases.iter().map(|p| p.messages).sum();
    let s = &outcome.sends;
    let clean = outcome.llm_requests == expected && s.duplicates == 0 && s.notices == 0 && s.unquoted == 0;
    table.target(
        "LLM requests / duplicate replies / notices sent / unquoted sends",
        format!("{} / {} / {} / {}", outcome.llm_requests, s.duplicates, s.notices, s.unquoted),
        format!("{expected} / 0 / 0 / 0"),
        Verdict::of(clean),
    );
}

fn round_trip_rows(table: &mut Table, outcome: &EndToEndOutcome) {
    for (i, phase) in outcome.phases.iter().enumerate() {
        let per_message = outcome.round_trips_per_message(i);
        table.target(
            format!("{}: PostgreSQL round trips per message (net of idle)", phase.name),
            format!(
                "{per_message:.2} ({} in all; {} statements executed, {} prepared)",
                phase.round_trips.round_trips, phase.round_trips.executes, phase.round_trips.parses
            ),
            format!("{STATEMENTS_PER_MESSAGE} (one per statement)"),
            Verdict::of(per_message <= STATEMENTS_PER_MESSAGE as f64 + 0.05),
        );
    }
    table.info("PostgreSQL round trips while idle", format!("{:.1} per s", outcome.idle_round_trips_per_sec));
    table.info(
        "whole life of the processes: round trips (proxy) / transactions (xact_commit)",
        format!(
            "{} / {}",
            outcome.lifetime_round_trips,
            outcome.lifetime_commits.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into())
        ),
    );
}

/// record_inbound, quota, knowledge search, history, begin_outbound, mark_sent (the channel comes
/// from the worker's cache, read once per 30 s).
pub const STATEMENTS_PER_MESSAGE: usize = 6;

pub fn memory_rows(table: &mut Table, p: &ProcessFigures, serve_target: bool) {
    table.info(format!("`parley {}`: resident memory idle (VmRSS)", p.name), mib(p.idle_rss_kib));
    let peak = format!("{} sampled / {} VmHWM", mib(p.peak_rss_kib), mib(p.hwm_kib));
    if serve_target {
        table.target(
            format!("`parley {}`: resident memory at peak", p.name),
            peak,
            "< 50 MB",
            Verdict::of(p.hwm_kib * 1024 < 50 * 1000 * 1000),
        );
    } else {
        table.info(format!("`parley {}`: resident memory at peak", p.name), peak);
    }
}

/// Redis, PostgreSQL and the benchmark process's CPU per answered message in a phase.
pub fn neighbour_cpu_per_message(phase: &PhaseFigures) -> String {
    let n = phase.answered.max(1) as u32;
    let c = &phase.neighbour_cpu;
    let redis = c.redis.map(|r| ms3(r / n)).unwrap_or_else(|| "not measured".into());
    format!(
        "Redis {redis} · PostgreSQL {} · bench process (load, fakes, proxy) {}",
        ms3(c.postgres / n),
        ms3(c.bench / n)
    )
}

pub fn ms3(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
