//! Where the originals are kept: behind [`ObjectStorage`], a local directory by default
//! (`KNOWLEDGE_DIR`, default `data/knowledge`). Keys are `<tenant>/<sha256>`: the same content is
//! one object per tenant, and writing it twice is harmless. A GCS implementation
//! (`GCS_BUCKET_NAME`, through the `object_store` crate) is still to be added behind this trait.

use std::path::{Path, PathBuf};

use engine::async_trait;

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
        // Keys are built by Parley, but a key must never climb out of the directory.
        let valid = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if !valid {
            return Err(StorageError::InvalidKey(key.to_owned()));
        }
        Ok(self.root.join(key))
    }
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
}
