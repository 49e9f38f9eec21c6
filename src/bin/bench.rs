//! `parley-bench`: the benchmark behind BENCHMARKS.md. It measures, on the machine it runs on,
//! the webhook's intake against a bare HTTP server (`ingest`), messages per second and added
//! latency end to end with a slow LLM (`e2e`), and the memory of each process (`memory`), then
//! prints a results table per scenario. It is a benchmark, not a test: it asserts nothing, and each
//! scenario runs on its own fresh database and Redis key prefix, removed at the end.
//!
//! Build both binaries first (`parley-bench` starts `target/release/parley`):
//! `cargo build --release --bin parley --bin parley-bench`.

// A binary's root resolves `mod` paths next to itself: its parts live in `src/bin/bench/`.

#[path = "bench/bare_server.rs"]
mod bare_server;
#[path = "bench/end_to_end.rs"]
mod end_to_end;
#[path = "bench/fake_providers.rs"]
mod fake_providers;
#[path = "bench/fixture.rs"]
mod fixture;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/http_load.rs"]
mod http_load;
#[path = "bench/ingest.rs"]
mod ingest;
#[path = "bench/latency.rs"]
mod latency;
#[path = "bench/memory.rs"]
mod memory;
#[path = "bench/pg_round_trips.rs"]
mod pg_round_trips;
#[path = "bench/processes.rs"]
mod processes;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/retrieval.rs"]
mod retrieval;
#[path = "bench/webhook_payload.rs"]
mod webhook_payload;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{end_to_end::EndToEndOptions, ingest::IngestOptions};

/// Measures Parley on this machine; see BENCHMARKS.md.
#[derive(Debug, Parser)]
#[command(name = "parley-bench")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Webhook intake (`parley api`) vs a bare HTTP server: throughput, latency at full load and at a quarter of it.
    Ingest {
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// End to end (`parley serve`): messages per second, added latency, CPU, PostgreSQL round trips, memory.
    E2e {
        #[command(flatten)]
        load: EndToEndArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Resident memory and CPU of `parley api` and `parley worker` as separate processes, under the e2e load.
    Memory {
        #[command(flatten)]
        load: EndToEndArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// The knowledge search on a large knowledge base: top-5 latency and recall against an exact search.
    Retrieval(RetrievalArgs),
    /// The least CPU each exchange of a message costs (PostgreSQL statement, Redis call, HTTP call, HTTP request served) and the floor they put under the CPU per message.
    Floor {
        /// Exchanges of each kind per measurement.
        #[arg(long, default_value_t = 20_000)]
        exchanges: usize,
        /// Exchanges in flight in the "at once" measurement (the e2e burst's jobs in flight).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Keep the processes' logs (printed path) instead of deleting them.
        #[arg(long)]
        keep_logs: bool,
    },
    /// Ingest, floor, e2e (with its CPU against the floor) and memory, one after the other.
    All {
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        load: EndToEndArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// The reference server of `ingest` (started by it).
    #[command(hide = true)]
    BareServer {
        /// Serve on a single-threaded runtime instead of poem's default multi-threaded one.
        #[arg(long)]
        current_thread: bool,
    },
}

#[derive(Debug, Args)]
struct IngestArgs {
    /// Webhook requests per round and server.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Rounds (bare server, then Parley, each round).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Duration of the paced runs at a quarter of Parley's rate.
    #[arg(long, default_value_t = 10)]
    paced_seconds: u64,
}

#[derive(Debug, Args)]
struct EndToEndArgs {
    /// Messages per phase (burst, then paced).
    #[arg(long, default_value_t = 2_000)]
    messages: usize,
    /// Conversations per phase; keep messages/conversations under 5 (the base pipeline's limit per 30 s).
    #[arg(long, default_value_t = 500)]
    conversations: usize,
    /// How long the fake LLM takes to answer, in milliseconds.
    #[arg(long, default_value_t = 300)]
    llm_delay_ms: u64,
    /// The paced phase's rate, as a fraction of the burst's throughput.
    #[arg(long, default_value_t = 0.5)]
    paced_fraction: f64,
    /// WORKER_CONCURRENCY given to Parley (default: Parley's own, 64).
    #[arg(long)]
    worker_concurrency: Option<usize>,
    /// Length of the idle window that measures the background CPU and round trips.
    #[arg(long, default_value_t = 5)]
    idle_seconds: u64,
    /// Chunks in the tenant's knowledge base, searched for every message (0: an empty one).
    #[arg(long, default_value_t = 200)]
    knowledge_chunks: usize,
}

#[derive(Debug, Args)]
struct RetrievalArgs {
    /// Chunks in the knowledge base, over 42 tenants (50 %, 10 %, and 40 sharing the rest).
    #[arg(long, default_value_t = 100_000)]
    chunks: usize,
    /// Queries searched (half for the largest tenant, a quarter for the medium one, a quarter for the small ones).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// How the embeddings are made.
    #[arg(long, value_enum, default_value_t = retrieval::Vectors::Hash)]
    vectors: retrieval::Vectors,
    /// `plan_cache_mode` of the searching connections (auto, force_generic_plan, force_custom_plan).
    #[arg(long)]
    plan_cache_mode: Option<String>,
    /// `hnsw.ef_search` values (comma-separated), one measured pass each (default: pgvector's, 40).
    #[arg(long, value_delimiter = ',')]
    ef_search: Vec<u32>,
    /// Keep the database (its name is printed) instead of dropping it.
    #[arg(long)]
    keep_database: bool,
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The `parley` binary; default: next to this one (target/release/parley).
    #[arg(long)]
    parley: Option<PathBuf>,
    /// Keep the processes' logs (printed path) instead of deleting them.
    #[arg(long)]
    keep_logs: bool,
    /// An environment variable for the Parley processes, over the benchmark's own (repeatable):
    /// to see what a setting costs, e.g. `--parley-env LOG_LEVEL=warn`.
    #[arg(long = "parley-env", value_name = "NAME=VALUE", value_parser = parse_env_pair)]
    parley_env: Vec<(String, String)>,
}

fn parse_env_pair(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected NAME=VALUE, got `{raw}`"))
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Fixture(#[from] fixture::FixtureError),
    #[error(transparent)]
    Process(#[from] processes::ProcessError),
    #[error(transparent)]
    Load(#[from] http_load::LoadError),
    #[error(transparent)]
    FakeServer(#[from] fake_providers::FakeServerError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Scenario::BareServer { current_thread } = cli.scenario {
        return bare_server::run(current_thread);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("parley-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.scenario)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parley-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(scenario: Scenario) -> Result<(), BenchError> {
    print_machine();
    match scenario {
        Scenario::Ingest { ingest, common } => {
            print_load("ingest");
            ingest::run(&ingest_options(&ingest, &common)?).await?.print();
        }
        Scenario::E2e { load, common } => {
            print_load("e2e");
            let outcome = end_to_end::run(&e2e_options(&load, &common)?, end_to_end::Topology::Serve).await?;
            end_to_end::table(&outcome).print();
        }
        Scenario::Memory { load, common } => {
            print_load("memory");
            memory::run(&e2e_options(&load, &common)?).await?.print();
        }
        Scenario::Retrieval(args) => {
            print_load("retrieval");
            retrieval::run(&retrieval::RetrievalOptions {
                chunks: args.chunks.max(1),
                queries: args.queries.max(1),
                vectors: args.vectors,
                plan_cache_mode: args.plan_cache_mode,
                ef_search: args.ef_search,
                keep_database: args.keep_database,
            })
            .await?;
        }
        Scenario::Floor { exchanges, concurrency, keep_logs } => {
            print_load("floor");
            floor::run(&floor::FloorOptions { exchanges, concurrency, keep_logs }).await?.0.print();
        }
        Scenario::All { ingest, load, common } => {
            print_load("ingest");
            ingest::run(&ingest_options(&ingest, &common)?).await?.print();
            let options = e2e_options(&load, &common)?;
            print_load("floor");
            let (floor_table, floor) = floor::run(&floor::FloorOptions {
                exchanges: 20_000,
                concurrency: common.connections,
                keep_logs: common.keep_logs,
            })
            .await?;
            floor_table.print();
            print_load("e2e");
            let outcome = end_to_end::run(&options, end_to_end::Topology::Serve).await?;
            end_to_end::table(&outcome).print();
            floor.compare(outcome.cpu_per_message(0, true), outcome.cpu_per_message(1, true)).print();
            print_load("memory");
            memory::run(&options).await?.print();
        }
        Scenario::BareServer { .. } => {}
    }
    print_load("the end");
    Ok(())
}

/// The load average before a scenario: other work on the machine skews every figure.
fn print_load(before: &str) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = load.split_whitespace().take(3).collect();
    println!("load average before {before} (1, 5, 15 min): {}", fields.join(" "));
}

fn parley_binary(common: &CommonArgs) -> Result<PathBuf, BenchError> {
    let path = match &common.parley {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("parley"),
    };
    if !path.is_file() {
        return Err(BenchError::Failed(format!(
            "{} not found: build it with `cargo build --release --bin parley` (or pass --parley)",
            path.display()
        )));
    }
    Ok(path)
}

fn ingest_options(args: &IngestArgs, common: &CommonArgs) -> Result<IngestOptions, BenchError> {
    Ok(IngestOptions {
        requests: args.requests.max(1),
        connections: common.connections.max(1),
        rounds: args.rounds.max(1),
        paced_seconds: args.paced_seconds.max(1),
        parley: parley_binary(common)?,
        keep_logs: common.keep_logs,
        parley_env: common.parley_env.clone(),
    })
}

fn e2e_options(args: &EndToEndArgs, common: &CommonArgs) -> Result<EndToEndOptions, BenchError> {
    Ok(EndToEndOptions {
        messages: args.messages.max(1),
        conversations: args.conversations.max(1),
        connections: common.connections.max(1),
        llm_delay: Duration::from_millis(args.llm_delay_ms),
        paced_fraction: args.paced_fraction.clamp(0.01, 1.0),
        worker_concurrency: args.worker_concurrency,
        idle_seconds: args.idle_seconds,
        knowledge_chunks: args.knowledge_chunks,
        parley: parley_binary(common)?,
        keep_logs: common.keep_logs,
        parley_env: common.parley_env.clone(),
    })
}

/// The machine the figures come from: cores, CPU model, memory.
fn print_machine() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    println!("machine: {cores} cores, {model}, {:.1} GiB RAM", ram_kib as f64 / (1024.0 * 1024.0));
}
