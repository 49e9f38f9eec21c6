//! Scenario `ingest`: the webhook's intake rate and latency. `parley api` alone (no worker competes
//! for the CPU) takes signed Meta webhooks into Redis (XADD on its real streams); a bare poem server
//! that only answers 200 is measured by the same load generator in the same run, alternating
//! rounds, as the reference. Then both are measured at a quarter of Parley's rate, paced.

use std::{path::PathBuf, sync::Arc, time::Duration};

use secrecy::SecretString;

use crate::{
    BenchError,
    fixture::{self, Fixture, PHONE_NUMBER_ID},
    http_load::{self, Run},
    latency::{Distribution, ms},
    processes::{CpuSnapshot, Spawned, mib},
    report::{Table, Verdict},
    webhook_payload::{QUESTIONS, TextMessage, sender, signed_request},
};

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub requests: usize,
    pub connections: usize,
    pub rounds: usize,
    pub paced_seconds: u64,
    pub parley: PathBuf,
    pub keep_logs: bool,
    /// Extra environment of the Parley processes, applied last.
    pub parley_env: Vec<(String, String)>,
}

/// Parley's default: the webhook's streams.
const SHARDS: u32 = 16;
const WARM_UP: usize = 2_000;

pub async fn run(options: &IngestOptions) -> Result<Table, BenchError> {
    let fixture = Fixture::create(0).await?;
    let result = measure(options, &fixture).await;
    fixture.cleanup(options.keep_logs || result.is_err()).await;
    result
}

/// The signed requests `tag-0 … tag-(n-1)` for `target`, each a distinct message.
fn requests(target: std::net::SocketAddr, secret: &SecretString, tag: &str, n: usize) -> Arc<Vec<Vec<u8>>> {
    Arc::new(
        (0..n)
            .map(|i| {
                signed_request(
                    target,
                    secret,
                    &TextMessage {
                        phone_number_id: PHONE_NUMBER_ID.into(),
                        from: sender(i % 1_000),
                        wamid: format!("wamid.ingest-{tag}-{i}"),
                        text: QUESTIONS[i % QUESTIONS.len()].into(),
                    },
                )
            })
            .collect(),
    )
}

async fn measure(options: &IngestOptions, fixture: &Fixture) -> Result<Table, BenchError> {
    let (bare, bare_addr) = Spawned::bare_server(&fixture.logs, &[]).await?;
    let port = fixture::free_port()?;
    let mut env = fixture.parley_env(fixture.database_url(None)?, port);
    env.extend(options.parley_env.iter().cloned());
    let mut api = Spawned::parley(&options.parley, "api", "api", &env, &fixture::workspace(), &fixture.logs)?;
    let parley_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    api.wait_healthy(parley_addr, Duration::from_secs(30)).await?;
    let secret = &fixture.app_secret;
    let conns = options.connections;

    // Every body is built and signed here, before any timed loop.
    eprintln!("ingest: signing {} requests", 2 * WARM_UP + 2 * options.rounds * options.requests);
    let warm_bare = requests(bare_addr, secret, "warm-bare", WARM_UP);
    let warm_parley = requests(parley_addr, secret, "warm", WARM_UP);
    let rounds: Vec<_> = (0..options.rounds)
        .map(|r| {
            (
                requests(bare_addr, secret, &format!("bare-{r}"), options.requests),
                requests(parley_addr, secret, &format!("round-{r}"), options.requests),
            )
        })
        .collect();

    eprintln!("ingest: warming up both servers ({WARM_UP} requests each)");
    check(&http_load::closed_loop(bare_addr, warm_bare, conns).await?, "bare warm-up")?;
    check(&http_load::closed_loop(parley_addr, warm_parley, conns).await?, "parley warm-up")?;

    let redis_pid = fixture.redis_pid().await;
    let mut bare_runs = Vec::new();
    let mut parley_runs = Vec::new();
    let mut bare_cpu = CpuUse::default();
    let mut parley_cpu = CpuUse::default();
    for (r, (bare_requests, parley_requests)) in rounds.into_iter().enumerate() {
        let run =
            bare_cpu.measure(bare.pid, redis_pid, http_load::closed_loop(bare_addr, bare_requests, conns)).await?;
        eprintln!("ingest: round {} bare   {:>8.0} req/s", r + 1, run.rate());
        bare_runs.push(run);
        let run =
            parley_cpu.measure(api.pid, redis_pid, http_load::closed_loop(parley_addr, parley_requests, conns)).await?;
        eprintln!("ingest: round {} parley {:>8.0} req/s", r + 1, run.rate());
        parley_runs.push(run);
    }
    let bare_rate = overall_rate(&bare_runs);
    let parley_rate = overall_rate(&parley_runs);

    let paced_rate = parley_rate / 4.0;
    let paced_n = ((paced_rate * options.paced_seconds as f64) as usize).max(100);
    eprintln!("ingest: paced at {paced_rate:.0} req/s for {} s ({paced_n} requests each)", options.paced_seconds);
    let paced_parley_requests = requests(parley_addr, secret, "paced", paced_n);
    let paced_bare_requests = requests(bare_addr, secret, "paced-bare", paced_n);
    let paced_parley = http_load::paced(parley_addr, paced_parley_requests, conns, paced_rate).await?;
    let paced_bare = http_load::paced(bare_addr, paced_bare_requests, conns, paced_rate).await?;

    // The warm-up's requests all succeeded (checked above) and are in the streams too.
    let parley_ok: usize = WARM_UP + parley_runs.iter().map(Run::ok).sum::<usize>() + paced_parley.ok();
    let durable = fixture.queued_entries(SHARDS).await?;
    let api_memory = api.memory();
    api.terminate(Duration::from_secs(15)).await;
    bare.terminate(Duration::from_secs(5)).await;

    let mut table = Table::new(format!(
        "ingest — {} signed webhooks per round × {} rounds, {} connections, `parley api` vs bare poem",
        options.requests, options.rounds, conns
    ));
    let rates = |runs: &[Run]| runs.iter().map(|r| format!("{:.0}", r.rate())).collect::<Vec<_>>().join(" / ");
    table.info("bare poem server: throughput (req/s, per round)", format!("{bare_rate:.0} ({})", rates(&bare_runs)));
    table.info("Parley webhook: throughput (req/s, per round)", format!("{parley_rate:.0} ({})", rates(&parley_runs)));
    let ratio = parley_rate / bare_rate.max(1e-9);
    table.target("Parley ÷ bare throughput", format!("{:.0} %", ratio * 100.0), "≥ 50 %", Verdict::of(ratio >= 0.5));
    let closed = |runs: &[Run]| Distribution::new(runs.iter().flat_map(Run::latencies).collect());
    table.info("bare: latency at full load", closed(&bare_runs).summary());
    table.info("Parley: latency at full load", closed(&parley_runs).summary());
    let parley_paced = Distribution::new(paced_parley.latencies());
    table.info(
        "paced rate (¼ of Parley's)",
        format!(
            "{paced_rate:.0} req/s for {} s; start lag p99 {} (Parley) / {} (bare)",
            options.paced_seconds,
            ms(paced_parley.lag_p99()),
            ms(paced_bare.lag_p99())
        ),
    );
    table.target(
        "Parley: p99 latency at ¼ rate",
        ms(parley_paced.p99()),
        "< 2 ms",
        Verdict::of(parley_paced.p99() < Duration::from_millis(2)),
    );
    table.info("Parley: latency at ¼ rate", parley_paced.summary());
    table.info("bare: latency at ¼ rate", Distribution::new(paced_bare.latencies()).summary());
    let per_request = |cpu: &CpuUse, runs: &[Run]| {
        let n = runs.iter().map(|r| r.outcomes.len()).sum::<usize>().max(1) as f64;
        let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6 / n);
        let redis = if redis_pid.is_some() { us(cpu.redis) } else { "not measured".into() };
        format!("{} + Redis {redis} + load generator {}", us(cpu.server), us(cpu.generator))
    };
    table.info("bare: CPU per request at full load (server + Redis + generator)", per_request(&bare_cpu, &bare_runs));
    table.info(
        "Parley: CPU per request at full load (`parley api` + Redis + generator)",
        per_request(&parley_cpu, &parley_runs),
    );
    table.info(
        "Parley api resident memory after the run (VmRSS / VmHWM)",
        format!("{} / {}", mib(api_memory.rss_kib), mib(api_memory.hwm_kib)),
    );
    let errors: usize = parley_runs.iter().chain(&bare_runs).map(Run::errors).sum::<usize>()
        + paced_parley.errors()
        + paced_bare.errors();
    table.target("non-200 answers", errors.to_string(), "0", Verdict::of(errors == 0));
    table.target(
        "Parley 200s vs entries in the Redis streams",
        format!("{parley_ok} / {durable}"),
        "equal",
        Verdict::of(parley_ok as u64 == durable),
    );
    if !options.parley_env.is_empty() {
        table.note(format!("Parley's environment overridden: {}", env_list(&options.parley_env)));
    }
    table.note("Each request is a distinct message, signed before the timed loops; the generator, both servers, Redis and PostgreSQL share the machine's cores.");
    Ok(table)
}

/// The CPU a server, Redis and the load generator (this process) used over some runs.
#[derive(Debug, Default)]
struct CpuUse {
    server: Duration,
    redis: Duration,
    generator: Duration,
}

impl CpuUse {
    async fn measure(
        &mut self,
        server: u32,
        redis: Option<u32>,
        run: impl std::future::Future<Output = Result<Run, http_load::LoadError>>,
    ) -> Result<Run, BenchError> {
        let me = std::process::id();
        let pids: Vec<u32> = [Some(server), redis, Some(me)].into_iter().flatten().collect();
        let before = CpuSnapshot::take(&pids);
        let run = run.await?;
        let after = CpuSnapshot::take(&pids);
        self.server += after.used_since(&before, &[server]);
        self.redis += redis.map(|r| after.used_since(&before, &[r])).unwrap_or_default();
        self.generator += after.used_since(&before, &[me]);
        Ok(run)
    }
}

pub fn env_list(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("`{k}={v}`")).collect::<Vec<_>>().join(", ")
}

/// All requests of the rounds over their summed durations.
fn overall_rate(runs: &[Run]) -> f64 {
    let n: usize = runs.iter().map(|r| r.outcomes.len()).sum();
    let secs: f64 = runs.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    n as f64 / secs.max(1e-9)
}

fn check(run: &Run, what: &str) -> Result<(), BenchError> {
    if run.errors() > 0 {
        return Err(BenchError::Failed(format!("{what}: {} of {} requests failed", run.errors(), run.outcomes.len())));
    }
    Ok(())
}
