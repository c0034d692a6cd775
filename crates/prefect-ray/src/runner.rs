//! The RayTaskRunner.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prefect::State;
use prefect::runner::{Arg, FlowRunInfo, RunnerError, TaskRun, TaskRunSpec, TaskRunner, not_ready};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::bridge::{Bridge, BridgeConfig, Call, RayObject, Shared};
use crate::protocol::envelope::{CallHeader, OutputSettings};
use crate::report::PendingRun;

#[doc = include_str!("../docs/runner.md")]
#[derive(Debug)]
pub struct RayTaskRunner {
    config: BridgeConfig,
    output: OutputSettings,
    bridge: Mutex<Option<Arc<Bridge>>>,
}

impl Default for RayTaskRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl RayTaskRunner {
    /// A runner that starts a temporary local Ray instance for the flow run, bound to
    /// 127.0.0.1, and ends it with the run. A subflow whose parent flow runs on Ray uses the
    /// parent's connection instead.
    pub fn new() -> Self {
        Self {
            config: BridgeConfig {
                address: None,
                init_kwargs: Map::new(),
                python: None,
                ship_executor: true,
                ship_debug_info: false,
                max_in_flight: 10_000,
                max_batch: 256,
                connect_timeout: Duration::from_secs(120),
                auth_token: None,
            },
            output: OutputSettings::from_env(),
            bridge: Mutex::new(None),
        }
    }

    /// Connects to an existing cluster instead, which the runner never shuts down:
    /// `ray://host:10001` through Ray Client, `host:6379` (the GCS address), or `auto`.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.config.address = Some(address.into());
        self
    }

    /// Keyword arguments for `ray.init`, as a JSON object, such as
    /// `json!({"num_cpus": 2, "runtime_env": {"env_vars": {"KEY": "value"}}})`.
    /// `namespace` defaults to "prefect".
    ///
    /// # Panics
    ///
    /// If `kwargs` does not serialize to a JSON object.
    pub fn init_kwargs(mut self, kwargs: impl Serialize) -> Self {
        match serde_json::to_value(kwargs) {
            Ok(Value::Object(map)) => self.config.init_kwargs.extend(map),
            other => panic!("init_kwargs must serialize to a JSON object, got {other:?}"),
        }
        self
    }

    /// The Python that has Ray, instead of the one found by default
    /// (`PREFECT_RAY_PYTHON`, then the nearest `.venv`, then `python3`).
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.config.python = Some(python.into());
        self
    }

    /// Whether to ship this program to an existing cluster's workers with Ray's
    /// `runtime_env` (the default), or to run it from the same path on every node, for
    /// clusters that share this machine's filesystem.
    pub fn ship_executor(mut self, ship: bool) -> Self {
        self.config.ship_executor = ship;
        self
    }

    /// Whether the shipped program keeps its debug info (line numbers in a worker's
    /// backtraces). By default it ships without (`objcopy --strip-debug`, symbols kept),
    /// which makes what Ray uploads smaller: see the README's figures.
    pub fn ship_debug_info(mut self, keep: bool) -> Self {
        self.config.ship_debug_info = keep;
        self
    }

    /// How many runs may be submitted and unfinished at once (10,000 by default);
    /// `submit` waits when there are more, which keeps memory bounded in huge maps.
    pub fn max_in_flight(mut self, runs: usize) -> Self {
        self.config.max_in_flight = runs.max(1);
        self
    }

    /// The token to present to a cluster with token authentication (Ray's default), instead
    /// of `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.config.auth_token = Some(token.into());
        self
    }

    /// At most this many runs of a map, or of submissions that pile up, in one Ray task (256
    /// by default; 1 turns batching off). Runs are batched only when there are many more of
    /// them than CPUs. Larger batches cost Ray fewer tasks; smaller ones report sooner, as a
    /// batch's reports arrive together when its last run ends.
    pub fn max_batch(mut self, runs: usize) -> Self {
        self.config.max_batch = runs.max(1);
        self
    }

    /// At most this many lines of output per run are kept and shown (10,000 by default, or
    /// `PREFECT_LOGGING_MAX_LINES_PER_RUN`); the rest stay in Ray's worker logs, counted.
    pub fn max_log_lines(mut self, lines: u32) -> Self {
        self.output.max_lines = lines;
        self
    }

    /// How long to wait for Ray to start or accept the connection (120 s by default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    fn bridge(&self) -> Option<Arc<Bridge>> {
        self.bridge.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl TaskRunner for RayTaskRunner {
    fn name(&self) -> String {
        match &self.config.address {
            Some(address) => format!("RayTaskRunner(address={address})"),
            None => "RayTaskRunner".to_owned(),
        }
    }

    fn start(&self, flow_run: &FlowRunInfo) -> Result<(), RunnerError> {
        let (bridge, reused) = Bridge::acquire(&self.config, flow_run)?;
        let info = bridge.info();
        let dashboard = if info.dashboard_url.is_empty() {
            String::new()
        } else {
            let url = info.dashboard_url.clone();
            let url = if url.starts_with("http") { url } else { format!("http://{url}") };
            format!("; dashboard at {url}")
        };
        let what = match (reused, info.started_local, &self.config.address) {
            (true, _, _) => "Using the parent flow run's Ray connection".to_owned(),
            (false, true, _) => "Started a temporary local Ray instance".to_owned(),
            (false, false, Some(address)) => format!("Connected to the Ray cluster at {address}"),
            (false, false, None) => "Connected to Ray".to_owned(),
        };
        tracing::info!(
            target: "prefect::flow_run",
            "{what} (Ray {}): {} live node(s){dashboard}",
            info.ray_version,
            info.nodes
        );
        *self.bridge.lock().unwrap_or_else(|p| p.into_inner()) = Some(bridge);
        Ok(())
    }

    fn submit(&self, spec: TaskRunSpec) {
        let Some(bridge) = self.bridge() else {
            spec.run.crash("the RayTaskRunner was not started");
            return;
        };
        if let Some((function, call)) = prepare(bridge.shared(), spec, self.output) {
            bridge.shared().submit(function, call);
        }
    }

    /// The runs of a map: when there are many more than the cluster has CPUs, several go in
    /// one Ray task (each still its own task run, with its own states and value), so tiny
    /// tasks do not pay Ray's cost per task each. Enough batches are left for every CPU to
    /// get several, so the work still spreads.
    fn submit_many(&self, specs: Vec<TaskRunSpec>) {
        let Some(bridge) = self.bridge() else {
            specs.into_iter().for_each(|spec| spec.run.crash("the RayTaskRunner was not started"));
            return;
        };
        let shared = bridge.shared();
        let cpus = shared.info.cpus.max(1.0);
        let size = ((specs.len() as f64 / (8.0 * cpus)) as usize).clamp(1, self.config.max_batch.max(1));
        let mut batch: Vec<Call> = Vec::with_capacity(size);
        let mut batch_function = None;
        for spec in specs {
            let Some((function, call)) = prepare(shared, spec, self.output) else { continue };
            if size == 1 {
                shared.submit(function, call);
                continue;
            }
            if batch_function.is_some_and(|f| f != function) {
                shared.submit_batch(batch_function.take().expect("checked"), std::mem::take(&mut batch));
            }
            batch_function = Some(function);
            batch.push(call);
            if batch.len() == size {
                shared.submit_batch(function, std::mem::take(&mut batch));
                batch_function = None;
            }
        }
        if let Some(function) = batch_function {
            shared.submit_batch(function, batch);
        }
    }

    fn stop(&self) {
        self.bridge.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn cancel_pending(&self, reason: &str) {
        if let Some(bridge) = self.bridge() {
            bridge.shared().cancel_all(reason);
        }
    }
}

/// Readies a run for Ray: its dependencies as Ray objects where they are (others are
/// fetched here and sent as values), its header, and its remote function. A run that cannot
/// go ends here, with the reason.
fn prepare(shared: &Arc<Shared>, spec: TaskRunSpec, output: OutputSettings) -> Option<(u32, Call)> {
    if let Some(plan) = &spec.results {
        warn_if_unshared(&plan.storage, shared.info.nodes);
    }
    let task = spec.run.task();
    let mut value_keys = Vec::new();
    let mut upstream_names = Vec::new();
    let mut objects = Vec::new();
    let mut replacements = Vec::with_capacity(spec.upstreams.len());
    for upstream in &spec.upstreams {
        match upstream.runner_data::<RayObject>().filter(|object| object.belongs_to(shared)) {
            Some(object) => {
                replacements.push(Arg::Upstream(value_keys.len()));
                value_keys.push(object.key);
                upstream_names.push(upstream.name().to_owned());
                objects.push(object);
            }
            None => match upstream.result_bytes() {
                Ok(bytes) => replacements.push(Arg::Value(bytes.to_vec())),
                Err(_) => {
                    spec.run.finish(not_ready(upstream.name(), &upstream.state()), None);
                    return None;
                }
            },
        }
    }
    let mut report_keys = Vec::new();
    let mut wait_names = Vec::new();
    for waited in &spec.wait_for {
        match waited.runner_data::<RayObject>().filter(|object| object.belongs_to(shared)) {
            Some(object) => {
                report_keys.push(object.key);
                wait_names.push(waited.name().to_owned());
                objects.push(object);
            }
            None => {
                waited.wait(None);
                if !waited.state().is_completed() {
                    spec.run.finish(not_ready(waited.name(), &waited.state()), None);
                    return None;
                }
            }
        }
    }
    let args: Vec<Arg> = spec.args.into_iter().map(|arg| replace_upstreams(arg, &replacements)).collect();
    if let Err(message) = check_argument_sizes(&args) {
        spec.run.finish(State::failed(message), None);
        return None;
    }
    let header = CallHeader {
        task_key: task.key.to_owned(),
        fingerprint: task.fingerprint.to_owned(),
        run_id: spec.run.id(),
        run_name: spec.run.name().to_owned(),
        args: args.iter().map(Arg::view).collect(),
        options: spec.options.clone(),
        upstreams: upstream_names,
        wait_for: wait_names,
        output,
        results: spec.results.clone(),
    };
    let header = match rmp_serde::to_vec_named(&header) {
        Ok(header) => header,
        Err(error) => {
            spec.run.crash(format!("could not encode the call: {error}"));
            return None;
        }
    };
    let function = match shared.function(task.key, task.name, &spec.options.remote_options) {
        Ok(function) => function,
        Err(message) => {
            spec.run.crash(message);
            return None;
        }
    };
    let dependencies: Vec<TaskRun> = spec.upstreams.iter().chain(&spec.wait_for).cloned().collect();
    Some((
        function,
        Call {
            pending: PendingRun { run: spec.run, dependencies, cancelled: None, live: None },
            header,
            value_keys,
            report_keys,
            objects,
        },
    ))
}

/// The most one argument can take: MessagePack's limit for one binary value (4 GiB - 1).
const MAX_ARGUMENT: usize = u32::MAX as usize;

/// An argument too large to encode fails its run at once, saying so.
fn check_argument_sizes(args: &[Arg]) -> Result<(), String> {
    fn largest(arg: &Arg) -> usize {
        match arg {
            Arg::Value(bytes) => bytes.len(),
            Arg::List(items) => items.iter().map(largest).max().unwrap_or(0),
            Arg::Upstream(_) => 0,
        }
    }
    let bytes = args.iter().map(largest).max().unwrap_or(0);
    if bytes <= MAX_ARGUMENT { Ok(()) } else { Err(argument_size_error(bytes)) }
}

fn argument_size_error(bytes: usize) -> String {
    let gib = |bytes: usize| bytes as f64 / f64::from(1u32 << 30);
    format!(
        "an argument of this run takes {:.2} GiB, more than the {:.2} GiB one argument can take; \
         create large data inside a task and pass its future to the tasks that need it",
        gib(bytes),
        gib(MAX_ARGUMENT)
    )
}

fn replace_upstreams(arg: Arg, replacements: &[Arg]) -> Arg {
    match arg {
        Arg::Upstream(index) => replacements[index].clone(),
        Arg::List(items) => Arg::List(items.into_iter().map(|item| replace_upstreams(item, replacements)).collect()),
        value => value,
    }
}

/// Says once per storage that a local directory on a cluster of several nodes is each node's
/// own: a worker writes records where it runs, and a run on another node does not see them.
/// Values still pass between runs through Ray; only caching is per node.
fn warn_if_unshared(storage: &str, nodes: u64) {
    static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let local = storage.starts_with('/') || storage.starts_with("file://");
    if !local || nodes < 2 {
        return;
    }
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned.iter().any(|seen| seen == storage) {
        warned.push(storage.to_owned());
        tracing::warn!(
            target: "prefect::flow_run",
            "results are stored in {storage}, a local directory, on a Ray cluster of {nodes} nodes: each node keeps its own, so a cached value is found only on the node that wrote it. Share the directory between the nodes, or use object storage (result_storage = \"s3://bucket/prefix\", or PREFECT_RESULTS_STORAGE)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argument_too_large_to_encode_is_refused_with_its_size() {
        // The message is tried on a size alone: 5 GiB are not allocated for it.
        assert!(check_argument_sizes(&[Arg::Value(vec![0; 16]), Arg::Upstream(0)]).is_ok());
        let error = argument_size_error(5 << 30);
        assert!(error.starts_with("an argument of this run takes 5.00 GiB, more than the 4.00 GiB"), "{error}");
        assert!(error.ends_with("pass its future to the tasks that need it"), "{error}");
    }
}
