//! The go-live checklist's outage scenarios, end to end, on Redis and PostgreSQL servers that the
//! tests start on their own ports and stop: F (Redis down: the webhook spools to PostgreSQL and
//! the user is still answered), G (PostgreSQL down: the message waits in Redis and is answered
//! once it returns), and both down (500, so that the provider delivers again).

mod support;

use std::time::{Duration, Instant};

use parley::queue::intake::DEFAULT_REDIS_RETRY_AFTER;
use serde_json::Value;
use support::{
    Options, PHONE_NUMBER_ID, TestApp, USER,
    servers::{PgServer, RedisServer},
    webhook_body,
};

const WAIT: Duration = Duration::from_secs(15);

/// Short leases, so that a worker takes its shards back within a second once Redis returns
/// (the leases are gone with Redis's data).
fn short_leases() -> Vec<(String, String)> {
    vec![("WORKER_LEASE_TTL".into(), "3s".into())]
}

/// The events `name` about one inbound message.
fn events_for(app: &TestApp, name: &str, wamid: &str) -> Vec<Value> {
    app.events.named(name).into_iter().filter(|e| e["providerMessageId"] == wamid).collect()
}

/// Where the webhook made the message durable (`job_added.durableIn`).
fn durable_in(app: &TestApp, wamid: &str) -> String {
    let added = events_for(app, "job_added", wamid);
    assert_eq!(added.len(), 1, "one job_added for {wamid}: {added:?}");
    added[0]["durableIn"].as_str().unwrap_or_default().to_owned()
}

/// The inbound message each reply sent to Meta answers, in order.
fn answered(app: &TestApp) -> Vec<String> {
    app.meta().sent().iter().map(|b| b["context"]["message_id"].as_str().unwrap_or_default().to_owned()).collect()
}

/// A count on the test's database, retried while the store's pool finds its way back to a
/// restarted server (its idle connections died with the old one).
async fn count_when_reachable(app: &TestApp, sql: &str) -> i64 {
    let pool = app.env.store.pool().clone();
    support::eventually(WAIT, sql, || {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.ok() }
    })
    .await
}

/// `/ready`'s view of Redis: `up` or `down`.
async fn redis_check(app: &TestApp) -> Option<String> {
    let body: Value = reqwest::get(format!("{}/ready", app.base)).await.ok()?.json().await.ok()?;
    body["checks"]["redis"]["status"].as_str().map(str::to_owned)
}

/// Lets the service stop skipping the Redis that failed at `failed_at`: after a failure the
/// intake sends everything to the spool for [`DEFAULT_REDIS_RETRY_AFTER`].
async fn past_redis_retry_window(failed_at: Instant) {
    let until = failed_at + DEFAULT_REDIS_RETRY_AFTER + Duration::from_millis(100);
    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_with_redis_down_the_webhook_spools_to_postgres_and_the_user_is_still_answered() {
    let mut redis = RedisServer::start().await;
    let app =
        TestApp::spawn_with(Options { redis_url: redis.url(), extra_env: short_leases(), ..Default::default() }).await;

    assert_eq!(app.send_text(USER, "wamid.F1", "Avant la panne").await, 200);
    app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(durable_in(&app, "wamid.F1"), "redis");

    // Redis goes away: the webhook still takes the message, into PostgreSQL.
    redis.stop().await;
    let failed_at = Instant::now();
    assert_eq!(app.send_text(USER, "wamid.F2", "Pendant la panne").await, 200);
    assert_eq!(durable_in(&app, "wamid.F2"), "postgres");

    // The worker takes it straight from the spool; the Redis-backed stages fail open.
    let sent = app.meta().wait_for_sends(2, WAIT).await;
    assert_eq!(sent[1]["to"], USER);
    assert_eq!(sent[1]["text"]["body"], "Réponse à « Pendant la panne »");
    assert_eq!(sent[1]["context"]["message_id"], "wamid.F2");
    app.events.wait_for("message_sent", 2, WAIT).await;
    let mut failed_open: Vec<String> = events_for(&app, "stage_failed_open", "wamid.F2")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    failed_open.sort();
    assert_eq!(failed_open, ["dedupe", "ratelimit"], "the stages that need Redis, and only them");
    let names = app.events.names_for("wamid.F2");
    assert!(names.contains(&"llm_request".to_owned()), "{names:?}");
    support::eventually(WAIT, "the spool to be drained", || async {
        (app.count("select count(*) from inbound_spool where done_at is null").await == 0).then_some(())
    })
    .await;

    // Redis returns (empty: no persistence): intake goes back to the streams, stages to normal.
    redis.restart().await;
    support::eventually(WAIT, "/ready to see Redis up", || async { (redis_check(&app).await? == "up").then_some(()) })
        .await;
    past_redis_retry_window(failed_at).await;
    assert_eq!(app.send_text(USER, "wamid.F3", "Après la panne").await, 200);
    assert_eq!(durable_in(&app, "wamid.F3"), "redis");
    let sent = app.meta().wait_for_sends(3, WAIT).await;
    assert_eq!(sent[2]["text"]["body"], "Réponse à « Après la panne »");
    app.events.wait_for("message_sent", 3, WAIT).await;
    let names = app.events.names_for("wamid.F3");
    assert!(!names.contains(&"stage_failed_open".to_owned()), "Redis is back: {names:?}");

    // Nothing answered twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(&app), ["wamid.F1", "wamid.F2", "wamid.F3"]);
    assert_eq!(app.env.llm.requests(), 3);
    let rows = app.count("select count(*) from messages where direction = 'inbound'").await;
    let replies = app.count("select count(*) from messages where direction = 'outbound' and status = 'sent'").await;
    assert_eq!((rows, replies), (3, 3));

    app.stop().await;
    redis.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_with_postgresql_down_the_message_waits_in_redis_and_is_answered_once_it_returns() {
    let mut pg = PgServer::start().await;
    let app =
        TestApp::spawn_with(Options { database: Some(pg.database()), extra_env: short_leases(), ..Default::default() })
            .await;

    assert_eq!(app.send_text(USER, "wamid.G1", "Avant la panne").await, 200);
    app.meta().wait_for_sends(1, WAIT).await;

    // PostgreSQL goes away: Redis holds the message, the worker retries it with backoff.
    pg.stop().await;
    assert_eq!(app.send_text(USER, "wamid.G2", "Pendant la panne").await, 200);
    assert_eq!(durable_in(&app, "wamid.G2"), "redis");
    support::eventually(WAIT, "two job_retry events for wamid.G2", || async {
        (events_for(&app, "job_retry", "wamid.G2").len() >= 2).then_some(())
    })
    .await;
    assert_eq!(app.meta().sent().len(), 1, "nothing answered without the database");
    assert!(events_for(&app, "job_failed", "wamid.G2").is_empty());

    // PostgreSQL returns: the next attempt goes through, once.
    pg.restart().await;
    let sent = app.meta().wait_for_sends(2, WAIT).await;
    assert_eq!(sent[1]["text"]["body"], "Réponse à « Pendant la panne »");
    assert_eq!(sent[1]["context"]["message_id"], "wamid.G2");
    app.events.wait_for("message_sent", 2, WAIT).await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(&app), ["wamid.G1", "wamid.G2"]);
    let inbound = count_when_reachable(
        &app,
        "select count(*) from messages where direction = 'inbound' and provider_message_id = 'wamid.G2'",
    )
    .await;
    let outbound = count_when_reachable(
        &app,
        "select count(*) from messages where direction = 'outbound' and in_reply_to = 'wamid.G2'",
    )
    .await;
    assert_eq!((inbound, outbound), (1, 1));
    assert_eq!(events_for(&app, "message_sent", "wamid.G2").len(), 1);

    app.stop().await;
    pg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_and_postgresql_down_the_webhook_answers_500_so_the_provider_retries() {
    let (mut redis, mut pg) = tokio::join!(RedisServer::start(), PgServer::start());
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        database: Some(pg.database()),
        extra_env: short_leases(),
        ..Default::default()
    })
    .await;
    let body = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.X1", "Personne pour me garder")]);

    tokio::join!(redis.stop(), pg.stop());
    let (status, answer) = app.post(&body).await;
    assert_eq!(status, 500, "{answer}");
    assert!(!answer.contains("127.0.0.1") && !answer.contains("postgres://"), "no infrastructure detail: {answer}");
    assert!(events_for(&app, "job_added", "wamid.X1").is_empty());

    // The provider delivers again until one of them takes it; then it is answered, once.
    tokio::join!(redis.restart(), pg.restart());
    support::eventually(WAIT, "the webhook to accept the redelivery", || async {
        (app.post(&body).await.0 == 200).then_some(())
    })
    .await;
    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(sent[0]["context"]["message_id"], "wamid.X1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.meta().sent().len(), 1);

    app.stop().await;
    tokio::join!(redis.stop(), pg.stop());
}
