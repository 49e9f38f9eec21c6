//! The knowledge base's admin endpoints, `/api/v1/admin/knowledge/*` (bearer JWT, role `admin`
//! or `super-admin`, scoped to a tenant by its `tenant` claim): upload documents (multipart,
//! field `file`, repeatable), which queues them for the knowledge workers, and list them with
//! their status.
//!
//! The uploads' body limit is [`MAX_UPLOAD_BYTES`] per request (declared `Content-Length`
//! required), checked before anything is read; each file is also held to the ingestion's
//! `MAX_FILE_BYTES`. The webhook's 3 MiB limit lives in its own handler and does not apply here.

use std::sync::Arc;

use poem::{Endpoint, EndpointExt, Request, http::StatusCode, web::Data};
use poem_openapi::{ApiResponse, Multipart, Object, OpenApi, Tags, payload::Json, types::multipart::Upload};
use secrecy::SecretString;
use uuid::Uuid;

use super::{
    admin::ErrorBody,
    auth::{ADMIN_ROLES, AuthFailure, BearerAuth, authorize_tenant},
    json_error,
};
use crate::{
    knowledge::{
        DocumentSummary, KnowledgeError, ObjectStorage, UploadOutcome,
        extract::{ExtractError, MAX_FILE_BYTES},
        list_documents, resolve_tenant, upload,
    },
    store::PgStore,
};

/// The largest upload request: several files at the per-file limit, and the multipart framing.
pub const MAX_UPLOAD_BYTES: u64 = 5 * MAX_FILE_BYTES as u64 + 1024 * 1024;

/// What the knowledge endpoints need, given to the routes as request data by `app::start`.
#[derive(Clone)]
pub struct KnowledgeDeps {
    store: PgStore,
    storage: Arc<dyn ObjectStorage>,
}

impl KnowledgeDeps {
    pub fn new(store: PgStore, storage: Arc<dyn ObjectStorage>) -> Self {
        Self { store, storage }
    }
}

#[derive(Tags)]
enum KnowledgeTag {
    /// The tenant's knowledge base.
    Knowledge,
}

/// The files to add.
#[derive(Debug, Multipart)]
pub struct UploadForm {
    /// One or more files (.txt, .md, .html, .pdf); repeat the field for several.
    file: Vec<Upload>,
}

/// What became of one uploaded file.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct UploadedFile {
    /// The file's name, as sent.
    pub name: String,
    /// `uploaded` (queued for indexing), `duplicate` (the tenant already has this content) or
    /// `error`.
    pub status: String,
    /// The document (the existing one for a duplicate); absent on error.
    #[oai(skip_serializing_if_is_none)]
    pub document_id: Option<String>,
    /// Why the file was refused.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

/// One entry per file, in the order sent.
#[derive(Debug, Object)]
pub struct UploadBody {
    pub files: Vec<UploadedFile>,
}

/// A document and its indexing status.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct DocumentBody {
    pub id: String,
    /// Its first heading, else the file name without extension.
    pub title: String,
    /// The file name.
    pub source: String,
    /// `uploaded` (queued, or waiting for a retry), `indexing`, `indexed` or `error`.
    pub status: String,
    /// Why indexing failed (`error`), or why the last attempt did (`uploaded`, retrying).
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
    pub bytes: i64,
    pub chunks: i64,
    pub attempts: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<DocumentSummary> for DocumentBody {
    fn from(d: DocumentSummary) -> Self {
        Self {
            id: d.id.to_string(),
            title: d.title,
            source: d.source,
            status: d.status,
            error: d.error,
            bytes: d.bytes,
            chunks: d.chunks,
            attempts: d.attempts,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// The tenant's documents, newest first.
#[derive(Debug, Object)]
pub struct DocumentsBody {
    pub documents: Vec<DocumentBody>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "upload_bad_request")]
pub enum UploadResponse {
    /// The files were taken: each is queued (`uploaded`), a `duplicate`, or refused (`error`).
    #[oai(status = 202)]
    Accepted(Json<UploadBody>),
    /// Not a multipart body with at least one `file` field.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No token, or an invalid or expired one.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// A token of another role, without a `tenant` claim, or naming an unknown tenant.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The request is larger than the upload limit (or did not declare its length: 411).
    #[oai(status = 413)]
    TooLarge(Json<ErrorBody>),
    /// Every file was refused (unsupported type, too large, the plan's limits): nothing queued.
    #[oai(status = 422)]
    Refused(Json<UploadBody>),
    /// More than RATE_LIMIT_MAX admin requests from this address in RATE_LIMIT_WINDOW.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>),
    /// The database or the object storage is unavailable; nothing was recorded for the files
    /// that say so.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn upload_bad_request(error: poem::Error) -> UploadResponse {
    UploadResponse::BadRequest(ErrorBody::new(format!(
        "expected a multipart/form-data body with one or more `file` fields: {error}"
    )))
}

#[derive(ApiResponse)]
pub enum ListResponse {
    #[oai(status = 200)]
    Documents(Json<DocumentsBody>),
    /// No token, or an invalid or expired one.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// A token of another role, without a `tenant` claim, or naming an unknown tenant.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// More than RATE_LIMIT_MAX admin requests from this address in RATE_LIMIT_WINDOW.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>),
    /// The database is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// Why a request does not reach the tenant's knowledge base.
enum Refusal {
    Unauthorized(String),
    Forbidden(String),
    Unavailable(String),
}

impl From<AuthFailure> for Refusal {
    fn from(failure: AuthFailure) -> Self {
        if failure.is_forbidden() {
            Self::Forbidden(failure.to_string())
        } else {
            Self::Unauthorized(failure.to_string())
        }
    }
}

impl From<Refusal> for UploadResponse {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Unauthorized(e) => Self::Unauthorized(ErrorBody::new(e), "Bearer".into()),
            Refusal::Forbidden(e) => Self::Forbidden(ErrorBody::new(e)),
            Refusal::Unavailable(e) => Self::Unavailable(ErrorBody::new(e)),
        }
    }
}

impl From<Refusal> for ListResponse {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Unauthorized(e) => Self::Unauthorized(ErrorBody::new(e), "Bearer".into()),
            Refusal::Forbidden(e) => Self::Forbidden(ErrorBody::new(e)),
            Refusal::Unavailable(e) => Self::Unavailable(ErrorBody::new(e)),
        }
    }
}

const UNAVAILABLE: &str = "the knowledge base is unavailable (database or object storage); try again shortly";

/// Refuses an upload request over [`MAX_UPLOAD_BYTES`], or without a declared length, before
/// its body is read.
fn upload_limit(ep: impl Endpoint + 'static) -> impl Endpoint {
    ep.before(|req: Request| async move {
        let declared = req.header(poem::http::header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n <= MAX_UPLOAD_BYTES => Ok(req),
            Some(n) => Err(poem::Error::from_response(json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("upload of {n} bytes refused: the limit is {MAX_UPLOAD_BYTES} bytes per request"),
            ))),
            None => Err(poem::Error::from_response(json_error(
                StatusCode::LENGTH_REQUIRED,
                "uploads must declare their Content-Length",
            ))),
        }
    })
}

/// `/knowledge/*`.
pub struct KnowledgeApi {
    jwt_secret: SecretString,
}

impl KnowledgeApi {
    pub fn new(jwt_secret: SecretString) -> Self {
        Self { jwt_secret }
    }

    /// The token's tenant, which must exist.
    async fn tenant(&self, auth: &BearerAuth, deps: &KnowledgeDeps) -> Result<Uuid, Refusal> {
        let (claims, tenant) = authorize_tenant(&self.jwt_secret, auth, ADMIN_ROLES)?;
        match resolve_tenant(&deps.store, &tenant).await {
            Ok(id) => {
                tracing::debug!(sub = %claims.sub, tenant = %id, "knowledge admin request");
                Ok(id)
            }
            Err(KnowledgeError::UnknownTenant(_)) => {
                Err(Refusal::Forbidden(format!("the token's tenant {tenant:?} does not exist")))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot resolve the token's tenant");
                Err(Refusal::Unavailable(UNAVAILABLE.into()))
            }
        }
    }
}

#[OpenApi(prefix_path = "/knowledge", tag = "KnowledgeTag::Knowledge")]
impl KnowledgeApi {
    /// Upload documents
    ///
    /// Stores each file (.txt, .md, .html, .pdf; repeat the `file` field) and queues it for
    /// indexing by the knowledge workers; poll the list for its status (`uploaded` → `indexing`
    /// → `indexed` | `error`). A file whose content the tenant already has is a `duplicate`
    /// and adds nothing. Each file is checked on its own: an unsupported type, a file over the
    /// size limit or the plan's document and storage limits refuse that file with the reason.
    #[oai(path = "/documents", method = "post", transform = "upload_limit")]
    async fn upload(&self, auth: BearerAuth, deps: Data<&KnowledgeDeps>, form: UploadForm) -> UploadResponse {
        let tenant = match self.tenant(&auth, &deps).await {
            Ok(tenant) => tenant,
            Err(refusal) => return refusal.into(),
        };
        if form.file.is_empty() {
            return UploadResponse::BadRequest(ErrorBody::new("no file: send one or more `file` fields"));
        }
        let mut files = Vec::with_capacity(form.file.len());
        let mut unavailable = false;
        for file in form.file {
            let name = file.file_name().unwrap_or_default().to_owned();
            let refused = |error: String| UploadedFile {
                name: name.clone(),
                status: "error".into(),
                document_id: None,
                error: Some(error),
            };
            if name.is_empty() {
                files.push(refused("the part has no file name (filename=...)".into()));
                continue;
            }
            if file.size() > MAX_FILE_BYTES {
                files.push(refused(ExtractError::TooLarge { bytes: file.size(), limit: MAX_FILE_BYTES }.to_string()));
                continue;
            }
            let bytes = match file.into_vec().await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read an uploaded file");
                    files.push(refused("the file could not be read; send it again".into()));
                    continue;
                }
            };
            let entry = match upload(&deps.store, deps.storage.as_ref(), tenant, &name, &bytes).await {
                Ok(outcome) => UploadedFile {
                    name: name.clone(),
                    status: match outcome {
                        UploadOutcome::Uploaded { .. } => "uploaded".into(),
                        UploadOutcome::Duplicate { .. } => "duplicate".into(),
                    },
                    document_id: Some(outcome.document_id().to_string()),
                    error: None,
                },
                Err(e @ (KnowledgeError::Store(_) | KnowledgeError::Storage(_))) => {
                    tracing::warn!(error = %e, "cannot record an uploaded file");
                    unavailable = true;
                    refused(UNAVAILABLE.into())
                }
                Err(e) => refused(e.to_string()),
            };
            files.push(entry);
        }
        let accepted = files.iter().any(|f| f.status != "error");
        match (accepted, unavailable) {
            (true, _) => UploadResponse::Accepted(Json(UploadBody { files })),
            (false, true) => UploadResponse::Unavailable(ErrorBody::new(UNAVAILABLE)),
            (false, false) => UploadResponse::Refused(Json(UploadBody { files })),
        }
    }

    /// List documents
    ///
    /// The tenant's documents, newest first, with their status, the reason of a failure, their
    /// size, chunk count and indexing attempts.
    #[oai(path = "/documents", method = "get")]
    async fn list(&self, auth: BearerAuth, deps: Data<&KnowledgeDeps>) -> ListResponse {
        let tenant = match self.tenant(&auth, &deps).await {
            Ok(tenant) => tenant,
            Err(refusal) => return refusal.into(),
        };
        match list_documents(&deps.store, tenant).await {
            Ok(documents) => ListResponse::Documents(Json(DocumentsBody {
                documents: documents.into_iter().map(DocumentBody::from).collect(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the knowledge documents");
                ListResponse::Unavailable(ErrorBody::new(UNAVAILABLE))
            }
        }
    }
}
