//! The admin API, `/api/v1/admin/*` (bearer JWT, role `admin` or `super-admin`), described with
//! poem-openapi: one `#[OpenApi]` struct per area, combined in [`admin_api`]: the pipeline
//! reload, and the knowledge base ([`super::knowledge`]).

use std::sync::Arc;

use engine::reload::{ReloadError, ReloadOutcome, Reloader};
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, Tags, payload::Json};
use secrecy::SecretString;

use super::{
    HttpState,
    auth::{ADMIN_ROLES, AuthFailure, BearerAuth, authorize},
};

/// Where the admin API is mounted.
pub const ADMIN_PREFIX: &str = "/api/v1/admin";

#[derive(Tags)]
enum AdminTag {
    /// The pipeline configuration.
    Pipelines,
}

/// `{"error": "..."}`: what went wrong, short, without internals.
#[derive(Debug, Object)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    pub(crate) fn new(text: impl Into<String>) -> Json<Self> {
        Json(Self { error: text.into() })
    }
}

/// The outcome of a reload that succeeded.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct ReloadedBody {
    /// `reloaded` (a new generation serves new jobs) or `unchanged` (the file did not change).
    pub status: String,
    /// The generation now serving.
    pub generation: u64,
    /// Stage instances built for the new generation (absent when unchanged).
    #[oai(skip_serializing_if_is_none)]
    pub stages_built: Option<u64>,
    /// Stage instances carried over unchanged (absent when unchanged).
    #[oai(skip_serializing_if_is_none)]
    pub stages_reused: Option<u64>,
}

/// A refused file: the previous generation keeps serving.
#[derive(Debug, Object)]
pub struct InvalidBody {
    /// Always `invalid`.
    pub status: String,
    /// The generation still serving.
    pub generation: u64,
    /// Every problem, one line each (`file:line: error: key: message`).
    pub errors: Vec<String>,
}

#[derive(ApiResponse)]
pub enum ReloadResponse {
    /// The file was reloaded, or had not changed.
    #[oai(status = 200)]
    Done(Json<ReloadedBody>),
    /// No token, or an invalid or expired one.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// A valid token whose role is neither `admin` nor `super-admin`.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The file is invalid; nothing changed.
    #[oai(status = 422)]
    Invalid(Json<InvalidBody>),
    /// More than RATE_LIMIT_MAX admin requests from this address in RATE_LIMIT_WINDOW.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>),
    /// This process runs no pipeline (`parley api`).
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl From<AuthFailure> for ReloadResponse {
    fn from(failure: AuthFailure) -> Self {
        let body = ErrorBody::new(failure.to_string());
        if failure.is_forbidden() { Self::Forbidden(body) } else { Self::Unauthorized(body, "Bearer".to_owned()) }
    }
}

/// Asks every replica to reload its pipeline file (they share the file, e.g. through a volume
/// updated by the deployment): the process that received the admin call is only one of them.
#[async_trait::async_trait]
pub trait ReloadBroadcast: Send + Sync {
    async fn publish(&self);
}

/// `/pipelines/*`.
pub struct PipelinesApi {
    jwt_secret: SecretString,
    reloader: Option<Arc<Reloader>>,
    broadcast: Option<Arc<dyn ReloadBroadcast>>,
}

#[OpenApi(prefix_path = "/pipelines", tag = "AdminTag::Pipelines")]
impl PipelinesApi {
    /// Reload the pipeline file
    ///
    /// Reads the pipeline file again and, if it is valid, serves new jobs with it (jobs in flight
    /// finish on the generation they started with). An invalid file changes nothing: the answer
    /// lists its problems and the running configuration keeps serving.
    #[oai(path = "/reload", method = "post")]
    async fn reload(&self, auth: BearerAuth) -> ReloadResponse {
        let claims = match authorize(&self.jwt_secret, &auth, ADMIN_ROLES) {
            Ok(claims) => claims,
            Err(failure) => return failure.into(),
        };
        let Some(reloader) = &self.reloader else {
            return ReloadResponse::Unavailable(ErrorBody::new(
                "this process runs no pipeline (parley api): reload the worker processes with SIGHUP, \
                 or save the file and let them pick it up",
            ));
        };
        tracing::info!(sub = %claims.sub, role = %claims.role, tenant = ?claims.tenant, "pipeline reload requested");
        let result = reloader.reload("admin").await;
        if result.is_ok()
            && let Some(broadcast) = &self.broadcast
        {
            broadcast.publish().await;
        }
        match result {
            Ok(ReloadOutcome::Reloaded { generation, stages_reused, stages_built }) => {
                ReloadResponse::Done(Json(ReloadedBody {
                    status: "reloaded".into(),
                    generation,
                    stages_built: Some(stages_built as u64),
                    stages_reused: Some(stages_reused as u64),
                }))
            }
            Ok(ReloadOutcome::Unchanged { generation }) => ReloadResponse::Done(Json(ReloadedBody {
                status: "unchanged".into(),
                generation,
                stages_built: None,
                stages_reused: None,
            })),
            Err(e @ (ReloadError::Invalid(_) | ReloadError::Build(_))) => ReloadResponse::Invalid(Json(InvalidBody {
                status: "invalid".into(),
                generation: reloader.runtime().generation(),
                errors: e.reasons(),
            })),
        }
    }
}

/// The admin API's areas, as one OpenAPI service (its server URL is [`ADMIN_PREFIX`]).
pub type AdminApi = (PipelinesApi, super::knowledge::KnowledgeApi);

pub fn admin_api(state: &HttpState) -> OpenApiService<AdminApi, ()> {
    let pipelines = PipelinesApi {
        jwt_secret: state.settings.jwt_secret.clone(),
        reloader: state.reloader.clone(),
        broadcast: state.reload_broadcast.clone(),
    };
    let knowledge = super::knowledge::KnowledgeApi::new(state.settings.jwt_secret.clone());
    OpenApiService::new((pipelines, knowledge), "Parley admin API", env!("CARGO_PKG_VERSION")).server(ADMIN_PREFIX)
}
