//! What a task runner author needs: the contract between the engine and runners, and the
//! pieces for executing a task in another process.
//!
//! The engine creates each task run, serializes its arguments, and hands a [`TaskRunSpec`] to
//! the flow's runner. The runner decides where and when the run executes, and reports back
//! through the spec's [`TaskRunWriter`], the one handle that can write the run's states: it
//! ends the run with [`finish`](TaskRunWriter::finish), and if it is dropped without, the run
//! ends `Crashed`. So every submitted run ends exactly once, whatever happens to the runner.
//!
//! A runner that executes tasks in another process has everything it needs in the spec: the
//! task's registered key and fingerprint ([`TaskDefinition`]), the serialized arguments
//! ([`Arg`]), the upstream runs whose results fill argument slots, the runs to wait for, and
//! the options (retries, timeout, remote options). There, [`lookup`] finds the task by its
//! key, [`assemble`] builds its input, and [`execute`] runs it.
//!
//! A runner that starts processes of its own (a cluster, a driver) registers them with
//! [`stop_on_interrupt`]: on Ctrl-C or SIGTERM the engine ends the live runs `Crashed` where
//! they are observed while those processes stop, then the program exits.

use std::sync::Arc;

pub use crate::concurrency::prefect_api;
pub use crate::error::{BoxError, TaskFailure};
pub use crate::interrupt::{StopOnInterrupt, stop_on_interrupt};
pub use crate::observe::{FlowRunInfo, SubflowParent, TaskRunInfo};
pub use crate::options::{with_remote_options, with_remote_options_async};
pub use crate::registry::{BodyFuture, LookupError, SyncBody, TaskBody, TaskDefinition, lookup};
pub use crate::task_engine::{Execution, abandoned_attempts_running, execute, run_here};
pub use crate::task_run::{RemoteResult, ResultData, TaskRun, TaskRunWriter};
pub use crate::wire::{Arg, ArgView, Arguments, assemble};

use crate::error::TaskError;
use crate::options::TaskOptions;
pub use crate::results::ResultPlan;
use crate::state::State;

/// Everything needed to execute one task run, here or anywhere.
#[derive(Debug)]
pub struct TaskRunSpec {
    /// The run's write handle: report its states here, and end it.
    pub run: TaskRunWriter,
    /// One argument per task parameter, in order.
    pub args: Vec<Arg>,
    /// The runs whose results fill [`Arg::Upstream`] slots, by index.
    pub upstreams: Vec<TaskRun>,
    /// Runs that must finish first, whose values the task does not take.
    pub wait_for: Vec<TaskRun>,
    /// Retries, timeout, tags and remote options of this run.
    pub options: TaskOptions,
    /// How the run's value is persisted and cached, if it is: pass it to [`execute`]
    /// wherever the run executes.
    pub results: Option<ResultPlan>,
}

impl TaskRunSpec {
    /// Every run this one depends on: upstreams, then wait-fors.
    pub fn dependencies(&self) -> impl Iterator<Item = &TaskRun> {
        self.upstreams.iter().chain(&self.wait_for)
    }

    /// The state this run ends in without running, if a run it depends on did not complete.
    /// Only meaningful once the dependencies have finished.
    pub fn upstream_failure(&self) -> Option<State> {
        self.dependencies().find(|run| !run.state().is_completed()).map(|run| not_ready(run.name(), &run.state()))
    }

    /// The upstream runs' serialized results, fetched into this process; with them,
    /// [`assemble`] builds the arguments.
    ///
    /// # Errors
    ///
    /// If an upstream result is unavailable.
    pub fn upstream_results(&self) -> Result<Vec<Arc<Vec<u8>>>, TaskError> {
        self.upstreams.iter().map(TaskRun::result_bytes).collect()
    }
}

/// The `NotReady` state of a run whose upstream `upstream` ended in `state`.
pub fn not_ready(upstream: &str, state: &State) -> State {
    State::not_ready(format!("Upstream task run '{upstream}' did not reach a 'COMPLETED' state: {state}"))
}

/// Why a runner could not start, as the runner's own error type: the flow's
/// [`FlowError::RunnerStart`](crate::FlowError::RunnerStart) keeps it, so a caller can
/// downcast it.
pub type RunnerError = BoxError;

/// Executes task runs for a flow run: on threads, on a cluster, anywhere.
///
/// A flow calls [`start`](Self::start) when its run begins, [`submit`](Self::submit) for every
/// task run, and [`stop`](Self::stop) once all of them have finished. Each run comes with its
/// [`TaskRunWriter`]; the runner ends the run through it, in some final state, even when its
/// infrastructure fails (then the state is `Crashed`). A writer the runner drops ends its run
/// `Crashed` by itself, so a runner bug never leaves a flow waiting.
///
/// # Examples
///
/// A runner that executes each run on the submitting thread, after its dependencies:
///
/// ```
/// use prefect::runner::{FlowRunInfo, RunnerError, TaskRunSpec, TaskRunner};
///
/// #[derive(Debug)]
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
///         prefect::runner::run_here(spec);
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
    /// If the runner cannot run tasks; the flow run then ends `Crashed`, and the caller gets
    /// this error inside [`FlowError::RunnerStart`](crate::FlowError::RunnerStart).
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
