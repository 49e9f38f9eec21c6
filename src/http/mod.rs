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
    Endpoint, EndpointExt, Request, Response, Route,
    endpoint::BoxEndpoint,
    get,
    http::{Method, StatusCode, header},
    middleware::{Cors, SetHeader},
};

pub use health::{DependencyState, Readiness, ReadyReport};

use crate::{providers::credentials::ChannelCredentialCache, queue::Intake, settings::Settings};

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
    /// The channels' own webhook tokens (360dialog); `None`: only `WHATSAPP_WEBHOOK_TOKEN` exists.
    pub channel_credentials: Option<Arc<ChannelCredentialCache>>,
    /// What the knowledge endpoints need (given to them as request data); `None`: they answer 500.
    pub knowledge: Option<knowledge::KnowledgeDeps>,
}

/// Every route, with the layers the settings ask for. Serve it with `poem::Server`.
///
/// The webhook's POST — nearly all of the traffic — is served ahead of the router by the same
/// layers, bar the two that cannot apply to it: it needs no request data (its handler gets the
/// state directly) and a request without an `Origin` header is not a CORS request (poem's `Cors`
/// passes it through untouched; one with the header takes the full stack). The router, the
/// request-data insertions and one boxed future per layer cost it ~10 % of its CPU (BENCHMARKS.md).
pub fn routes(state: HttpState) -> BoxEndpoint<'static> {
    let settings = Arc::clone(&state.settings);
    let webhook_post = WebhookPost(state.clone())
        .with(metrics::RouteMetrics::new("webhook"))
        .with_if(settings.enable_helmet, security_headers())
        .with(request_log::RequestLog);
    Front { webhook_post, stack: stack(state) }.boxed()
}

/// Every route behind the router, each layer boxed.
fn stack(state: HttpState) -> BoxEndpoint<'static> {
    let settings = Arc::clone(&state.settings);
    let admin = admin::admin_api(&state);
    let knowledge = state.knowledge.clone();

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

    let app = match knowledge {
        Some(deps) => app.data(deps).boxed(),
        None => app.boxed(),
    };
    app.data(state)
        .with_if(settings.enable_helmet, security_headers())
        .with_if(settings.enable_cors, Cors::new())
        .with(request_log::RequestLog)
        .boxed()
}

/// The webhook's POST ahead of the router, else the whole stack; see [`routes`].
struct Front<W> {
    webhook_post: W,
    stack: BoxEndpoint<'static>,
}

impl<W: Endpoint<Output = Response>> Endpoint for Front<W> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if req.method() == Method::POST
            && req.uri().path() == webhook::WEBHOOK_PATH
            && !req.headers().contains_key(header::ORIGIN)
        {
            self.webhook_post.call(req).await
        } else {
            self.stack.call(req).await
        }
    }
}

/// [`webhook::receive`] with the state at hand instead of in the request data.
struct WebhookPost(HttpState);

impl Endpoint for WebhookPost {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let body = req.take_body();
        Ok(webhook::accept_notification(&self.0, &req, body).await)
    }
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
