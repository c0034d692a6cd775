//! Reporting runs to a Prefect server, so Rust flows show in the Prefect UI.
//!
//! When `PREFECT_API_URL` is set (such as `http://127.0.0.1:4200/api`), the first flow run
//! connects to that server, and from then on every flow run, task run and log line is
//! reported to it; `PREFECT_API_KEY`, for Prefect Cloud, is sent as a bearer token. Without
//! `PREFECT_API_URL`, nothing is reported and nothing is collected. A program that chooses
//! its server itself calls [`connect`].
//!
//! What the server gets, as from Prefect's own Python client:
//! - the flow, and each flow run with its name, parameters and retries; its states go
//!   through the server's orchestration, whose answer the run obeys (a rejected state is
//!   replaced by the server's, a wait is waited, an abort cancels the run);
//! - each task run with its name, task key, dynamic key, tags, retry policy, upstream task
//!   runs as task inputs (the UI draws the graph from them), every state with the time it
//!   was entered where the task ran (on a Ray worker, the worker's times), its run count and
//!   start and end times;
//! - a subflow's run under the task run that stands for it in its parent;
//! - log lines of flow runs and task runs at INFO and above (see [`crate::logging`]).
//!
//! Reporting never fails or stalls a flow: requests go out from a background thread, in
//! batches, retried with backoff. When the server cannot be reached, one warning is logged, a
//! flow waits for it at most a few seconds, and what it reports meanwhile is kept (bounded)
//! and delivered once the server is back. At the end of each flow run, what was queued for
//! it is delivered (waiting at most 15 s), so its final states are on the server when the
//! flow call returns. If the program is interrupted (Ctrl-C, SIGTERM) or exits while runs
//! are live, they end `Crashed` on the server first. See [`prefect_api::Reporter`] for the
//! details.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, Once, Weak};
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use prefect_api::{ArtifactCreate, Client, LogCreate, NewFlowRun, Reporter, StateCreate, TaskRunCreate};
use serde_json::json;
use uuid::Uuid;

/// The client crate, for programs and tests that read back what was reported.
pub use prefect_api as api;

use crate::artifacts::Artifact;
use crate::observe::{self, FlowRunInfo, LogRecord, Orchestration, RunObserver, TaskRunInfo};
use crate::state::{State, StateType};

/// How long a flow waits for the server's answer to a proposed state.
const ORCHESTRATION_WAIT: Duration = Duration::from_secs(10);
/// How often the server is asked what it did to live flow runs (cancelled or paused them),
/// and told the task runs' progress.
const SERVER_POLL: Duration = Duration::from_secs(1);
/// How long the end of a flow run waits for what is queued to be delivered.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(15);

/// Why reporting could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReportingError {
    /// The API address is not an `http://` or `https://` URL.
    #[error(
        "PREFECT_API_URL {0:?} is not an http(s) address; set it to the server's API, such as http://127.0.0.1:4200/api"
    )]
    InvalidUrl(String),
}

/// A connection that reports every run to one Prefect server.
///
/// # Examples
///
/// ```no_run
/// #[prefect::flow]
/// fn hello() -> uuid::Uuid {
///     prefect::runtime::flow_run().unwrap().id
/// }
///
/// let server = prefect::reporting::connect("http://127.0.0.1:4200/api", None)?;
/// let local_id = hello().unwrap();
/// println!("{}", server.flow_run_url(local_id).unwrap());
/// # Ok::<(), prefect::reporting::ReportingError>(())
/// ```
#[derive(Clone)]
pub struct Reporting(Arc<PrefectObserver>);

impl std::fmt::Debug for Reporting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Reporting").field(&self.0.reporter).finish()
    }
}

impl Reporting {
    /// The API client, for reading back what was reported.
    pub fn client(&self) -> &Client {
        self.0.reporter.client()
    }

    /// The server's id for a flow run. The server chooses flow run ids, and a run created
    /// there takes that id in this program too ([`FlowRunInfo::id`]), so this returns the id
    /// it is given; `None` if the run was not created on the server.
    pub fn server_flow_run_id(&self, flow_run_id: Uuid) -> Option<Uuid> {
        self.0.reporter.server_flow_run_id(flow_run_id)
    }

    /// The flow run's page in the Prefect UI.
    pub fn flow_run_url(&self, flow_run_id: Uuid) -> Option<String> {
        self.server_flow_run_id(flow_run_id).map(|id| self.client().flow_run_url(id))
    }

    /// Whether the server answered the last request (or none was made yet).
    pub fn is_reachable(&self) -> bool {
        self.0.reporter.is_reachable()
    }

    /// Waits at most `wait` until everything reported so far has been delivered.
    pub fn flush(&self, wait: Duration) -> bool {
        self.0.reporter.flush(wait)
    }
}

static CONNECTIONS: Mutex<Vec<Reporting>> = Mutex::new(Vec::new());

/// Reports every run from now on to the server whose API is at `api_url`, sending
/// `api_key` as a bearer token if given. Connecting twice to the same address returns the
/// same connection. Does not contact the server: the first flow run does.
///
/// # Errors
///
/// If `api_url` is not an `http://` or `https://` address.
pub fn connect(api_url: &str, api_key: Option<&str>) -> Result<Reporting, ReportingError> {
    let api_url = api_url.trim();
    if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
        return Err(ReportingError::InvalidUrl(api_url.to_owned()));
    }
    let mut connections = CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner());
    let mut client = Client::new(api_url);
    if let Some(existing) = connections.iter().find(|c| c.client().api_url() == client.api_url()) {
        return Ok(existing.clone());
    }
    if let Some(key) = api_key {
        client = client.api_key(key);
    }
    let reporting = Reporting(Arc::new(PrefectObserver {
        reporter: Reporter::new(client),
        tasks: Mutex::default(),
        flows: Mutex::default(),
        flows_changed: Condvar::new(),
        watching: Once::new(),
        progress: Mutex::default(),
        artifacts: Mutex::default(),
    }));
    observe::add_observer(reporting.0.clone());
    connections.push(reporting.clone());
    Ok(reporting)
}

/// Connects to `PREFECT_API_URL` (with `PREFECT_API_KEY`) if it is set; the engine calls
/// this before every flow run, and only the first call does anything.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Some(url) = std::env::var("PREFECT_API_URL").ok().filter(|url| !url.trim().is_empty()) else {
            return;
        };
        let key = std::env::var("PREFECT_API_KEY").ok();
        if let Err(error) = connect(&url, key.as_deref()) {
            tracing::warn!(target: "prefect::reporting", "{error}; runs are not reported");
        }
    });
}

/// The connection made from `PREFECT_API_URL` or by [`connect`], the first if several.
pub fn current() -> Option<Reporting> {
    CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner()).first().cloned()
}

/// The observer that translates runs into Prefect's API.
struct PrefectObserver {
    reporter: Reporter,
    /// What the server must be told again with each state of an unfinished task run.
    tasks: Mutex<HashMap<Uuid, TaskProgress>>,
    /// The flow runs not finished yet: watched for cancellation on the server, and ended
    /// `Crashed` if the program is interrupted.
    flows: Mutex<HashMap<Uuid, FlowRunInfo>>,
    /// Wakes the cancellation watcher when a flow run starts.
    flows_changed: Condvar,
    /// Starts the cancellation watcher with the first flow run.
    watching: Once,
    /// Task runs' progress, sent as their progress artifacts by the watcher, at most once a
    /// second each.
    progress: Mutex<HashMap<Uuid, SaidProgress>>,
    /// Artifacts published by runs, sent by the watcher (and when a flow run ends): the
    /// task's thread never waits on the server. With the task run and flow run (local ids).
    artifacts: Mutex<Vec<PublishedArtifact>>,
}

/// An artifact to send: its task run (if any), its flow run (local id) and itself.
type PublishedArtifact = (Option<Uuid>, Option<Uuid>, Artifact);

/// How far a task run said it is, and what the server has of it.
#[derive(Default)]
struct SaidProgress {
    /// The flow run of the task run (local id), known while the task run is live.
    flow_run: Option<Uuid>,
    artifact: Option<Uuid>,
    latest: f64,
    sent: Option<f64>,
}

/// A task run's cumulative figures, as Prefect's client computes them.
struct TaskProgress {
    /// What the run was created with, to report a state for it without the engine.
    info: TaskRunInfo,
    flow_run_id: Uuid,
    run_count: u32,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    total_run_time: f64,
    running_since: Option<DateTime<Utc>>,
    /// The time of the last event: events of one run must have increasing times, or the
    /// server keeps the earlier state (clocks of a driver and a worker may disagree).
    last_occurred: Option<DateTime<Utc>>,
}

impl TaskProgress {
    fn new(info: TaskRunInfo, flow_run_id: Uuid) -> Self {
        Self {
            info,
            flow_run_id,
            run_count: 0,
            start_time: None,
            end_time: None,
            total_run_time: 0.0,
            running_since: None,
            last_occurred: None,
        }
    }

    /// Takes in a new state; returns the time to report it at.
    fn enter(&mut self, state: &State) -> DateTime<Utc> {
        let at = state.timestamp;
        if let Some(since) = self.running_since.take() {
            self.total_run_time += (at - since).as_seconds_f64().max(0.0);
        }
        if state.is_running() {
            self.run_count += 1;
            self.start_time.get_or_insert(at);
            self.running_since = Some(at);
        }
        if state.is_final() && self.start_time.is_some() {
            self.end_time = Some(at);
        }
        // The server keeps microseconds: two states within one would tie.
        let at = at.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(at);
        let occurred = match self.last_occurred {
            Some(last) if at <= last => last + TimeDelta::microseconds(1),
            _ => at,
        };
        self.last_occurred = Some(occurred);
        occurred
    }
}

fn state_create(state: &State) -> StateCreate {
    let mut create = StateCreate::new(state.state_type.api_name(), &state.name);
    create.message = state.message.clone();
    if let Some(at) = state.scheduled_time {
        create = create.scheduled_time(at);
    }
    if let Some(persisted) = &state.persisted {
        // Prefect's shape: the record's metadata as the state's data, the key in its details.
        create.data = Some(persisted.metadata_json());
        if let Some(key) = &persisted.cache_key {
            create.state_details.insert("cache_key".into(), key.clone().into());
        }
        if let Some(expiration) = persisted.expiration {
            create.state_details.insert("cache_expiration".into(), serde_json::json!(expiration));
        }
    }
    create
}

/// The engine's view of a state the server put a run in.
fn engine_state(state: &prefect_api::StateRead) -> State {
    let state_type = match state.state_type.as_str() {
        "SCHEDULED" | "PAUSED" => StateType::Scheduled,
        "PENDING" => StateType::Pending,
        "RUNNING" => StateType::Running,
        "COMPLETED" => StateType::Completed,
        "CANCELLED" | "CANCELLING" => StateType::Cancelled,
        "CRASHED" => StateType::Crashed,
        _ => StateType::Failed,
    };
    State {
        state_type,
        name: state.name.clone().into(),
        message: state.message.clone(),
        timestamp: state.timestamp,
        scheduled_time: state
            .state_details
            .get("scheduled_time")
            .and_then(|t| t.as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        persisted: None,
    }
}

/// How many of `flows` are above `info`: its parent, its parent's parent, ...
fn depth(info: &FlowRunInfo, flows: &[FlowRunInfo]) -> usize {
    let mut depth = 0;
    let mut parent = info.parent.as_ref().map(|p| p.flow_run_id);
    while let Some(id) = parent {
        depth += 1;
        parent = flows.iter().find(|f| f.id == id).and_then(|f| f.parent.as_ref().map(|p| p.flow_run_id));
        if depth > flows.len() {
            break;
        }
    }
    depth
}

/// Python's level numbers, which the API stores.
fn level_number(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 40,
        tracing::Level::WARN => 30,
        tracing::Level::INFO => 20,
        tracing::Level::DEBUG => 10,
        tracing::Level::TRACE => 5,
    }
}

impl PrefectObserver {
    fn task_event(&self, info: &TaskRunInfo, state: &State, created: bool) {
        let Some(flow_run_id) = info.flow_run_id else {
            // Runs outside any flow run are not reported: the server keys them by task key and
            // dynamic key alone, which repeat across programs.
            return;
        };
        let (occurred, task_run) = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            if !created && !tasks.contains_key(&info.id) {
                return;
            }
            let progress = tasks.entry(info.id).or_insert_with(|| TaskProgress::new(info.clone(), flow_run_id));
            let occurred = progress.enter(state);
            let task_run = json!({
                "name": info.name,
                "task_key": info.task_key,
                "dynamic_key": info.dynamic_key.to_string(),
                "empirical_policy": prefect_api::task_run_policy(info.retries, &info.retry_delay_seconds),
                "tags": info.tags,
                "labels": {},
                "task_inputs": prefect_api::task_inputs(&info.inputs),
                "run_count": progress.run_count,
                "flow_run_run_count": 1,
                "expected_start_time": info.created,
                "start_time": progress.start_time,
                "end_time": progress.end_time,
                "total_run_time": progress.total_run_time,
            });
            if state.is_final() {
                tasks.remove(&info.id);
            }
            (occurred, task_run)
        };
        let event = prefect_api::task_run_state_event(
            info.id,
            &info.name,
            occurred,
            &state_create(state),
            task_run,
            &info.tags,
        );
        self.reporter.emit(Some(flow_run_id), event);
    }
}

impl PrefectObserver {
    /// The flow run (local id) of a live task run.
    fn flow_run_of(&self, task_run: Uuid) -> Option<Uuid> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).get(&task_run).map(|t| t.flow_run_id)
    }

    /// Sends the artifacts published since the last time, each once (a failure is logged).
    fn send_artifacts(&self) {
        let due = std::mem::take(&mut *self.artifacts.lock().unwrap_or_else(|p| p.into_inner()));
        let client = self.reporter.client();
        for (task_run, flow_run, artifact) in due {
            let flow_run = flow_run.and_then(|id| self.reporter.server_flow_run_id(id));
            let body = ArtifactCreate {
                kind: &artifact.kind,
                key: artifact.key.as_deref(),
                data: &artifact.data,
                description: artifact.description.as_deref(),
                flow_run_id: flow_run,
                task_run_id: task_run,
            };
            if let Err(error) = client.create_artifact(&body) {
                tracing::warn!(target: "prefect::reporting", "could not send an artifact to the server: {error}");
            }
        }
    }

    /// Sends the progress said since the last time as progress artifacts; forgets the runs
    /// that have ended.
    fn send_progress(&self) {
        let due: Vec<(Uuid, Option<Uuid>, Option<Uuid>, f64)> = {
            let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            progress
                .iter()
                .filter(|(_, said)| said.sent != Some(said.latest))
                .map(|(run, said)| (*run, said.flow_run, said.artifact, said.latest))
                .collect()
        };
        let client = self.reporter.client();
        for (run, flow_run, artifact, fraction) in due {
            let percent = (fraction * 1000.0).round() / 10.0;
            let sent = match artifact {
                Some(artifact) => client.update_progress_artifact(artifact, percent).map(|()| artifact),
                None => {
                    let flow_run = flow_run.and_then(|id| self.reporter.server_flow_run_id(id));
                    client.create_progress_artifact(run, flow_run, percent)
                }
            };
            if let Ok(artifact) = sent {
                let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(said) = progress.get_mut(&run) {
                    said.artifact = Some(artifact);
                    said.sent = Some(fraction);
                }
            }
        }
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).retain(|run, _| tasks.contains_key(run));
    }
}

impl RunObserver for PrefectObserver {
    fn create_flow_run(&self, info: &FlowRunInfo) -> Option<Uuid> {
        let parent = info.parent.as_ref().map(|parent| {
            let task = &parent.task_run;
            let task_run = TaskRunCreate {
                id: task.id,
                name: task.name.clone(),
                flow_run_id: None,
                task_key: task.task_key.to_owned(),
                dynamic_key: task.dynamic_key.to_string(),
                tags: task.tags.clone(),
                task_inputs: prefect_api::task_inputs(&task.inputs),
                empirical_policy: prefect_api::task_run_policy(task.retries, &task.retry_delay_seconds),
                state: StateCreate::new("PENDING", "Pending"),
            };
            (parent.flow_run_id, task_run)
        });
        let run = NewFlowRun {
            local_id: info.id,
            flow_name: info.flow_name.clone(),
            name: info.name.clone(),
            parameters: info.parameters.clone(),
            retries: info.retries,
            retry_delay_seconds: 0.0,
            tags: Vec::new(),
            parent,
        };
        let id = self.reporter.create_flow_run(run, ORCHESTRATION_WAIT)?;
        tracing::info!(target: "prefect::reporting", "View at {}", self.reporter.client().flow_run_url(id));
        Some(id)
    }

    fn adopt_flow_run(&self, info: &FlowRunInfo) {
        self.reporter.adopt_flow_run(info.id);
        tracing::info!(target: "prefect::reporting", "View at {}", self.reporter.client().flow_run_url(info.id));
    }

    fn flow_run_created(&self, info: &FlowRunInfo) {
        self.flows.lock().unwrap_or_else(|p| p.into_inner()).insert(info.id, info.clone());
        self.flows_changed.notify_all();
        self.watching.call_once(|| {
            let observer = connections_observer(self);
            let started = std::thread::Builder::new()
                .name("prefect-follow-server".into())
                .spawn(move || follow_the_server(observer));
            if let Err(error) = started {
                tracing::warn!(target: "prefect::reporting", "could not follow the server (cancellations, pauses, progress): {error}");
            }
        });
    }

    fn propose_flow_run_state(&self, info: &FlowRunInfo, state: &State) -> Orchestration {
        use prefect_api::Orchestration as Answer;
        match self.reporter.set_flow_run_state(info.id, state_create(state), ORCHESTRATION_WAIT) {
            None | Some(Answer::Accept(_)) | Some(Answer::Reject { state: None, .. }) => Orchestration::Accept,
            Some(Answer::Reject { state: Some(server_state), .. }) => {
                Orchestration::Reject(engine_state(&server_state))
            }
            Some(Answer::Wait { delay_seconds, .. }) => {
                Orchestration::Wait(Duration::from_secs_f64(delay_seconds.clamp(0.0, 600.0)))
            }
            Some(Answer::Abort { reason }) => Orchestration::Abort(reason),
        }
    }

    fn task_run_created(&self, info: &TaskRunInfo, state: &State) {
        self.task_event(info, state, true);
    }

    fn task_run_state(&self, info: &TaskRunInfo, state: &State) {
        self.task_event(info, state, false);
    }

    fn log(&self, record: &LogRecord) {
        if record.logger.starts_with("prefect.reporting") || record.logger.starts_with("prefect_api") {
            return;
        }
        let flow_run_id = record.flow_run_id.or_else(|| {
            let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            record.task_run_id.and_then(|id| tasks.get(&id)).map(|task| task.flow_run_id)
        });
        let name = match record.logger.as_str() {
            "prefect.flow_run" => "prefect.flow_runs".to_owned(),
            "prefect.task_run" => "prefect.task_runs".to_owned(),
            other => other.to_owned(),
        };
        self.reporter.log(LogCreate {
            name,
            level: level_number(record.level),
            message: record.message.clone(),
            timestamp: record.timestamp,
            flow_run_id,
            task_run_id: record.task_run_id,
        });
    }

    fn artifact(&self, task_run_id: Option<Uuid>, flow_run_id: Option<Uuid>, artifact: &Artifact) {
        // The flow run is known now, while the task run is live.
        let flow_run_id = flow_run_id.or_else(|| task_run_id.and_then(|run| self.flow_run_of(run)));
        self.artifacts.lock().unwrap_or_else(|p| p.into_inner()).push((task_run_id, flow_run_id, artifact.clone()));
    }

    fn task_run_progress(&self, task_run_id: Uuid, fraction: f64) {
        // Looked up before `progress` is locked: `send_progress` locks the two the other way.
        let flow_run = self.flow_run_of(task_run_id);
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let said = progress.entry(task_run_id).or_default();
        said.latest = fraction;
        said.flow_run = said.flow_run.or(flow_run);
    }

    fn flow_run_finished(&self, info: &FlowRunInfo) {
        self.send_progress();
        self.send_artifacts();
        self.flows.lock().unwrap_or_else(|p| p.into_inner()).remove(&info.id);
        self.reporter.flush_flow_run(info.id, FINAL_FLUSH_WAIT);
    }

    /// Every task run and flow run not ended yet ends `Crashed` on the server: task runs
    /// first, then flow runs, subflows before their parents; then what is queued goes out,
    /// all within the final flush's deadline.
    fn interrupted(&self, reason: &str) {
        let deadline = std::time::Instant::now() + FINAL_FLUSH_WAIT;
        let crashed = State::crashed(reason);
        let tasks: Vec<TaskRunInfo> =
            self.tasks.lock().unwrap_or_else(|p| p.into_inner()).values().map(|task| task.info.clone()).collect();
        for info in &tasks {
            self.task_event(info, &crashed, false);
        }
        let flows: Vec<FlowRunInfo> =
            self.flows.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, info)| info).collect();
        if tasks.is_empty() && flows.is_empty() {
            // Nothing was live (the usual end of a program): nothing to wait for.
            return;
        }
        // Children before their parents: the deepest first.
        let mut order: Vec<(usize, &FlowRunInfo)> = flows.iter().map(|info| (depth(info, &flows), info)).collect();
        order.sort_by_key(|(depth, _)| std::cmp::Reverse(*depth));
        for (_, info) in order {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            self.reporter.set_flow_run_state(info.id, state_create(&crashed), wait);
        }
        self.reporter.flush(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// The observer `this` as a weak reference, found among the connections.
fn connections_observer(this: &PrefectObserver) -> Weak<PrefectObserver> {
    let connections = CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner());
    connections.iter().find(|c| std::ptr::eq(Arc::as_ptr(&c.0), this)).map(|c| Arc::downgrade(&c.0)).unwrap_or_default()
}

/// Asks the server, every [`SERVER_POLL`] while flow runs are live, what it did to
/// them, and follows: a run it moved to `Cancelling` (the UI's Cancel, `prefect flow-run
/// cancel`, a parent's cancellation) is cancelled here, which Prefect's own client would let
/// run on; a run it `Paused` (or `Suspended`) waits before each new task run until the
/// server resumes it.
fn follow_the_server(observer: Weak<PrefectObserver>) {
    let mut paused: HashSet<Uuid> = HashSet::new();
    loop {
        let Some(this) = observer.upgrade() else { return };
        let ids: Vec<Uuid> = {
            let mut flows = this.flows.lock().unwrap_or_else(|p| p.into_inner());
            while flows.is_empty() {
                flows = this.flows_changed.wait(flows).unwrap_or_else(|p| p.into_inner());
            }
            flows.keys().copied().collect()
        };
        paused.retain(|id| ids.contains(id));
        if let Ok(runs) = this.reporter.client().read_flow_runs(&json!({"flow_runs": {"id": {"any_": ids}}})) {
            for run in runs {
                let message = run.state.as_ref().and_then(|state| state.message.clone()).filter(|m| !m.is_empty());
                let because = |what: &str| match &message {
                    Some(message) => format!("the flow run was {what} on the Prefect server: {message}"),
                    None => format!("the flow run was {what} on the Prefect server"),
                };
                match run.state_type() {
                    "CANCELLING" | "CANCELLED" => {
                        observe::cancel_flow_run(run.id, &because("cancelled"));
                    }
                    "PAUSED" if paused.insert(run.id) => {
                        observe::pause_flow_run(run.id, &because("paused"));
                    }
                    "PAUSED" => {}
                    state if paused.remove(&run.id) => {
                        if state != "RUNNING" {
                            // Resuming a suspended run schedules it again: it runs on here.
                            this.reporter.set_flow_run_state(
                                run.id,
                                StateCreate::new("RUNNING", "Running"),
                                ORCHESTRATION_WAIT,
                            );
                        }
                        observe::resume_flow_run(run.id, &because("resumed"));
                    }
                    _ => {}
                }
            }
        }
        this.send_progress();
        this.send_artifacts();
        drop(this);
        std::thread::sleep(SERVER_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn task_info() -> TaskRunInfo {
        TaskRunInfo {
            id: Uuid::nil(),
            name: "shout-3f2".into(),
            task_name: "shout",
            task_key: "shout-key",
            dynamic_key: 0,
            flow_run_id: None,
            tags: Vec::new(),
            inputs: Vec::new(),
            retries: 0,
            retry_delay_seconds: Vec::new(),
            created: at(0),
        }
    }

    fn state(state: State, seconds: i64) -> State {
        State { timestamp: at(seconds), ..state }
    }

    #[test]
    fn progress_counts_runs_and_running_time_across_retries() {
        let mut progress = TaskProgress::new(task_info(), Uuid::nil());
        progress.enter(&state(State::pending(), 0));
        progress.enter(&state(State::running(), 1));
        progress.enter(&state(State::awaiting_retry(at(5)), 3));
        progress.enter(&state(State::retrying(), 5));
        progress.enter(&state(State::completed(), 6));
        assert_eq!(progress.run_count, 2);
        assert_eq!((progress.start_time, progress.end_time), (Some(at(1)), Some(at(6))));
        assert_eq!(progress.total_run_time, 3.0);
    }

    #[test]
    fn event_times_of_one_run_always_increase() {
        let mut progress = TaskProgress::new(task_info(), Uuid::nil());
        assert_eq!(progress.enter(&state(State::pending(), 10)), at(10));
        // A worker whose clock is behind the driver's.
        let occurred = progress.enter(&state(State::running(), 9));
        assert_eq!(occurred, at(10) + TimeDelta::microseconds(1));
        assert_eq!(progress.start_time, Some(at(9)), "the run's own times are kept as they were");
    }

    #[test]
    fn server_states_become_engine_states() {
        let read: prefect_api::StateRead = serde_json::from_value(json!({
            "type": "SCHEDULED", "name": "AwaitingRetry", "message": null,
            "timestamp": "2027-01-15T08:00:00Z", "state_details": {"scheduled_time": "2027-01-15T08:00:05Z"}
        }))
        .unwrap();
        let state = engine_state(&read);
        assert_eq!((state.state_type, &*state.name), (StateType::Scheduled, "AwaitingRetry"));
        assert_eq!(state.scheduled_time.unwrap().to_rfc3339(), "2027-01-15T08:00:05+00:00");
    }

    #[test]
    fn connect_refuses_what_is_not_an_http_address() {
        let error = connect("127.0.0.1:4200/api", None).unwrap_err();
        assert!(error.to_string().contains("http://127.0.0.1:4200/api"), "{error}");
    }
}
