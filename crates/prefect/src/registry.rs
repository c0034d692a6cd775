//! The process-wide registry of tasks, filled at link time by `#[task]`.
//!
//! A runner that executes tasks in another process (the Ray runner re-runs the user's own
//! binary as an executor) finds a task there by its registered key and runs it from its
//! serialized arguments. The registry is a [`linkme`] distributed slice: it is complete before
//! `main` and before any constructor runs, which an executor started from a constructor needs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use crate::error::TaskFailure;
use crate::options::TaskOptions;

/// A sync task's body: one MessagePack value per parameter in, the MessagePack value out.
pub type SyncBody = fn(&[&[u8]]) -> Result<Vec<u8>, TaskFailure>;

/// The future of an async task's body: its serialized value, or why there is none.
pub type BodyFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, TaskFailure>> + Send>>;

/// A task's body with its arguments and result in serialized form: one MessagePack value
/// per parameter in, the MessagePack value out.
#[derive(Clone, Copy, Debug)]
pub enum TaskBody {
    /// A `fn`: decodes the arguments, runs, encodes the value.
    Sync(SyncBody),
    /// An `async fn`: the same, as a future that owns its arguments.
    Async(fn(Vec<Vec<u8>>) -> BodyFuture),
}

/// Everything the engine knows about a task, independent of any one run.
///
/// `#[task]` generates one per task function and registers it in the program's registry,
/// where [`lookup`] finds it by key.
/// A body takes one MessagePack value per parameter; its value is the MessagePack encoding
/// of the task's value (the `Ok` value for a task that returns `Result`).
#[derive(Debug)]
pub struct TaskDefinition {
    /// The task's display name: the function's name unless `#[task(name = ...)]` says otherwise.
    pub name: &'static str,
    /// The key the task is registered under: `module::path::function@line:column`. The
    /// place keeps apart two tasks of the same name in different functions of one module.
    pub key: &'static str,
    /// A hash of the task's source. An executor refuses to run a task whose fingerprint
    /// differs from the caller's, so a stale binary never runs changed code.
    pub fingerprint: &'static str,
    /// The key its runs are reported under: `key` and the fingerprint's first 8 digits, so
    /// the Prefect UI tells apart runs of changed code. Made once, at compile time, rather
    /// than for every run.
    pub task_key: &'static str,
    /// The parameters' names, in order.
    pub parameters: &'static [&'static str],
    /// The options written in the attribute.
    pub options: fn() -> TaskOptions,
    /// Renders `#[task(task_run_name = "...")]` from the arguments' texts, one per parameter.
    pub run_name: Option<fn(&[String]) -> String>,
    /// The body, with serialized arguments and result.
    pub body: TaskBody,
    /// What to call when a run ends, per final state.
    pub hooks: crate::hooks::StateHooks<crate::hooks::TaskHook>,
    /// Whether a failed attempt is worth a retry (`#[task(retry_condition_fn = f)]`); every
    /// failure is when `None`.
    pub retry_condition: Option<crate::hooks::RetryCondition>,
    /// The task's own cache key (`#[task(cache_key_fn = f)]`), instead of its cache policy's.
    pub cache_key_fn: Option<crate::results::CacheKeyFn>,
}

/// Every task in the program, registered by `#[task]`.
#[linkme::distributed_slice]
pub static TASKS: [TaskDefinition];

/// Why [`lookup`] found no task to run.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum LookupError {
    /// No task of this binary has the key: the caller was built from other code.
    #[error("task '{0}' is not in this binary: it was built from other code; rebuild, and run the flow again")]
    Missing(String),
    /// Two tasks share the key (the same `#[task]` expanded twice by one `macro_rules!`).
    #[error("two tasks of this binary are registered as '{0}'; give one of them another name")]
    Ambiguous(String),
}

/// The task registered under `key` in this binary.
///
/// # Errors
///
/// If no task has the key, or more than one has.
///
/// # Examples
///
/// ```
/// #[prefect::task]
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
///
/// let definition = prefect::runner::lookup(double.key()).expect("registered");
/// assert_eq!(definition.name, "double");
/// assert_eq!(definition.parameters, ["x"]);
/// ```
pub fn lookup(key: &str) -> Result<&'static TaskDefinition, LookupError> {
    static INDEX: OnceLock<HashMap<&'static str, Option<&'static TaskDefinition>>> = OnceLock::new();
    let index = INDEX.get_or_init(|| {
        let mut index = HashMap::with_capacity(TASKS.len());
        for task in TASKS.iter() {
            index.entry(task.key).and_modify(|known| *known = None).or_insert(Some(task));
        }
        index
    });
    match index.get(key) {
        Some(Some(task)) => Ok(task),
        Some(None) => Err(LookupError::Ambiguous(key.to_owned())),
        None => Err(LookupError::Missing(key.to_owned())),
    }
}
