//! The contract between the engine and task runners.
//!
//! The engine creates each task run, serializes its arguments, and hands a [`TaskRunSpec`] to
//! the flow's runner. The runner decides where and when the run executes, and reports back
//! through the spec's [`TaskRunHandle`]. A runner that executes tasks in another process has
//! everything it needs in the spec: the task's registered key and fingerprint, the
//! serialized arguments, the upstream runs whose results fill argument slots, the runs to
//! wait for, and the options (retries, timeout, remote options). There, [`execute`] runs the
//! task from nothing but those.
//!
//! [`execute`]: crate::task_engine::execute

use std::error::Error;

use std::sync::Arc;

use crate::args::Arg;
use crate::error::TaskError;
use crate::observe::FlowRunInfo;
use crate::options::TaskOptions;
use crate::state::State;
use crate::task_run::TaskRunHandle;

/// Everything needed to execute one task run, here or anywhere.
pub struct TaskRunSpec {
    /// The run: its id, name and task; report its states here.
    pub run: TaskRunHandle,
    /// One argument per task parameter, in order.
    pub args: Vec<Arg>,
    /// The runs whose results fill [`Arg::Upstream`] slots, by index.
    pub upstreams: Vec<TaskRunHandle>,
    /// Runs that must finish first, whose values the task does not take.
    pub wait_for: Vec<TaskRunHandle>,
    /// Retries, timeout, tags and remote options of this run.
    pub options: TaskOptions,
}

impl TaskRunSpec {
    /// Every run this one depends on: upstreams, then wait-fors.
    pub fn dependencies(&self) -> impl Iterator<Item = &TaskRunHandle> {
        self.upstreams.iter().chain(&self.wait_for)
    }

    /// The state this run ends in without running, if a run it depends on did not complete.
    /// Only meaningful once the dependencies have finished.
    pub fn upstream_failure(&self) -> Option<State> {
        self.dependencies().find(|run| !run.state().is_completed()).map(|run| not_ready(run.name(), &run.state()))
    }

    /// The upstream runs' serialized results, fetched into this process; with them,
    /// [`assemble`](crate::args::assemble) builds the arguments.
    ///
    /// # Errors
    ///
    /// If an upstream result is unavailable.
    pub fn upstream_results(&self) -> Result<Vec<Arc<Vec<u8>>>, TaskError> {
        self.upstreams.iter().map(TaskRunHandle::result_bytes).collect()
    }
}

/// The `NotReady` state of a run whose upstream `upstream` ended in `state`.
pub fn not_ready(upstream: &str, state: &State) -> State {
    State::not_ready(format!("Upstream task run '{upstream}' did not reach a 'COMPLETED' state: {state}"))
}

/// Why a runner could not start, in a line that says what to do.
pub type RunnerError = Box<dyn Error + Send + Sync>;

/// Executes task runs for a flow run: on threads, on a cluster, anywhere.
///
/// A flow calls [`start`](Self::start) when its run begins, [`submit`](Self::submit) for every
/// task run, and [`stop`](Self::stop) once all of them have finished. A runner must finish
/// every submitted run exactly once through its handle, in some final state, even when
/// its infrastructure fails (then the state is `Crashed`).
///
/// # Examples
///
/// A runner that executes each run on the submitting thread, after its dependencies:
///
/// ```
/// use prefect::runner::{TaskRunner, TaskRunSpec, RunnerError};
/// use prefect::observe::FlowRunInfo;
///
/// struct Inline;
///
/// impl TaskRunner for Inline {
///     fn name(&self) -> String {
///         "Inline".into()
///     }
///     fn start(&self, _: &FlowRunInfo) -> Result<(), RunnerError> {
///         Ok(())
///     }
///     fn submit(&self, spec: TaskRunSpec) {
///         spec.dependencies().for_each(|run| { run.wait(None); });
///         prefect::task_engine::run_here(&spec);
///     }
///     fn stop(&self) {}
/// }
///
/// #[prefect::task]
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
///
/// #[prefect::flow(task_runner = Inline)]
/// fn doubled() -> u32 {
///     double.submit(double.submit(1)).result().unwrap()
/// }
///
/// assert_eq!(doubled().unwrap(), 4);
/// ```
pub trait TaskRunner: Send + Sync + 'static {
    /// A short name for logs, such as `ThreadPoolTaskRunner`.
    fn name(&self) -> String;

    /// Gets ready for a flow run: starts threads, connects to a cluster.
    ///
    /// # Errors
    ///
    /// If the runner cannot run tasks; the flow run then ends `Crashed` with this message.
    fn start(&self, flow_run: &FlowRunInfo) -> Result<(), RunnerError>;

    /// Takes a task run. It must not run before its dependencies have finished, and must
    /// end `NotReady` instead of running if one of them did not complete.
    fn submit(&self, spec: TaskRunSpec);

    /// Takes the runs of one `map`, all runs of the same task with the same options. The
    /// default submits them one by one; a runner may send them together.
    fn submit_many(&self, specs: Vec<TaskRunSpec>) {
        specs.into_iter().for_each(|spec| self.submit(spec));
    }

    /// Releases what `start` acquired. Called after every submitted run has finished and
    /// the values still referenced by futures have been copied into this process.
    fn stop(&self);

    /// Ends every run that has not started yet as `Cancelled`, and stops running ones where
    /// the runner can. Called when the flow run times out. The default does nothing.
    fn cancel_pending(&self, _reason: &str) {}
}
