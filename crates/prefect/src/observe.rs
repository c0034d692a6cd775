//! Hooks that see every flow run, task run, state and log line: how runs get reported to a
//! Prefect server without the engine knowing about HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::state::State;

/// What is known about a flow run when it is created.
#[derive(Clone, Debug)]
pub struct FlowRunInfo {
    /// The flow run's id.
    pub id: Uuid,
    /// The flow run's generated name, such as `crimson-panda`.
    pub name: String,
    /// The flow's name, such as `count-to`.
    pub flow_name: String,
    /// The arguments of the call, as JSON.
    pub parameters: Value,
    /// For a subflow: the parent flow run and the task run that stands for this call in it.
    pub parent: Option<SubflowParent>,
    /// How many retries the flow run may use.
    pub retries: u32,
}

/// Where a subflow run sits in its parent.
#[derive(Clone, Debug)]
pub struct SubflowParent {
    /// The parent flow run.
    pub flow_run_id: Uuid,
    /// The task run that stands for the subflow call in the parent.
    pub task_run: TaskRunInfo,
}

/// What is known about a task run when it is created.
#[derive(Clone, Debug)]
pub struct TaskRunInfo {
    /// The task run's id.
    pub id: Uuid,
    /// The task run's name, such as `shout-3f2`.
    pub name: String,
    /// The task's display name.
    pub task_name: &'static str,
    /// The task's key: its registered path and a fingerprint of its code.
    pub task_key: &'static str,
    /// Which run of the task this is within its flow run: 0, 1, ...
    pub dynamic_key: u64,
    /// The flow run it belongs to, if any.
    pub flow_run_id: Option<Uuid>,
    /// Its tags.
    pub tags: Vec<String>,
    /// For each parameter, the upstream task runs whose results feed it; the runs it waits
    /// for without taking their values are listed under `wait_for`.
    pub inputs: Vec<(&'static str, Vec<Uuid>)>,
    /// How many retries it may use.
    pub retries: u32,
    /// Its retry delays, in seconds.
    pub retry_delay_seconds: Vec<f64>,
    /// When it was created.
    pub created: DateTime<Utc>,
}

/// One log line from a flow run or task run.
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Where the line came from, such as `prefect.task_runs` or a module path.
    pub logger: String,
    /// Its level.
    pub level: tracing::Level,
    /// The text.
    pub message: String,
    /// When it was written, which for a task on another machine is that machine's time.
    pub timestamp: DateTime<Utc>,
    /// The flow run it belongs to.
    pub flow_run_id: Option<Uuid>,
    /// The task run it belongs to, if any.
    pub task_run_id: Option<Uuid>,
}

/// A Prefect server's answer to a proposed flow run state.
#[derive(Clone, Debug, PartialEq)]
pub enum Orchestration {
    /// Go on in the proposed state.
    Accept,
    /// Do not enter the proposed state; the run is in this one instead.
    Reject(State),
    /// Ask again after this long.
    Wait(Duration),
    /// Stop the run: it was deleted or cancelled on the server.
    Abort(String),
}

/// Sees everything that happens to runs. Implementations must return quickly and never
/// fail the run: queue the work, do it elsewhere.
pub trait RunObserver: Send + Sync {
    /// Creates the flow run where this observer keeps runs, if that place names runs itself
    /// (a Prefect server chooses flow run ids), and returns its id there. The engine asks
    /// before [`flow_run_created`](Self::flow_run_created) and uses the first id it gets as
    /// the run's id, so the program and the server name the run alike.
    fn create_flow_run(&self, _info: &FlowRunInfo) -> Option<Uuid> {
        None
    }
    /// The flow run exists already where this observer keeps runs, under `info.id`: a
    /// deployment's run that a Prefect server created and a serving program started. Asked
    /// instead of [`create_flow_run`](Self::create_flow_run).
    fn adopt_flow_run(&self, _info: &FlowRunInfo) {}
    /// A flow run was created, with its final id.
    fn flow_run_created(&self, _info: &FlowRunInfo) {}
    /// The engine wants the flow run to enter `state`; the answer decides whether it does.
    fn propose_flow_run_state(&self, _info: &FlowRunInfo, _state: &State) -> Orchestration {
        Orchestration::Accept
    }
    /// A task run was created, in `state`.
    fn task_run_created(&self, _info: &TaskRunInfo, _state: &State) {}
    /// A task run entered `state`.
    fn task_run_state(&self, _info: &TaskRunInfo, _state: &State) {}
    /// A flow run or task run wrote a log line.
    fn log(&self, _record: &LogRecord) {}
    /// A task run said how far it is, from 0.0 to 1.0 ([`crate::progress`]).
    fn task_run_progress(&self, _task_run_id: Uuid, _fraction: f64) {}
    /// A task run (or a flow run, outside any task run) published an artifact.
    fn artifact(&self, _task_run_id: Option<Uuid>, _flow_run_id: Option<Uuid>, _artifact: &crate::artifacts::Artifact) {
    }
    /// A flow run has ended: a chance to deliver what is queued before the program moves on.
    fn flow_run_finished(&self, _info: &FlowRunInfo) {}
    /// The program is about to exit (a signal, or its end) while runs may be live: end
    /// every run not ended yet as `Crashed` for `reason`, and deliver what is queued,
    /// within a few seconds. Called at most a few times, from any thread.
    fn interrupted(&self, _reason: &str) {}
}

static ANY: AtomicBool = AtomicBool::new(false);
static OBSERVERS: RwLock<Vec<Arc<dyn RunObserver>>> = RwLock::new(Vec::new());

/// Adds an observer for every run from now on.
pub fn add_observer(observer: Arc<dyn RunObserver>) {
    OBSERVERS.write().unwrap_or_else(|p| p.into_inner()).push(observer);
    ANY.store(true, Ordering::Release);
}

/// Whether any observer is installed; nothing is collected for observers when none is.
pub fn active() -> bool {
    ANY.load(Ordering::Acquire)
}

fn each(mut f: impl FnMut(&dyn RunObserver)) {
    if active() {
        for observer in OBSERVERS.read().unwrap_or_else(|p| p.into_inner()).iter() {
            f(observer.as_ref());
        }
    }
}

/// The id a flow run gets from the first observer that names runs itself, if any.
pub(crate) fn create_flow_run(info: &FlowRunInfo) -> Option<Uuid> {
    let mut id = None;
    each(|o| {
        if id.is_none() {
            id = o.create_flow_run(info);
        }
    });
    id
}

pub(crate) fn adopt_flow_run(info: &FlowRunInfo) {
    each(|o| o.adopt_flow_run(info));
}

pub(crate) fn flow_run_created(info: &FlowRunInfo) {
    each(|o| o.flow_run_created(info));
}

/// Asks every observer; the first answer that is not `Accept` wins.
pub(crate) fn propose_flow_run_state(info: &FlowRunInfo, state: &State) -> Orchestration {
    let mut answer = Orchestration::Accept;
    each(|o| {
        let this = o.propose_flow_run_state(info, state);
        if answer == Orchestration::Accept {
            answer = this;
        }
    });
    answer
}

pub(crate) fn task_run_created(info: &TaskRunInfo, state: &State) {
    each(|o| o.task_run_created(info, state));
}

pub(crate) fn task_run_state(info: &TaskRunInfo, state: &State) {
    each(|o| o.task_run_state(info, state));
}

/// Cancels the flow run `id` of this process and its subflow runs, as a Prefect server's
/// Cancel does: each stops submitting task runs, its runner cancels the unfinished ones
/// (on Ray, `ray.cancel`, which ends their workers), and it ends `Cancelled` with `reason`
/// as soon as its function returns. For an observer that learns of a cancellation
/// elsewhere, or a program that cancels a run it started on another thread. Returns
/// whether a run in progress had that id.
///
/// A flow function blocked in code of its own (not waiting for a task run) is not
/// interrupted: Rust cannot stop a thread. Its run ends `Cancelled` when the function
/// returns; a served run's process is ended by the serving program if it does not.
pub fn cancel_flow_run(id: Uuid, reason: &str) -> bool {
    crate::flow::cancel(id, reason)
}

/// Pauses the flow run `id` of this process and its subflow runs, as a Prefect server's
/// Pause does: task runs they submit from now on wait until [`resume_flow_run`] (or a
/// cancellation); runs already submitted go on. Returns whether a run in progress had
/// that id.
pub fn pause_flow_run(id: Uuid, reason: &str) -> bool {
    crate::flow::pause(id, true, reason)
}

/// Resumes a flow run that [`pause_flow_run`] paused. Returns whether a run in progress
/// had that id.
pub fn resume_flow_run(id: Uuid, reason: &str) -> bool {
    crate::flow::pause(id, false, reason)
}

pub(crate) fn artifact(task_run_id: Option<Uuid>, flow_run_id: Option<Uuid>, artifact: &crate::artifacts::Artifact) {
    each(|o| o.artifact(task_run_id, flow_run_id, artifact));
}

pub(crate) fn task_run_progress(task_run_id: Uuid, fraction: f64) {
    each(|o| o.task_run_progress(task_run_id, fraction));
}

/// Hands a log line to every observer.
pub fn log(record: &LogRecord) {
    each(|o| o.log(record));
}

pub(crate) fn flow_run_finished(info: &FlowRunInfo) {
    each(|o| o.flow_run_finished(info));
}

pub(crate) fn interrupted(reason: &str) {
    each(|o| o.interrupted(reason));
}
