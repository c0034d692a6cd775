#![doc = include_str!("../../docs/results.md")]

mod policy;
mod record;
mod storage;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use policy::{ArgumentError, CacheKeyContext, CacheKeyFn, CachePolicy, policies};
pub use record::RecordError;
pub use storage::StorageError;

use crate::observe::FlowRunInfo;
use crate::options::TaskOptions;
use crate::registry::TaskDefinition;
use crate::state::State;

/// Where a run's value was persisted: what Prefect's API keeps as a state's data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PersistedResult {
    /// The record's full location: a path, or a URL.
    pub storage_key: String,
    /// The key runs share the value by, when the run was cached.
    pub cache_key: Option<String>,
    /// When the value stops serving as a cached value.
    pub expiration: Option<DateTime<Utc>>,
    /// How the value is written in the record: `json`, or `prefect-rust-msgpack`.
    pub serializer: String,
}

impl PersistedResult {
    /// Prefect's `ResultRecordMetadata` of the record, as a state's `data` holds it.
    pub fn metadata_json(&self) -> Value {
        let serializer = if self.serializer == "json" {
            serde_json::json!({
                "type": "json",
                "jsonlib": "json",
                "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                "dumps_kwargs": {},
                "loads_kwargs": {},
            })
        } else {
            serde_json::json!({"type": self.serializer})
        };
        record::Metadata {
            storage_key: Some(self.storage_key.clone()),
            expiration: self.expiration,
            serializer,
            prefect_version: "3.9.1".into(),
            storage_block_id: None,
        }
        .to_json()
    }
}

/// How one task run's value is kept: decided in the program when the run is created, from
/// the task's options and the program's settings, and carried to wherever the run executes
/// (on Ray, the executor reads and writes storage from the worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultPlan {
    /// Where records go: an absolute directory or a URL.
    pub storage: String,
    /// What the run's cache key is made of.
    pub policy: CachePolicy,
    /// How long a stored value serves as a cached value; forever when `None`.
    pub expiration_seconds: Option<f64>,
    /// Run even when a value is stored under the key, and store the new one.
    pub refresh: bool,
    /// The flow run the task runs in, for `RUN_ID`.
    pub flow_run_id: Option<Uuid>,
    /// A hash of the flow run's parameters, for `FLOW_PARAMETERS`.
    pub flow_parameters: Option<String>,
}

impl ResultPlan {
    /// The plan of a run of `task` with `options` in `flow`, or `None` when its value is
    /// not persisted: the task's `persist_result` says, or else a cache policy or key
    /// function asks for it, or else the flow's `persist_result` (`flow_persists`) says,
    /// or else `PREFECT_RESULTS_PERSIST_BY_DEFAULT`.
    pub(crate) fn for_run(
        task: &TaskDefinition,
        options: &TaskOptions,
        flow: Option<&FlowRunInfo>,
        flow_persists: Option<bool>,
    ) -> Option<Self> {
        let cached = options.cache_policy.is_some() || task.cache_key_fn.is_some();
        let persist =
            options.persist_result.unwrap_or_else(|| cached || flow_persists.unwrap_or_else(persist_by_default));
        persist.then(|| ResultPlan {
            storage: options.result_storage.as_deref().map(storage::absolute).unwrap_or_else(storage::default_location),
            policy: options.cache_policy.clone().unwrap_or(CachePolicy::DEFAULT),
            expiration_seconds: options.cache_expiration_seconds,
            refresh: options.refresh_cache || refresh_by_default(),
            flow_run_id: flow.map(|flow| flow.id),
            flow_parameters: flow.map(|flow| policy::hash_text(&flow.parameters.to_string())),
        })
    }

    /// Checks that the storage can be used, before the run is handed to a runner.
    ///
    /// # Errors
    ///
    /// If the location is not a directory that can be created, or not a URL of a known store.
    pub fn check(&self) -> Result<(), StorageError> {
        storage::Storage::open(&self.storage).map(drop)
    }
}

/// `PREFECT_RESULTS_PERSIST_BY_DEFAULT`, as Prefect reads it.
fn persist_by_default() -> bool {
    setting_is_true("PREFECT_RESULTS_PERSIST_BY_DEFAULT")
}

/// `PREFECT_TASKS_REFRESH_CACHE`, as Prefect reads it.
fn refresh_by_default() -> bool {
    setting_is_true("PREFECT_TASKS_REFRESH_CACHE")
}

fn setting_is_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|value| matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// A run's result keeping, where it executes: the cached value before it runs, the stored
/// value after.
pub(crate) struct Keeper {
    storage: Arc<storage::Storage>,
    cache_key: Option<String>,
    plan: ResultPlan,
}

impl Keeper {
    /// The keeper of a run of `task` with these (serialized) arguments.
    pub(crate) fn new(task: &TaskDefinition, plan: &ResultPlan, arguments: &[&[u8]]) -> Result<Self, StorageError> {
        let storage = storage::Storage::open(&plan.storage)?;
        let cache_key = match task.cache_key_fn {
            Some(key_fn) => {
                let context = CacheKeyContext {
                    task_name: task.name,
                    flow_run_id: plan.flow_run_id,
                    parameters: task.parameters,
                    arguments,
                };
                std::panic::catch_unwind(|| key_fn(&context)).unwrap_or_else(|_| {
                    tracing::warn!(target: "prefect::task_run", "The task's cache key function panicked; the run is not cached");
                    None
                })
            }
            None => plan.policy.key(&policy::KeyParts {
                task: task.key.split('@').next().unwrap_or(task.key),
                fingerprint: task.fingerprint,
                parameters: task.parameters,
                arguments,
                flow_run_id: plan.flow_run_id,
                flow_parameters: plan.flow_parameters.as_deref(),
            }),
        };
        Ok(Self { storage, cache_key, plan: plan.clone() })
    }

    /// The stored, unexpired value under the run's key, and the `Cached` state that ends the
    /// run with it. A record that cannot be read is a miss (with a warning): the run runs.
    pub(crate) fn cached(&self) -> Option<(Vec<u8>, State)> {
        let key = self.cache_key.as_deref().filter(|_| !self.plan.refresh)?;
        let bytes = match self.storage.read(key) {
            Ok(found) => found?,
            Err(error) => {
                tracing::warn!(target: "prefect::task_run", "{error}; the run runs instead");
                return None;
            }
        };
        let (value, metadata) = match record::decode(&bytes) {
            Ok(decoded) => decoded,
            Err(error) => {
                let at = self.storage.full_key(key);
                tracing::warn!(target: "prefect::task_run", "The cached record {at} cannot be read ({error}); the run runs instead");
                return None;
            }
        };
        if metadata.expiration.is_some_and(|expiration| expiration <= Utc::now()) {
            return None;
        }
        let persisted = PersistedResult {
            storage_key: self.storage.full_key(key),
            cache_key: Some(key.to_owned()),
            expiration: metadata.expiration,
            serializer: metadata.serializer_type().to_owned(),
        };
        Some((value, State::cached(persisted)))
    }

    /// Stores `value` (under the cache key, or a fresh one) and says where.
    pub(crate) fn keep(&self, value: &[u8]) -> Result<PersistedResult, StorageError> {
        let key = self.cache_key.clone().unwrap_or_else(|| Uuid::new_v4().simple().to_string());
        let expiration = self
            .plan
            .expiration_seconds
            .and_then(|seconds| chrono::Duration::from_std(crate::options::seconds_duration(seconds)).ok())
            .map(|lasting| Utc::now() + lasting);
        let storage_key = self.storage.full_key(&key);
        let (bytes, metadata) = record::encode(value, &storage_key, expiration);
        self.storage.write(&key, bytes)?;
        Ok(PersistedResult {
            storage_key,
            cache_key: self.cache_key.clone(),
            expiration,
            serializer: metadata.serializer_type().to_owned(),
        })
    }
}
