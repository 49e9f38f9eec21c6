//! Request tracing: a span per request (method and path) around the handler, so that what it logs
//! is attributed, and one line when it completes (status and duration). Never the query string —
//! the webhook's GET carries `hub.verify_token` in it — and never a header or a body.
//!
//! poem's own `Tracing` middleware is not used because it records the full URI.

use std::time::Instant;

use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use tracing::Instrument;

pub struct RequestLog;

impl<E: Endpoint> Middleware<E> for RequestLog {
    type Output = RequestLogEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RequestLogEndpoint { inner }
    }
}

pub struct RequestLogEndpoint<E> {
    inner: E,
}

impl<E: Endpoint> Endpoint for RequestLogEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        // At debug level only: the JSON lines do not print spans, and creating one per request
        // cost the webhook a measurable share of its CPU (BENCHMARKS.md).
        let span = tracing::debug_span!("http_request", method = %req.method(), path = %req.uri().path());
        let started = Instant::now();
        let result = self.inner.call(req).instrument(span.clone()).await.map(IntoResponse::into_response);
        let status = match &result {
            Ok(resp) => resp.status(),
            Err(e) => e.status(),
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let _entered = span.enter();
        // Server errors are worth a look; the rest is routine and kept out of production logs.
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), elapsed_ms, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), elapsed_ms, "request completed");
        }
        result
    }
}
