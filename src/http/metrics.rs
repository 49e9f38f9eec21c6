//! `GET /metrics` (the Prometheus text of the process's recorder) and the HTTP metrics: requests
//! per route and status, and their duration, for the checklist's webhook latency and 5xx-rate
//! alerts.

use std::{sync::OnceLock, time::Instant};

use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result, handler, http::StatusCode, web::Data};

use super::{HttpState, json_error};

pub const HTTP_REQUESTS_TOTAL: &str = "parley_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "parley_http_request_duration_seconds";
/// Webhook events accepted, by `kind` (`message`, `status`).
pub const WEBHOOK_EVENTS_TOTAL: &str = "parley_webhook_events_total";
/// Webhook bodies refused, by `reason` (`too_large`, `unauthenticated`, `invalid`, `intake_failed`).
pub const WEBHOOK_REJECTED_TOTAL: &str = "parley_webhook_rejected_total";

#[handler]
pub async fn scrape(state: Data<&HttpState>) -> Response {
    match &state.metrics {
        Some(handle) => Response::builder().content_type("text/plain; version=0.0.4").body(handle.render()),
        None => json_error(StatusCode::NOT_FOUND, "metrics are not enabled in this process"),
    }
}

/// Records every request of the endpoint it wraps under a fixed route label (never the raw
/// path, which would make one series per URL).
pub struct RouteMetrics {
    route: &'static str,
}

impl RouteMetrics {
    pub fn new(route: &'static str) -> Self {
        Self { route }
    }
}

impl<E: Endpoint> Middleware<E> for RouteMetrics {
    type Output = RouteMetricsEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RouteMetricsEndpoint { inner, route: self.route, handles: OnceLock::new() }
    }
}

pub struct RouteMetricsEndpoint<E> {
    inner: E,
    route: &'static str,
    /// The route's duration histogram and its 200 counter, looked up once (from the recorder
    /// installed when the first request came) instead of per request; other statuses are rare.
    handles: OnceLock<(metrics::Histogram, metrics::Counter)>,
}

impl<E: Endpoint> Endpoint for RouteMetricsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        let started = Instant::now();
        let result = self.inner.call(req).await.map(IntoResponse::into_response);
        let status = match &result {
            Ok(resp) => resp.status(),
            Err(e) => e.status(),
        };
        let (duration, ok) = self.handles.get_or_init(|| {
            (
                metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => self.route),
                metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => self.route, "status" => "200"),
            )
        });
        if status == StatusCode::OK {
            ok.increment(1);
        } else {
            metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => self.route, "status" => status.as_str().to_owned())
                .increment(1);
        }
        duration.record(started.elapsed().as_secs_f64());
        result
    }
}
