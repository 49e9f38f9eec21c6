//! `GET /health` (liveness: the process answers; public, no dependency checked, nothing secret)
//! and `GET /ready` (readiness: PostgreSQL, Redis and its eviction policy, the pipeline generation,
//! live workers, the spool backlog).
//!
//! Readiness answers "should this replica receive webhooks?". The webhook makes an event durable in
//! Redis, or in PostgreSQL's spool while Redis is down, so one dependency down still leaves a
//! replica able to accept: `/ready` then answers 200 with `"status": "degraded"` and a warning,
//! rather than 503, which would make a load balancer pull every replica at once and turn a degraded
//! service into an outage. Only both down (nothing can make an event durable) answers 503. A
//! monitor that wants every dependency up asks `GET /ready?strict=true`, which answers 503 unless
//! the status is `ready`.

use std::time::Duration;

use poem::{
    IntoResponse, Response, handler,
    http::StatusCode,
    web::{Data, Json, Query},
};
use serde::{Deserialize, Serialize};

use super::HttpState;

/// How long `/ready` waits for the checks: a probe that hangs is a failed probe.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The state of one dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyState {
    Up,
    /// Down, with a short reason. The reason is shown on `/ready`: it must hold no secret (no
    /// connection URL with its password).
    Down(String),
}

impl DependencyState {
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Up)
    }
}

/// What the application knows about its dependencies and its work, for `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyReport {
    pub postgres: DependencyState,
    pub redis: DependencyState,
    /// `CONFIG GET maxmemory-policy`, when Redis answered it.
    pub redis_eviction_policy: Option<String>,
    /// The pipeline generation serving new jobs; `None` in a process without workers (`parley api`).
    pub pipeline_generation: Option<u64>,
    /// Workers alive across the deployment (held leases); `None` when unknown.
    pub live_workers: Option<u64>,
    /// Events waiting in the PostgreSQL spool; `None` when unknown.
    pub spool_backlog: Option<u64>,
}

/// Checks the application's dependencies; implemented by the application that owns the pools.
#[async_trait::async_trait]
pub trait Readiness: Send + Sync {
    async fn check(&self) -> ReadyReport;
}

#[derive(Debug, Serialize)]
struct HealthBody {
    status: &'static str,
    version: &'static str,
}

#[handler]
pub async fn health() -> Json<HealthBody> {
    Json(HealthBody { status: "ok", version: env!("CARGO_PKG_VERSION") })
}

#[derive(Debug, Default, Deserialize)]
pub struct ReadyQuery {
    #[serde(default)]
    strict: bool,
}

/// The body of `/ready`, the same for 200 and 503.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReadyBody {
    /// `ready` (everything up), `degraded` (one of PostgreSQL and Redis down: webhooks are still
    /// accepted) or `unavailable`.
    pub status: String,
    pub checks: ReadyChecks,
    pub pipeline_generation: Option<u64>,
    pub live_workers: Option<u64>,
    pub spool_backlog: Option<u64>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ReadyChecks {
    pub postgres: CheckBody,
    pub redis: CheckBody,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckBody {
    /// `up` or `down`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_policy: Option<String>,
}

impl CheckBody {
    fn of(state: &DependencyState, eviction_policy: Option<String>) -> Self {
        match state {
            DependencyState::Up => Self { status: "up".into(), error: None, eviction_policy },
            DependencyState::Down(e) => Self { status: "down".into(), error: Some(e.clone()), eviction_policy },
        }
    }
}

#[handler]
pub async fn ready(state: Data<&HttpState>, query: Query<ReadyQuery>) -> Response {
    let report = match tokio::time::timeout(READY_TIMEOUT, state.readiness.check()).await {
        Ok(report) => report,
        Err(_) => {
            let timed_out = || DependencyState::Down("readiness check timed out".into());
            ReadyReport {
                postgres: timed_out(),
                redis: timed_out(),
                redis_eviction_policy: None,
                pipeline_generation: None,
                live_workers: None,
                spool_backlog: None,
            }
        }
    };
    let body = ready_body(report);
    let ok = match body.status.as_str() {
        "ready" => true,
        "degraded" => !query.strict,
        _ => false,
    };
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Json(body).with_status(status).into_response()
}

fn ready_body(report: ReadyReport) -> ReadyBody {
    let mut warnings = Vec::new();
    let (pg, redis) = (report.postgres.is_up(), report.redis.is_up());
    let status = match (pg, redis) {
        (true, true) => "ready",
        (false, false) => "unavailable",
        _ => "degraded",
    };
    if !redis && pg {
        warnings
            .push("redis is down: webhooks are spooled to PostgreSQL and the Redis-backed stages fail open".to_owned());
    }
    if !pg && redis {
        warnings.push("postgresql is down: webhooks are queued in Redis; jobs are retried until it returns".to_owned());
    }
    if !pg && !redis {
        warnings.push("postgresql and redis are down: webhooks are refused with 500 until one returns".to_owned());
    }
    if let Some(policy) = report.redis_eviction_policy.as_deref()
        && policy != "noeviction"
    {
        warnings.push(format!(
            "redis maxmemory-policy is `{policy}`: under memory pressure Redis may evict queued jobs; set it to `noeviction`"
        ));
    }
    if report.live_workers == Some(0) {
        warnings.push("no live worker: accepted messages wait in the queue".to_owned());
    }
    if redis && report.spool_backlog.is_some_and(|n| n > 0) {
        warnings.push(format!(
            "{} event(s) from a Redis outage wait in the PostgreSQL spool",
            report.spool_backlog.unwrap_or_default()
        ));
    }
    ReadyBody {
        status: status.to_owned(),
        checks: ReadyChecks {
            postgres: CheckBody::of(&report.postgres, None),
            redis: CheckBody::of(&report.redis, report.redis_eviction_policy),
        },
        pipeline_generation: report.pipeline_generation,
        live_workers: report.live_workers,
        spool_backlog: report.spool_backlog,
        warnings,
    }
}
