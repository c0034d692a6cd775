//! Ray options of task runs: resources, retries, placement.

use serde::Serialize;
use serde_json::{Map, Value};

/// Ray options for task runs: what each run asks of the cluster, passed to Ray's
/// `.options(...)`. Set them on a task with `#[task(num_cpus = 2, ...)]`, or for every run
/// submitted in a scope with [`remote_options`].
///
/// # Examples
///
/// ```
/// use prefect_ray::RemoteOptions;
///
/// let options = RemoteOptions::new().num_cpus(2.0).memory(512 << 20).resource("gpu_a100", 1.0);
/// let map = options.into_map();
/// assert_eq!(map["num_cpus"], 2.0);
/// assert_eq!(map["resources"]["gpu_a100"], 1.0);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteOptions(Map<String, Value>);

impl RemoteOptions {
    /// No options: Ray's defaults (1 CPU per run).
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs each run reserves (fractions allowed).
    pub fn num_cpus(self, cpus: f64) -> Self {
        self.option("num_cpus", cpus)
    }

    /// GPUs each run reserves (fractions allowed).
    pub fn num_gpus(self, gpus: f64) -> Self {
        self.option("num_gpus", gpus)
    }

    /// Bytes of memory each run reserves, for scheduling.
    pub fn memory(self, bytes: u64) -> Self {
        self.option("memory", bytes)
    }

    /// An amount of a custom resource (declared by nodes with `ray start --resources`).
    pub fn resource(mut self, name: impl Into<String>, amount: f64) -> Self {
        let resources = self.0.entry("resources").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(resources) = resources {
            resources.insert(name.into(), Value::from(amount));
        }
        self
    }

    /// How many times Ray runs a task again when its worker or node dies (Ray's own retry
    /// for system failures, apart from the task's `retries`).
    pub fn max_retries(self, retries: i64) -> Self {
        self.option("max_retries", retries)
    }

    /// Any other option of Ray's `.options(...)`, such as `scheduling_strategy`.
    ///
    /// # Panics
    ///
    /// If the value does not serialize to JSON.
    pub fn option(mut self, name: impl Into<String>, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).expect("remote option values serialize to JSON");
        self.0.insert(name.into(), value);
        self
    }

    /// The options as a JSON map, as the engine carries them.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

/// Runs `body` with these Ray options for every task run it submits. Scopes nest: an inner
/// scope's options win over an outer one's, and a scope's options win over the task's own.
///
/// # Examples
///
/// ```no_run
/// use prefect::{flow, task};
/// use prefect_ray::{RayTaskRunner, RemoteOptions, remote_options};
///
/// #[task]
/// fn process(shard: u32) -> u32 {
///     shard
/// }
///
/// #[flow(task_runner = RayTaskRunner::new())]
/// fn pipeline() {
///     remote_options(RemoteOptions::new().num_cpus(2.0), || {
///         process.map(0..4);
///     });
/// }
/// ```
pub fn remote_options<R>(options: RemoteOptions, body: impl FnOnce() -> R) -> R {
    prefect::runner::with_remote_options(options.0, body)
}
