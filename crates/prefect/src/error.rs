//! Errors that flows and task runs hand back to the caller.
//!
//! Every kind of ending has a variant of its own, so a caller decides by matching, never by
//! reading a message. The messages keep Prefect's wording and name the run.

use std::error::Error as StdError;
use std::time::Duration;

use thiserror::Error;

use crate::state::{State, StateType};

/// An error from a runner or another source, kept whole so a caller can downcast it.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a task run produced no value: what [`PrefectFuture::result`](crate::PrefectFuture::result)
/// and a direct task call return instead of the task's value.
///
/// Every message names the task run, so a log line alone tells which run went wrong.
///
/// # Examples
///
/// ```
/// use prefect::{flow, task, TaskError};
///
/// #[task(timeout_seconds = 0.1)]
/// fn slow() {
///     std::thread::sleep(std::time::Duration::from_secs(1));
/// }
///
/// #[flow]
/// fn impatient() -> bool {
///     matches!(slow.submit().result(), Err(TaskError::TimedOut { .. }))
/// }
///
/// assert!(impatient().unwrap());
/// ```
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The task returned `Err` or panicked, and had no retries left.
    #[error("task run '{task_run}' failed: {message}")]
    Failed {
        /// The task run's name.
        task_run: String,
        /// The error or panic message.
        message: String,
    },
    /// The last attempt overran the task's `timeout_seconds`.
    #[error("task run '{task_run}' failed: {message}")]
    TimedOut {
        /// The task run's name.
        task_run: String,
        /// `Task run exceeded timeout of N second(s)`.
        message: String,
    },
    /// The process or Ray worker running the task died before it finished, or the runner
    /// lost the run.
    #[error("task run '{task_run}' crashed: {message}")]
    Crashed {
        /// The task run's name.
        task_run: String,
        /// What died, and how.
        message: String,
    },
    /// The task run was cancelled before it finished.
    #[error("task run '{task_run}' was cancelled: {message}")]
    Cancelled {
        /// The task run's name.
        task_run: String,
        /// Who cancelled it.
        message: String,
    },
    /// The task never ran because a run it depends on did not complete.
    #[error("task run '{task_run}' did not run: {message}")]
    NotReady {
        /// The task run's name.
        task_run: String,
        /// Which upstream run did not complete, and why.
        message: String,
    },
    /// The task completed, but its value could not be read back.
    #[error("task run '{task_run}' completed, but its result could not be read: {message}")]
    ResultUnavailable {
        /// The task run's name.
        task_run: String,
        /// What went wrong while fetching or decoding the result.
        message: String,
        /// The underlying error, when there is one (a decoding error, say).
        #[source]
        source: Option<BoxError>,
    },
}

impl TaskError {
    /// The error a task run in `state` stands for, or `None` for a `Completed` state.
    pub fn from_state(task_run: &str, state: &State) -> Option<Self> {
        let task_run = task_run.to_owned();
        let message = state.message.clone().unwrap_or_else(|| state.name.to_string());
        Some(match state.state_type {
            StateType::Completed => return None,
            StateType::Failed if state.is_timed_out() => Self::TimedOut { task_run, message },
            StateType::Failed => Self::Failed { task_run, message },
            StateType::Crashed => Self::Crashed { task_run, message },
            StateType::Cancelled => Self::Cancelled { task_run, message },
            StateType::Pending | StateType::Scheduled | StateType::Running => Self::NotReady { task_run, message },
        })
    }

    pub(crate) fn result_unavailable(task_run: &str, message: impl Into<String>, source: Option<BoxError>) -> Self {
        Self::ResultUnavailable { task_run: task_run.to_owned(), message: message.into(), source }
    }

    /// The name of the task run this error is about.
    pub fn task_run(&self) -> &str {
        match self {
            Self::Failed { task_run, .. }
            | Self::TimedOut { task_run, .. }
            | Self::Crashed { task_run, .. }
            | Self::Cancelled { task_run, .. }
            | Self::NotReady { task_run, .. }
            | Self::ResultUnavailable { task_run, .. } => task_run,
        }
    }

    /// What went wrong, without the task run's name.
    pub fn message(&self) -> &str {
        match self {
            Self::Failed { message, .. }
            | Self::TimedOut { message, .. }
            | Self::Crashed { message, .. }
            | Self::Cancelled { message, .. }
            | Self::NotReady { message, .. }
            | Self::ResultUnavailable { message, .. } => message,
        }
    }
}

/// Why a flow run produced no value: what calling a `#[flow]` function returns instead.
///
/// # Examples
///
/// ```
/// use prefect::{flow, FlowError};
///
/// #[flow(timeout_seconds = 0.1)]
/// fn slow() {
///     std::thread::sleep(std::time::Duration::from_secs(1));
/// }
///
/// assert!(matches!(slow(), Err(FlowError::TimedOut { .. })));
/// ```
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The flow function returned `Err` or panicked.
    #[error("flow run '{flow_run}' of flow '{flow}' failed: {message}")]
    Failed {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// The error or panic message.
        message: String,
    },
    /// The flow function overran the flow's `timeout_seconds`.
    #[error("flow run '{flow_run}' of flow '{flow}' failed: {message}")]
    TimedOut {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// `Flow run exceeded timeout of N second(s)`.
        message: String,
        /// The timeout.
        timeout: Duration,
    },
    /// A future the flow returned belongs to a task run that did not complete.
    #[error("flow run '{flow_run}' of flow '{flow}' failed: {message}")]
    TaskFailed {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// How many returned runs did not complete, and the first one's state.
        message: String,
        /// Why the first of them produced no value.
        #[source]
        source: Box<TaskError>,
    },
    /// An option of the flow is out of range (a negative timeout, say).
    #[error("flow run '{flow_run}' of flow '{flow}' failed: {source}")]
    InvalidOptions {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// Which option, and what it must be.
        #[source]
        source: OptionsError,
    },
    /// The flow's task runner could not start: Ray is missing or unreachable, say. The
    /// source is the runner's own error type (for the Ray runner, `prefect_ray::RayError`).
    #[error("flow run '{flow_run}' of flow '{flow}' crashed: {runner} could not start: {source}")]
    RunnerStart {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// The runner's name.
        runner: String,
        /// Why, as the runner said it.
        #[source]
        source: BoxError,
    },
    /// The flow run's infrastructure failed.
    #[error("flow run '{flow_run}' of flow '{flow}' crashed: {message}")]
    Crashed {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// What went wrong.
        message: String,
    },
    /// The flow run was cancelled, for example by the Prefect server.
    #[error("flow run '{flow_run}' of flow '{flow}' was cancelled: {message}")]
    Cancelled {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// Why.
        message: String,
    },
}

impl FlowError {
    /// The flow's name.
    pub fn flow(&self) -> &str {
        match self {
            Self::Failed { flow, .. }
            | Self::TimedOut { flow, .. }
            | Self::TaskFailed { flow, .. }
            | Self::InvalidOptions { flow, .. }
            | Self::RunnerStart { flow, .. }
            | Self::Crashed { flow, .. }
            | Self::Cancelled { flow, .. } => flow,
        }
    }

    /// The flow run's name.
    pub fn flow_run(&self) -> &str {
        match self {
            Self::Failed { flow_run, .. }
            | Self::TimedOut { flow_run, .. }
            | Self::TaskFailed { flow_run, .. }
            | Self::InvalidOptions { flow_run, .. }
            | Self::RunnerStart { flow_run, .. }
            | Self::Crashed { flow_run, .. }
            | Self::Cancelled { flow_run, .. } => flow_run,
        }
    }

    /// What went wrong, without the flow run's name.
    pub fn message(&self) -> String {
        match self {
            Self::Failed { message, .. }
            | Self::TimedOut { message, .. }
            | Self::TaskFailed { message, .. }
            | Self::Crashed { message, .. }
            | Self::Cancelled { message, .. } => message.clone(),
            Self::InvalidOptions { source, .. } => source.to_string(),
            Self::RunnerStart { runner, source, .. } => format!("{runner} could not start: {source}"),
        }
    }

    /// The type of the final state the flow run ended in.
    pub fn state_type(&self) -> StateType {
        match self {
            Self::Failed { .. } | Self::TimedOut { .. } | Self::TaskFailed { .. } | Self::InvalidOptions { .. } => {
                StateType::Failed
            }
            Self::RunnerStart { .. } | Self::Crashed { .. } => StateType::Crashed,
            Self::Cancelled { .. } => StateType::Cancelled,
        }
    }

    /// The runner's start error as its own type, such as `prefect_ray::RayError`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use prefect::FlowError;
    /// fn is_io_problem(error: &FlowError) -> bool {
    ///     error.runner_error::<std::io::Error>().is_some()
    /// }
    /// ```
    pub fn runner_error<E: StdError + 'static>(&self) -> Option<&E> {
        match self {
            Self::RunnerStart { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }
}

/// An option of a task or flow that is out of range. Options written as literals in
/// `#[task]`/`#[flow]` are checked at compile time; options computed at run time (through
/// `with_options`, say) are checked when the run is created, and the run fails with this.
#[derive(Clone, Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum OptionsError {
    /// A timeout that is negative, zero, NaN or infinite.
    #[error("timeout_seconds is {0}; give a positive, finite number of seconds")]
    Timeout(f64),
    /// A retry delay that is negative, NaN or infinite.
    #[error("retry_delay_seconds has {0}; give delays of zero or more finite seconds")]
    RetryDelay(f64),
    /// A jitter factor that is negative, NaN or infinite.
    #[error("retry_jitter_factor is {0}; give a finite factor of zero or more")]
    Jitter(f64),
    /// A cache expiration that is not a positive, finite number of seconds.
    #[error("cache_expiration is {0} seconds; give a positive, finite number of seconds")]
    CacheExpiration(f64),
}

/// How one attempt of a task ended without a value. Produced by task bodies and by the
/// engine; a task run turns the last one into its `Failed` state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskFailure {
    /// One line that says what went wrong.
    pub message: String,
    /// Whether another attempt could succeed. Arguments that do not decode will not decode
    /// on a retry either, so those failures are not retried.
    pub retryable: bool,
    /// Whether the attempt overran its timeout; the run then ends `TimedOut`.
    #[serde(default)]
    pub timed_out: bool,
}

impl TaskFailure {
    /// A failure that a retry may fix: an `Err`, a panic, a timeout.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true, timed_out: false }
    }

    /// An attempt that overran its timeout.
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true, timed_out: true }
    }

    /// A failure that no retry can fix, such as arguments that do not decode.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: false, timed_out: false }
    }

    /// The failure for a task that returned `Err(error)`.
    pub fn from_error(error: &dyn std::fmt::Display) -> Self {
        Self::retryable(format!("Task run encountered an error: {error}"))
    }
}
