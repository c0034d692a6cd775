//! Errors that flows and task runs hand back to the caller.

use thiserror::Error;

use crate::state::{State, StateType};

/// Why a task run produced no value: what [`PrefectFuture::result`](crate::PrefectFuture::result)
/// and a direct task call return instead of the task's value.
///
/// Every message names the task run, so a log line alone tells which run went wrong.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum TaskError {
    /// The task returned `Err`, panicked or timed out, and had no retries left.
    #[error("task run '{task_run}' failed: {message}")]
    Failed {
        /// The task run's name.
        task_run: String,
        /// The error, panic message or timeout.
        message: String,
    },
    /// The process or Ray worker running the task died before it finished.
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
    /// The task completed, but its stored result could not be read back.
    #[error("task run '{task_run}' completed, but its result could not be read: {message}")]
    ResultUnavailable {
        /// The task run's name.
        task_run: String,
        /// What went wrong while fetching or decoding the result.
        message: String,
    },
}

impl TaskError {
    /// The error a task run in `state` stands for, or `None` for a `Completed` state.
    pub fn from_state(task_run: &str, state: &State) -> Option<Self> {
        let task_run = task_run.to_owned();
        let message = state.message.clone().unwrap_or_else(|| state.name.clone());
        Some(match state.state_type {
            StateType::Completed => return None,
            StateType::Failed => Self::Failed { task_run, message },
            StateType::Crashed => Self::Crashed { task_run, message },
            StateType::Cancelled => Self::Cancelled { task_run, message },
            StateType::Pending | StateType::Scheduled | StateType::Running => Self::NotReady { task_run, message },
        })
    }

    /// The name of the task run this error is about.
    pub fn task_run(&self) -> &str {
        match self {
            Self::Failed { task_run, .. }
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
            | Self::Crashed { message, .. }
            | Self::Cancelled { message, .. }
            | Self::NotReady { message, .. }
            | Self::ResultUnavailable { message, .. } => message,
        }
    }
}

/// Why a flow run produced no value: what calling a `#[flow]` function returns instead.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum FlowError {
    /// The flow function returned `Err`, panicked, timed out, or returned a failed future.
    #[error("flow run '{flow_run}' of flow '{flow}' failed: {message}")]
    Failed {
        /// The flow's name.
        flow: String,
        /// The flow run's name.
        flow_run: String,
        /// What failed.
        message: String,
    },
    /// The flow could not run: its task runner did not start, or its infrastructure died.
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
    /// What went wrong, without the flow run's name.
    pub fn message(&self) -> &str {
        match self {
            Self::Failed { message, .. } | Self::Crashed { message, .. } | Self::Cancelled { message, .. } => message,
        }
    }
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
