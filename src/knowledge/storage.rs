//! Where the originals are kept: behind [`ObjectStorage`], a local directory by default
//! (`KNOWLEDGE_DIR`, default `data/knowledge`), or a Google Cloud Storage bucket when
//! `GCS_BUCKET_NAME` is set ([`GcsStorage`], through the `object_store` crate). Keys are
//! `<tenant>/<sha256>`: the same content is one object per tenant, and writing it twice is
//! harmless. [`build_storage`] picks one from the settings.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use engine::async_trait;
use object_store::{
    ClientOptions, ObjectStore, PutPayload, RetryConfig,
    gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder},
    path::Path as ObjectPath,
};
use url::Url;

use crate::settings::Settings;

/// The local directory used when `KNOWLEDGE_DIR` is unset.
pub const DEFAULT_KNOWLEDGE_DIR: &str = "data/knowledge";

/// Why the object storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0:?} not found")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("object storage: {0}")]
    Io(String),
}

/// Blobs by key.
#[async_trait]
pub trait ObjectStorage: Send + Sync {
    async fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError>;
    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError>;
    /// Deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
}

/// Objects as files under a directory.
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    root: PathBuf,
}

impl LocalDirectory {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `KNOWLEDGE_DIR`, or [`DEFAULT_KNOWLEDGE_DIR`].
    pub fn from_env() -> Self {
        Self::new(std::env::var_os("KNOWLEDGE_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_KNOWLEDGE_DIR.into()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// Keys are built by Parley, but a key must never climb out of the directory (or the bucket's
/// prefix): segments of letters, digits, `-`, `_` and `.`, none empty, `.` or `..`.
fn check_key(key: &str) -> Result<(), StorageError> {
    let valid = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if valid { Ok(()) } else { Err(StorageError::InvalidKey(key.to_owned())) }
}

fn io(error: std::io::Error) -> StorageError {
    StorageError::Io(error.to_string())
}

#[async_trait]
impl ObjectStorage for LocalDirectory {
    async fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        // Written aside then renamed: a crash never leaves a truncated original under its key.
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::write(&tmp, bytes).await.map_err(io)?;
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io(e));
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound(key.to_owned())),
            Err(e) => Err(io(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }
}

/// Where the originals go, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// Files under a directory (`KNOWLEDGE_DIR`).
    Local(PathBuf),
    /// A GCS bucket (`GCS_BUCKET_NAME`).
    Gcs(GcsConfig),
}

/// A GCS bucket and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsConfig {
    pub bucket: String,
    /// GOOGLE_APPLICATION_CREDENTIALS: a service-account (or authorized-user) JSON file. Without
    /// it, the instance metadata server's credentials (on Google Cloud).
    pub credentials: Option<PathBuf>,
    /// GCS_BASE_URL: another endpoint than `https://storage.googleapis.com` (a proxy, an emulator,
    /// a fake server in tests). Without credentials, requests to it are not signed.
    pub base_url: Option<Url>,
}

impl StorageConfig {
    /// GCS when `GCS_BUCKET_NAME` is set, else the local directory `KNOWLEDGE_DIR`.
    pub fn from_settings(settings: &Settings) -> Self {
        match &settings.gcs_bucket_name {
            Some(bucket) => Self::Gcs(GcsConfig {
                bucket: bucket.clone(),
                credentials: settings.google_application_credentials.clone(),
                base_url: settings.gcs_base_url.clone(),
            }),
            None => Self::Local(settings.knowledge_dir.clone()),
        }
    }

    pub fn build(&self) -> Result<Arc<dyn ObjectStorage>, StorageError> {
        Ok(match self {
            Self::Local(dir) => Arc::new(LocalDirectory::new(dir.clone())),
            Self::Gcs(config) => Arc::new(GcsStorage::new(config)?),
        })
    }
}

/// The object storage the settings name, built once per process.
pub fn build_storage(settings: &Settings) -> Result<Arc<dyn ObjectStorage>, StorageError> {
    StorageConfig::from_settings(settings).build()
}

/// Objects in a Google Cloud Storage bucket.
#[derive(Debug)]
pub struct GcsStorage {
    store: GoogleCloudStorage,
}

/// A bound on every GCS call: the workers retry a document whose original could not be read.
const GCS_TIMEOUT: Duration = Duration::from_secs(60);
const GCS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl GcsStorage {
    pub fn new(config: &GcsConfig) -> Result<Self, StorageError> {
        let mut options = ClientOptions::new().with_timeout(GCS_TIMEOUT).with_connect_timeout(GCS_CONNECT_TIMEOUT);
        let retry = RetryConfig { max_retries: 2, retry_timeout: GCS_TIMEOUT, ..RetryConfig::default() };
        let mut builder = GoogleCloudStorageBuilder::new().with_bucket_name(&config.bucket).with_retry(retry);
        match &config.base_url {
            // object_store takes another endpoint only from a service-account key's
            // `gcs_base_url`: the key file is read and the URL added to it.
            Some(base) => {
                if base.scheme() == "http" {
                    options = options.with_allow_http(true);
                }
                let key = service_account_key_with_base_url(config.credentials.as_deref(), base)?;
                builder = builder.with_service_account_key(key);
            }
            None => {
                if let Some(path) = &config.credentials {
                    builder = builder.with_application_credentials(path.to_string_lossy());
                }
            }
        }
        let store = builder
            .with_client_options(options)
            .build()
            .map_err(|e| StorageError::Io(format!("cannot set up the GCS bucket {:?}: {e}", config.bucket)))?;
        Ok(Self { store })
    }
}

/// The service-account key object_store reads, with `gcs_base_url`. Without a credentials file,
/// an unsigned one (`disable_oauth`): the endpoint (a proxy, an emulator) authenticates itself.
fn service_account_key_with_base_url(credentials: Option<&Path>, base: &Url) -> Result<String, StorageError> {
    let base = base.as_str().trim_end_matches('/');
    let mut key = match credentials {
        Some(path) => {
            // Only the path appears in errors: the file holds a private key.
            let text = std::fs::read_to_string(path).map_err(|e| {
                StorageError::Io(format!("cannot read GOOGLE_APPLICATION_CREDENTIALS `{}`: {e}", path.display()))
            })?;
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Object(map)) if map.contains_key("private_key") => map,
                _ => {
                    return Err(StorageError::Io(format!(
                        "GOOGLE_APPLICATION_CREDENTIALS `{}` is not a service-account JSON key (needed with GCS_BASE_URL)",
                        path.display()
                    )));
                }
            }
        }
        None => {
            let mut map = serde_json::Map::new();
            map.insert("disable_oauth".into(), true.into());
            for field in ["client_email", "private_key", "private_key_id"] {
                map.insert(field.into(), "".into());
            }
            map
        }
    };
    key.insert("gcs_base_url".into(), base.into());
    Ok(serde_json::Value::Object(key).to_string())
}

fn gcs_error(key: &str, error: object_store::Error) -> StorageError {
    match error {
        object_store::Error::NotFound { .. } => StorageError::NotFound(key.to_owned()),
        other => StorageError::Io(format!("GCS: {other}")),
    }
}

fn object_path(key: &str) -> Result<ObjectPath, StorageError> {
    check_key(key)?;
    ObjectPath::parse(key).map_err(|_| StorageError::InvalidKey(key.to_owned()))
}

#[async_trait]
impl ObjectStorage for GcsStorage {
    async fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = object_path(key)?;
        self.store.put(&path, PutPayload::from(bytes.to_vec())).await.map_err(|e| gcs_error(key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = object_path(key)?;
        let result = self.store.get(&path).await.map_err(|e| gcs_error(key, e))?;
        Ok(result.bytes().await.map_err(|e| gcs_error(key, e))?.to_vec())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = object_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(gcs_error(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn objects_round_trip_and_keys_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalDirectory::new(dir.path());
        storage.put("tenant/abc", b"bonjour").await.unwrap();
        assert_eq!(storage.get("tenant/abc").await.unwrap(), b"bonjour");
        storage.delete("tenant/abc").await.unwrap();
        storage.delete("tenant/abc").await.unwrap();
        assert!(matches!(storage.get("tenant/abc").await, Err(StorageError::NotFound(_))));
        for key in ["../etc/passwd", "/abs", "a//b", ""] {
            assert!(matches!(storage.put(key, b"x").await, Err(StorageError::InvalidKey(_))), "{key}");
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, crate::settings::SettingsError> {
        Settings::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn the_local_directory_is_the_default_and_a_bucket_name_selects_gcs() {
        let default = settings(&[]).unwrap();
        assert_eq!(StorageConfig::from_settings(&default), StorageConfig::Local(DEFAULT_KNOWLEDGE_DIR.into()));
        let local = settings(&[("KNOWLEDGE_DIR", "/srv/parley/knowledge")]).unwrap();
        assert_eq!(StorageConfig::from_settings(&local), StorageConfig::Local("/srv/parley/knowledge".into()));

        let gcs = settings(&[
            ("GCS_BUCKET_NAME", "parley-knowledge"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/secrets/sa.json"),
            ("GCS_BASE_URL", "http://127.0.0.1:4443"),
        ])
        .unwrap();
        assert_eq!(
            StorageConfig::from_settings(&gcs),
            StorageConfig::Gcs(GcsConfig {
                bucket: "parley-knowledge".into(),
                credentials: Some("/secrets/sa.json".into()),
                base_url: Some(Url::parse("http://127.0.0.1:4443").unwrap()),
            })
        );
    }

    #[test]
    fn an_invalid_bucket_name_or_base_url_is_reported_by_name() {
        let err =
            settings(&[("GCS_BUCKET_NAME", "Not A Bucket"), ("GCS_BASE_URL", "ftp://x")]).unwrap_err().to_string();
        assert!(err.contains("GCS_BUCKET_NAME: expected a bucket name"), "{err}");
        assert!(err.contains("GCS_BASE_URL: expected an http(s) URL"), "{err}");
    }

    #[test]
    fn a_base_url_with_an_unreadable_credentials_file_is_a_clear_error_naming_only_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_key = dir.path().join("sa.json");
        std::fs::write(&not_a_key, r#"{"type": "authorized_user", "refresh_token": "secret-refresh"}"#).unwrap();
        let config = GcsConfig {
            bucket: "b".repeat(3),
            credentials: Some(not_a_key.clone()),
            base_url: Some(Url::parse("http://127.0.0.1:9").unwrap()),
        };
        let err = GcsStorage::new(&config).unwrap_err().to_string();
        assert!(err.contains("is not a service-account JSON key"), "{err}");
        assert!(err.contains(&not_a_key.display().to_string()), "{err}");
        assert!(!err.contains("secret-refresh"), "{err}");
    }

    /// A fake GCS (XML API) on loopback: `PUT|GET|DELETE /{bucket}/{key}`, with the headers
    /// object_store requires (ETag, Last-Modified).
    mod fake_gcs {
        use std::{
            collections::HashMap,
            sync::{Arc, Mutex},
        };

        use poem::{
            EndpointExt, Response, Route, Server, handler,
            http::{Method, StatusCode},
            listener::TcpAcceptor,
            web::{Data, Path},
        };

        #[derive(Default)]
        pub struct Objects {
            pub objects: Mutex<HashMap<String, Vec<u8>>>,
            pub requests: Mutex<Vec<String>>,
        }

        #[handler]
        async fn object(
            method: Method,
            Path((bucket, key)): Path<(String, String)>,
            body: Vec<u8>,
            state: Data<&Arc<Objects>>,
        ) -> Response {
            state.requests.lock().unwrap().push(format!("{method} /{bucket}/{key}"));
            let mut objects = state.objects.lock().unwrap();
            let name = format!("{bucket}/{key}");
            let found = |status: StatusCode| {
                Response::builder()
                    .status(status)
                    .header("ETag", "\"1\"")
                    .header("Last-Modified", "Sat, 28 Nov 2026 14:00:00 GMT")
            };
            let missing = || {
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .content_type("application/xml")
                    .body("<Error><Code>NoSuchKey</Code></Error>")
            };
            match method {
                Method::PUT => {
                    objects.insert(name, body);
                    found(StatusCode::OK).finish()
                }
                Method::GET => match objects.get(&name) {
                    Some(bytes) => found(StatusCode::OK).body(bytes.clone()),
                    None => missing(),
                },
                Method::DELETE => match objects.remove(&name) {
                    Some(_) => Response::builder().status(StatusCode::NO_CONTENT).finish(),
                    None => missing(),
                },
                _ => Response::builder().status(StatusCode::METHOD_NOT_ALLOWED).finish(),
            }
        }

        pub async fn start() -> (String, Arc<Objects>) {
            let state = Arc::new(Objects::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
            let route = Route::new().at("/:bucket/*key", object).data(state.clone());
            tokio::spawn(async move {
                let _ = Server::new_with_acceptor(acceptor).run(route).await;
            });
            (format!("http://{addr}"), state)
        }
    }

    #[tokio::test]
    async fn gcs_objects_round_trip_through_a_fake_server_on_loopback() {
        let (base, fake) = fake_gcs::start().await;
        let config = GcsConfig {
            bucket: "parley-knowledge".into(),
            credentials: None,
            base_url: Some(Url::parse(&base).unwrap()),
        };
        let storage = GcsStorage::new(&config).unwrap();
        storage.put("tenant-1/abc", b"bonjour").await.unwrap();
        assert_eq!(
            fake.objects.lock().unwrap().get("parley-knowledge/tenant-1/abc").map(Vec::as_slice),
            Some(&b"bonjour"[..])
        );
        assert_eq!(storage.get("tenant-1/abc").await.unwrap(), b"bonjour");
        storage.delete("tenant-1/abc").await.unwrap();
        storage.delete("tenant-1/abc").await.unwrap();
        assert!(matches!(storage.get("tenant-1/abc").await, Err(StorageError::NotFound(_))));
        assert!(matches!(storage.put("../escape", b"x").await, Err(StorageError::InvalidKey(_))));
        let requests = fake.requests.lock().unwrap().clone();
        assert_eq!(
            requests,
            [
                "PUT /parley-knowledge/tenant-1/abc",
                "GET /parley-knowledge/tenant-1/abc",
                "DELETE /parley-knowledge/tenant-1/abc",
                "DELETE /parley-knowledge/tenant-1/abc",
                "GET /parley-knowledge/tenant-1/abc",
            ]
        );
    }

    #[tokio::test]
    async fn an_unreachable_gcs_is_an_io_error_the_workers_retry() {
        // Nothing listens on port 9 of loopback.
        let config = GcsConfig {
            bucket: "parley-knowledge".into(),
            credentials: None,
            base_url: Some(Url::parse("http://127.0.0.1:9").unwrap()),
        };
        let storage = GcsStorage::new(&config).unwrap();
        assert!(matches!(storage.get("t/k").await, Err(StorageError::Io(_))));
    }
}
