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
/// `#[task]` generates one per task function and registers it in [`TASKS`].
/// A body takes one MessagePack value per parameter; its value is the MessagePack encoding
/// of the task's value (the `Ok` value for a task that returns `Result`).
#[derive(Debug)]
pub struct TaskDefinition {
    /// The task's display name: the function's name unless `#[task(name = ...)]` says otherwise.
    pub name: &'static str,
    /// The stable key the task is registered under: `module::path::function`.
    pub key: &'static str,
    /// A hash of the task's source. An executor refuses to run a task whose fingerprint
    /// differs from the caller's, so a stale binary never runs changed code.
    pub fingerprint: &'static str,
    /// The parameters' names, in order.
    pub parameters: &'static [&'static str],
    /// The options written in the attribute.
    pub options: fn() -> TaskOptions,
    /// Renders `#[task(task_run_name = "...")]` from the arguments' texts, one per parameter.
    pub run_name: Option<fn(&[String]) -> String>,
    /// The body, with serialized arguments and result.
    pub body: TaskBody,
}

/// Every task in the program, registered by `#[task]`.
#[linkme::distributed_slice]
pub static TASKS: [TaskDefinition];

/// The task registered under `key`, if this binary has one.
///
/// # Examples
///
/// ```
/// #[prefect::task]
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
///
/// let definition = prefect::registry::lookup(double.key()).expect("registered");
/// assert_eq!(definition.name, "double");
/// assert_eq!(definition.parameters, ["x"]);
/// ```
pub fn lookup(key: &str) -> Option<&'static TaskDefinition> {
    static INDEX: OnceLock<HashMap<&'static str, &'static TaskDefinition>> = OnceLock::new();
    INDEX.get_or_init(|| TASKS.iter().map(|task| (task.key, task)).collect()).get(key).copied()
}
