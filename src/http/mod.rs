//! Parley's HTTP surface: the WhatsApp webhook (and its legacy URL), health and readiness,
//! Prometheus metrics, the admin API (JWT) with its OpenAPI document, and the cross-cutting layers
//! (request tracing, CORS, security headers).
//!
//! | route | module |
//! | --- | --- |
//! | `GET\|POST /api/v1/whatsapp/webhook` | [`webhook`] |
//! | `/whatsapp/webhook` (410) | [`legacy`] |
//! | `GET /health`, `GET /ready` | [`health`] |
//! | `GET /metrics` | [`metrics`] |
//! | `/api/v1/admin/*` | [`admin`] (per-IP [`rate_limit`]); `/api/v1/admin/knowledge/*` in [`knowledge`] |
//! | `/api/v1/docs` (when ENABLE_SWAGGER) | Swagger UI, `/api/v1/docs/openapi.json` |

pub mod admin;
pub mod auth;
pub mod health;
pub mod knowledge;
pub mod legacy;
pub mod metrics;
pub mod rate_limit;
pub mod request_log;
pub mod webhook;

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use poem::{
    EndpointExt, Response, Route,
    endpoint::BoxEndpoint,
    get,
    http::StatusCode,
    middleware::{Cors, SetHeader},
};

pub use health::{DependencyState, Readiness, ReadyReport};

use crate::{queue::Intake, settings::Settings};

/// Where the OpenAPI document and Swagger UI are served when ENABLE_SWAGGER=true.
pub const DOCS_PREFIX: &str = "/api/v1/docs";

/// What the handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub settings: Arc<Settings>,
    pub intake: Arc<dyn Intake>,
    pub events: Arc<dyn engine::events::EventSink>,
    pub readiness: Arc<dyn Readiness>,
    /// The pipeline of this process; `None` in `parley api`, which runs no pipeline: the admin
    /// reload then answers 503.
    pub reloader: Option<Arc<engine::reload::Reloader>>,
    /// The Prometheus recorder's handle; `None`: `/metrics` answers 404.
    pub metrics: Option<PrometheusHandle>,
    /// Tells the other replicas to reload after an admin reload; `None`: this process only.
    pub reload_broadcast: Option<Arc<dyn admin::ReloadBroadcast>>,
}

/// Every route, with the layers the settings ask for. Serve it with `poem::Server`.
pub fn routes(state: HttpState) -> BoxEndpoint<'static> {
    let settings = Arc::clone(&state.settings);
    let admin = admin::admin_api(&state);

    let mut app = Route::new()
        .at(
            webhook::WEBHOOK_PATH,
            get(webhook::verify).post(webhook::receive).with(metrics::RouteMetrics::new("webhook")),
        )
        .at(legacy::LEGACY_WEBHOOK_PATH, legacy::gone.with(metrics::RouteMetrics::new("legacy_webhook")))
        .at("/health", get(health::health))
        .at("/ready", get(health::ready))
        .at("/metrics", get(metrics::scrape));
    if settings.enable_swagger {
        app =
            app.at(format!("{DOCS_PREFIX}/openapi.json"), admin.spec_endpoint()).nest(DOCS_PREFIX, admin.swagger_ui());
    }
    let app = app.nest(
        admin::ADMIN_PREFIX,
        admin
            .with(rate_limit::PerIpRateLimit::new(settings.rate_limit_max, settings.rate_limit_window))
            .with(metrics::RouteMetrics::new("admin")),
    );

    app.data(state)
        .with_if(settings.enable_helmet, security_headers())
        .with_if(settings.enable_cors, Cors::new())
        .with(request_log::RequestLog)
        .boxed()
}

/// Helmet's defaults that matter for a JSON API. No Content-Security-Policy: nothing here is a web
/// page but Swagger UI, which needs inline scripts.
fn security_headers() -> SetHeader {
    SetHeader::new()
        .overriding("X-Content-Type-Options", "nosniff")
        .overriding("X-Frame-Options", "DENY")
        .overriding("Referrer-Policy", "no-referrer")
        .overriding("Strict-Transport-Security", "max-age=15552000; includeSubDomains")
        .overriding("X-DNS-Prefetch-Control", "off")
        .overriding("X-Permitted-Cross-Domain-Policies", "none")
        .overriding("X-XSS-Protection", "0")
}

/// `{"error": text}` with `status`.
pub(crate) fn json_error(status: StatusCode, text: &str) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(serde_json::json!({ "error": text }).to_string())
}

#[cfg(test)]
mod tests;
