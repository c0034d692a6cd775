//! Where records are kept: a local directory, or any object store `object_store` reaches
//! (`file://`, and with the crate's `s3`, `gcs` and `azure` features `s3://`, `gs://`, `az://`).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Why result storage could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The location is neither a directory nor a URL of a store this program knows.
    #[error(
        "result storage '{location}' cannot be used: {source}; give a directory, or a URL such as s3://bucket/prefix (s3, gs and az need the prefect crate's s3, gcs or azure feature)"
    )]
    Location {
        /// The location as given.
        location: String,
        /// Why it cannot be used.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading or writing a record failed.
    #[error("could not {action} the result record {key}: {source}")]
    Access {
        /// `read` or `write`.
        action: &'static str,
        /// The record's full location.
        key: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
}

/// A place records are kept, opened once per process and location.
#[derive(Debug)]
pub(crate) struct Storage {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The location as given, to show keys in full.
    location: String,
}

impl Storage {
    /// The storage at `location`, opened on first use.
    pub(crate) fn open(location: &str) -> Result<Arc<Storage>, StorageError> {
        static OPEN: OnceLock<Mutex<HashMap<String, Arc<Storage>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(storage) = open.get(location) {
            return Ok(Arc::clone(storage));
        }
        let storage = Arc::new(Self::connect(location)?);
        open.insert(location.to_owned(), Arc::clone(&storage));
        Ok(storage)
    }

    fn connect(location: &str) -> Result<Storage, StorageError> {
        let refused = |source: Box<dyn std::error::Error + Send + Sync>| StorageError::Location {
            location: location.to_owned(),
            source,
        };
        if location.contains("://") {
            let url = url::Url::parse(location).map_err(|e| refused(e.into()))?;
            // Credentials and endpoints come from the environment, as the stores' own tools
            // read them: AWS_ACCESS_KEY_ID, AWS_ENDPOINT, GOOGLE_SERVICE_ACCOUNT, ...
            let options = std::env::vars()
                .filter(|(name, _)| ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|prefix| name.starts_with(prefix)));
            let options: Vec<(String, String)> =
                options.map(|(name, value)| (name.to_ascii_lowercase(), value)).collect();
            let (store, prefix) = object_store::parse_url_opts(&url, options).map_err(|e| refused(e.into()))?;
            Ok(Storage { store: Arc::from(store), prefix, location: location.trim_end_matches('/').to_owned() })
        } else {
            let dir = Path::new(location);
            if !dir.is_absolute() {
                return Err(refused("a directory must be an absolute path here".into()));
            }
            std::fs::create_dir_all(dir).map_err(|e| refused(e.into()))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| refused(e.into()))?;
            Ok(Storage {
                store: Arc::new(store),
                prefix: ObjectPath::default(),
                location: location.trim_end_matches('/').to_owned(),
            })
        }
    }

    /// The full location of the record under `key`: what Prefect calls its storage key.
    pub(crate) fn full_key(&self, key: &str) -> String {
        format!("{}/{key}", self.location)
    }

    fn path(&self, key: &str) -> ObjectPath {
        self.prefix.clone().join(key)
    }

    /// The record under `key`, if there is one.
    pub(crate) fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let (store, path) = (Arc::clone(&self.store), self.path(key));
        let read = block_on(async move {
            match store.get(&path).await {
                Ok(found) => found.bytes().await.map(|bytes| Some(bytes.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(error) => Err(error),
            }
        });
        read.map_err(|source| StorageError::Access { action: "read", key: self.full_key(key), source })
    }

    /// Writes the record under `key` whole: a reader sees the old record or the new one.
    pub(crate) fn write(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        let (store, path) = (Arc::clone(&self.store), self.path(key));
        block_on(async move { store.put(&path, PutPayload::from(bytes)).await.map(drop) })
            .map_err(|source| StorageError::Access { action: "write", key: self.full_key(key), source })
    }
}

/// Runs `job` on the engine's runtime and waits for it, from any thread.
fn block_on<T: Send + 'static>(
    job: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
) -> Result<T, object_store::Error> {
    pollster::block_on(crate::task_engine::runtime().spawn(job))
        .unwrap_or_else(|error| Err(object_store::Error::Generic { store: "result storage", source: Box::new(error) }))
}

/// Where records go unless a task or the program says: `PREFECT_RESULTS_STORAGE` (a
/// directory or URL), else `PREFECT_LOCAL_STORAGE_PATH`, else `~/.prefect/storage`, as in
/// Prefect. A relative directory is taken from the program's working directory.
pub(crate) fn default_location() -> String {
    let given = std::env::var("PREFECT_RESULTS_STORAGE")
        .or_else(|_| std::env::var("PREFECT_LOCAL_STORAGE_PATH"))
        .ok()
        .filter(|location| !location.trim().is_empty());
    match given {
        Some(location) => absolute(&location),
        None => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
            home.join(".prefect/storage").display().to_string()
        }
    }
}

/// A location the program was given, made absolute (`~/` and relative directories), so that
/// an executor elsewhere uses the same place.
pub(crate) fn absolute(location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let path = match location.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        None => PathBuf::from(location),
    };
    if path.is_absolute() {
        path.display().to_string()
    } else {
        std::env::current_dir().unwrap_or_default().join(path).display().to_string()
    }
}
