//! `floor`: the least CPU a message's exchanges cost a client on this machine, whatever the client
//! does around them. Each kind of exchange a message needs — a PostgreSQL statement (sqlx, as
//! Parley runs its statements), a Redis script call (redis-rs's connection manager, as Parley's
//! stages), an HTTP call out (reqwest, as the LLM and Meta clients) and an HTTP request served (a
//! bare poem server, as the webhook without its work) — is repeated with nothing else around it,
//! one at a time (as in the e2e paced phase) and `concurrency` at once (as in its burst), and the
//! CPU of the side measured is divided by the exchanges. The servers on the other side run in
//! their own processes (PostgreSQL, Redis, the bare server), so that only the client's CPU counts,
//! except for the served request, where only the server's does. One at a time, the exchanges run
//! in the cheapest layout there is: one single-threaded runtime (and a single-threaded server),
//! so that no other thread is woken; at once, on a multi-threaded runtime as `parley serve`'s.
//!
//! Multiplied by the exchanges of one message (see [`PER_MESSAGE`]), these give a floor under
//! `parley serve`'s CPU per message: what it would cost if Parley did nothing but its exchanges.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use parley::kv;
use secrecy::SecretString;
use sqlx::{Connection, PgConnection};

use crate::{
    BenchError,
    fixture::Fixture,
    http_load,
    processes::{Spawned, cpu_time},
    report::{Table, Verdict},
};

pub struct FloorOptions {
    /// Exchanges of each kind per measurement.
    pub exchanges: usize,
    /// The "at once" concurrency (the e2e burst's jobs in flight: 64).
    pub concurrency: usize,
    pub keep_logs: bool,
}

/// The exchanges of one message end to end, from the code (BENCHMARKS.md, "PostgreSQL round trips
/// per message"): 6 statements; Redis: the webhook's XADD, the worker's read, the dedupe and rate
/// limit scripts and the ack (5; in a burst the XADD and the read are shared by several messages,
/// so only the last 3 are counted there); the LLM and Meta calls; the webhook's request.
pub struct PerMessage {
    pub statements: f64,
    pub redis_one_at_a_time: f64,
    pub redis_at_once: f64,
    pub http_calls: f64,
    pub http_served: f64,
}

pub const PER_MESSAGE: PerMessage =
    PerMessage { statements: 6.0, redis_one_at_a_time: 5.0, redis_at_once: 3.0, http_calls: 2.0, http_served: 1.0 };

/// CPU per exchange of one kind, one at a time and at once.
#[derive(Debug, Clone, Copy)]
struct Cost {
    one_at_a_time: Duration,
    at_once: Duration,
}

/// The floor of one message: its exchanges' CPU, one at a time and at once.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub one_at_a_time: Duration,
    pub at_once: Duration,
}

impl Floor {
    /// How Parley's measured CPU per message in the e2e phases compares with the floor: the burst
    /// and paced phases' figures (net of idle) over the one-at-a-time floor, the regime of the e2e
    /// scenario (see BENCHMARKS.md, session 5).
    pub fn compare(&self, burst: Duration, paced: Duration) -> Table {
        let mut table = Table::new("Parley's CPU per message against the floor of its exchanges (same run)");
        let ratio = |d: Duration| d.as_secs_f64() / self.one_at_a_time.as_secs_f64().max(1e-9);
        table.info(
            "floor per message, one at a time · at once",
            format!("{} · {}", ms(self.one_at_a_time), ms(self.at_once)),
        );
        table.info(
            "e2e burst: Parley CPU per message (net) · ÷ the one-at-a-time floor",
            format!("{} · {:.2}", ms(burst), ratio(burst)),
        );
        table.info(
            "e2e paced: Parley CPU per message (net) · ÷ the one-at-a-time floor",
            format!("{} · {:.2}", ms(paced), ratio(paced)),
        );
        table
    }
}

pub async fn run(options: &FloorOptions) -> Result<(Table, Floor), BenchError> {
    let fixture = Fixture::create(0).await?;
    let result = measure(options, &fixture).await;
    fixture.cleanup(options.keep_logs).await;
    result
}

async fn measure(options: &FloorOptions, fixture: &Fixture) -> Result<(Table, Floor), BenchError> {
    let n = options.exchanges.max(options.concurrency);
    let c = options.concurrency.max(1);
    let url = fixture.database_url(None)?;
    let (redis_url, key) = (fixture.redis_url.clone(), format!("{}:floor", fixture.queue_prefix));

    let pg = Cost {
        one_at_a_time: alone({
            let url = url.clone();
            move || statements(url, n, 1)
        })
        .await?,
        at_once: statements(url, n, c).await?,
    };
    let redis = Cost {
        one_at_a_time: alone({
            let (redis_url, key) = (redis_url.clone(), key.clone());
            move || scripts(redis_url, key, n, 1)
        })
        .await?,
        at_once: scripts(redis_url, key, n, c).await?,
    };
    // The request served one at a time by a single-threaded server (the cheapest layout, as
    // Parley's HTTP threads), many at once by poem's default multi-threaded one.
    let served_alone = served_by(&fixture.logs, &["--current-thread"], n, 1).await?;
    let (served_at_once, calls) = {
        let (bare, addr) = Spawned::bare_server(&fixture.logs, &[]).await?;
        let measured = async {
            let served = served(addr, bare.pid, n, c).await?;
            let calls = Cost {
                one_at_a_time: alone(move || http_calls(addr, n, 1)).await?,
                at_once: http_calls(addr, n, c).await?,
            };
            Ok::<_, BenchError>((served, calls))
        }
        .await;
        bare.terminate(Duration::from_secs(5)).await;
        measured?
    };
    let served = Cost { one_at_a_time: served_alone, at_once: served_at_once };

    let floor = |pick: fn(&Cost) -> Duration, redis_count: f64| {
        pick(&pg).mul_f64(PER_MESSAGE.statements)
            + pick(&redis).mul_f64(redis_count)
            + pick(&calls).mul_f64(PER_MESSAGE.http_calls)
            + pick(&served).mul_f64(PER_MESSAGE.http_served)
    };
    let floor_paced = floor(|c| c.one_at_a_time, PER_MESSAGE.redis_one_at_a_time);
    let floor_burst = floor(|c| c.at_once, PER_MESSAGE.redis_at_once);

    let mut table =
        Table::new(format!("floor — CPU per exchange, {n} exchanges of each kind, one at a time and {c} at once"));
    let row = |table: &mut Table, what: &str, cost: Cost| {
        table.info(what, format!("{} · {}", us(cost.one_at_a_time), us(cost.at_once)));
    };
    row(&mut table, "PostgreSQL statement (sqlx, prepared, one row): client CPU, one at a time · at once", pg);
    row(&mut table, "Redis script call (EVALSHA, connection manager): client CPU, one at a time · at once", redis);
    row(&mut table, "HTTP call out (reqwest, keep-alive, JSON body): client CPU, one at a time · at once", calls);
    row(&mut table, "HTTP request served (bare poem server): server CPU, one at a time · at once", served);
    let target = Duration::from_micros(300);
    table.target(
        "floor per message, one at a time (6 statements, 5 Redis calls, 2 HTTP calls, 1 request served)",
        ms(floor_paced),
        "≤ 0.3 ms (Parley's whole CPU)",
        Verdict::of(floor_paced <= target),
    );
    table.target(
        format!("floor per message, {c} at once (6 statements, 3 Redis calls, 2 HTTP calls, 1 request served)"),
        ms(floor_burst),
        "≤ 0.3 ms (Parley's whole CPU)",
        Verdict::of(floor_burst <= target),
    );
    table.note(
        "CPU of the measured side only (user + system, kernel work on its behalf included), divided by the \
         exchanges; PostgreSQL's, Redis's and the peer's CPU are not counted.",
    );
    table.note(
        "A floor: Parley's own work around the exchanges (JSON, the pipeline, events, timers) comes on top; \
         `parley serve`'s measured CPU per message is in the e2e table.",
    );
    Ok((table, Floor { one_at_a_time: floor_paced, at_once: floor_burst }))
}

/// CPU of this process per `SELECT $1::int8 + 1` over `concurrency` connections, each held for
/// its whole loop (no pool checks between statements, as Parley's kept connections).
async fn statements(url: String, n: usize, concurrency: usize) -> Result<Duration, BenchError> {
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut conn = PgConnection::connect(&url).await.map_err(|e| BenchError::Failed(format!("PostgreSQL: {e}")))?;
        // Prepares the statement, outside the measured loop.
        select(&mut conn, 0).await?;
        conns.push(conn);
    }
    let per_task = n / concurrency;
    let (cpu, conns) = measure_cpu(all_tasks(conns.into_iter().map(|mut conn| async move {
        for i in 0..per_task {
            select(&mut conn, i as i64).await?;
        }
        Ok(conn)
    })))
    .await?;
    for conn in conns {
        let _ = conn.close().await;
    }
    Ok(cpu.div_f64((per_task * concurrency) as f64))
}

async fn select(conn: &mut PgConnection, i: i64) -> Result<(), BenchError> {
    let got: i64 = sqlx::query_scalar("select $1::int8 + 1")
        .bind(i)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| BenchError::Failed(format!("PostgreSQL: {e}")))?;
    if got != i + 1 {
        return Err(BenchError::Failed(format!("PostgreSQL answered {got} to {i} + 1")));
    }
    Ok(())
}

/// CPU of this process per call of a one-line script on a key of the run's prefix, `concurrency`
/// tasks sharing one connection manager (as Parley's stages share theirs).
async fn scripts(redis_url: SecretString, key: String, n: usize, concurrency: usize) -> Result<Duration, BenchError> {
    let conn = kv::connect(&redis_url).await.map_err(|e| BenchError::Failed(format!("Redis: {e}")))?;
    let script = Arc::new(redis::Script::new("return redis.call('INCR', KEYS[1])"));
    let key = Arc::new(key);
    let mut warm = conn.clone();
    let _: i64 =
        script.key(&*key).invoke_async(&mut warm).await.map_err(|e| BenchError::Failed(format!("Redis: {e}")))?;
    let per_task = n / concurrency;
    let (cpu, _) = measure_cpu(all_tasks((0..concurrency).map(|_| {
        let (script, key, mut conn) = (script.clone(), key.clone(), conn.clone());
        async move {
            for _ in 0..per_task {
                let _: i64 = script
                    .key(&*key)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| BenchError::Failed(format!("Redis: {e}")))?;
            }
            Ok(())
        }
    })))
    .await?;
    let _: Result<i64, _> = redis::cmd("DEL").arg(&*key).query_async(&mut warm).await;
    Ok(cpu.div_f64((per_task * concurrency) as f64))
}

/// A body the size of an LLM request's.
fn call_body() -> String {
    let text = "Bonjour, quels sont vos horaires d'ouverture le samedi ? ".repeat(4);
    serde_json::json!({
        "model": "local",
        "messages": [
            {"role": "system", "content": "Tu es l'assistant de la Boutique Bench."},
            {"role": "user", "content": text},
        ],
    })
    .to_string()
}

/// CPU of this process per `POST` to the bare server with reqwest, `concurrency` tasks sharing one
/// client (and its keep-alive pool), as Parley's LLM and Meta clients.
async fn http_calls(addr: SocketAddr, n: usize, concurrency: usize) -> Result<Duration, BenchError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| BenchError::Failed(format!("HTTP client: {e}")))?;
    let url = Arc::new(format!("http://{addr}/v1/chat/completions"));
    let body = Arc::new(call_body());
    let call = |client: reqwest::Client, url: Arc<String>, body: Arc<String>| async move {
        let response = client
            .post(url.as_str())
            .header("content-type", "application/json")
            .body(body.as_str().to_owned())
            .send()
            .await
            .map_err(|e| BenchError::Failed(format!("HTTP call: {e}")))?;
        let status = response.status();
        let _ = response.bytes().await.map_err(|e| BenchError::Failed(format!("HTTP call: {e}")))?;
        if !status.is_success() {
            return Err(BenchError::Failed(format!("the bare server answered {status}")));
        }
        Ok(())
    };
    // Opens the pool's connections outside the measured loop.
    all_tasks((0..concurrency).map(|_| call(client.clone(), url.clone(), body.clone()))).await?;
    let per_task = n / concurrency;
    let (cpu, _) = measure_cpu(all_tasks((0..concurrency).map(|_| {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move {
            for _ in 0..per_task {
                call(client.clone(), url.clone(), body.clone()).await?;
            }
            Ok(())
        }
    })))
    .await?;
    Ok(cpu.div_f64((per_task * concurrency) as f64))
}

/// [`served`] by a bare server started with `args` for this measurement.
async fn served_by(logs: &Path, args: &[&str], n: usize, concurrency: usize) -> Result<Duration, BenchError> {
    let (bare, addr) = Spawned::bare_server(logs, args).await?;
    let cost = served(addr, bare.pid, n, concurrency).await;
    bare.terminate(Duration::from_secs(5)).await;
    cost
}

/// Runs `work` on a single-threaded runtime of its own thread, where it makes its own connections:
/// the cheapest layout for exchanges made one at a time (no other thread is woken), so that the
/// figure is a floor. This process's other threads are idle meanwhile.
async fn alone<F, Fut>(work: F) -> Result<Duration, BenchError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Duration, BenchError>>,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(work())
    })
    .await
    .map_err(|e| BenchError::Failed(e.to_string()))?
}

/// CPU of the bare server per request it serves, from this benchmark's load generator over
/// `concurrency` keep-alive connections.
async fn served(addr: SocketAddr, pid: u32, n: usize, concurrency: usize) -> Result<Duration, BenchError> {
    let request = http_load::post_request(addr, "/api/v1/whatsapp/webhook", &[], call_body().as_bytes());
    let requests = Arc::new(vec![request; n]);
    http_load::closed_loop(addr, Arc::new(requests[..concurrency.min(n)].to_vec()), concurrency).await?;
    let before = cpu_time(pid);
    let run = http_load::closed_loop(addr, requests, concurrency).await?;
    let used = cpu_time(pid).saturating_sub(before);
    if run.ok() != n {
        return Err(BenchError::Failed(format!("the bare server answered {} of {n} requests", run.ok())));
    }
    Ok(used.div_f64(n as f64))
}

/// Runs each of `tasks` as a task of its own, all at once, and waits for every one: their outputs,
/// in order, or the first error.
async fn all_tasks<T, Fut>(tasks: impl IntoIterator<Item = Fut>) -> Result<Vec<T>, BenchError>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, BenchError>> + Send + 'static,
{
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.map_err(|e| BenchError::Failed(e.to_string()))??);
    }
    Ok(outputs)
}

/// This process's CPU while `work` runs.
async fn measure_cpu<T>(work: impl Future<Output = Result<T, BenchError>>) -> Result<(Duration, T), BenchError> {
    let pid = std::process::id();
    let before = cpu_time(pid);
    let out = work.await?;
    Ok((cpu_time(pid).saturating_sub(before), out))
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}
