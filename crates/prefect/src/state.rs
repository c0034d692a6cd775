//! States of flow runs and task runs, with Prefect's names and meanings.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::results::PersistedResult;

/// The kind of a [`State`], as Prefect's API names it.
///
/// A state's *type* decides what the engine does; its *name* can be more specific
/// (`Retrying` is a `Running` state, `AwaitingRetry` a `Scheduled` one, `NotReady` a `Pending` one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StateType {
    /// Waiting for a time to start: a task run waiting to be retried.
    Scheduled,
    /// Created, waiting for its inputs or for a worker.
    Pending,
    /// Executing now.
    Running,
    /// Finished and returned a value.
    Completed,
    /// Finished with an error: the code returned `Err`, panicked, or timed out.
    Failed,
    /// Stopped on request before it finished.
    Cancelled,
    /// Stopped by something outside the code: the process or machine running it died.
    Crashed,
}

impl StateType {
    /// Whether a run in a state of this type has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled | Self::Crashed)
    }

    /// Prefect's default name for a state of this type: `Completed`, `Failed`, ...
    pub fn default_name(self) -> &'static str {
        match self {
            Self::Scheduled => "Scheduled",
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::Crashed => "Crashed",
        }
    }

    /// The name Prefect's REST API uses: `COMPLETED`, `FAILED`, ...
    pub fn api_name(self) -> &'static str {
        match self {
            Self::Scheduled => "SCHEDULED",
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Crashed => "CRASHED",
        }
    }
}

/// The state of a flow run or task run at one moment: its type, a name, an optional message
/// and the time it was entered.
///
/// # Examples
///
/// ```
/// use prefect::{State, StateType};
///
/// let state = State::failed("boom");
/// assert_eq!(state.state_type, StateType::Failed);
/// assert_eq!(state.to_string(), "Failed('boom')");
/// assert_eq!(State::retrying().to_string(), "Retrying(type=RUNNING)");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// What the state means to the engine.
    pub state_type: StateType,
    /// The name shown in logs and in the UI: borrowed for the usual names, so a map of
    /// millions does not store "Completed" a million times.
    pub name: Cow<'static, str>,
    /// Why the run is in this state, for failures in particular.
    pub message: Option<String>,
    /// When the run entered this state.
    pub timestamp: DateTime<Utc>,
    /// For a `Scheduled` state: when the run is due to start.
    pub scheduled_time: Option<DateTime<Utc>>,
    /// For a `Completed` state: where the run's value was persisted, if it was. Boxed: few
    /// runs persist, and every run keeps its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persisted: Option<Box<PersistedResult>>,
}

impl State {
    /// A state of the given type with its default name and no message, entered now.
    pub fn new(state_type: StateType) -> Self {
        Self {
            state_type,
            name: Cow::Borrowed(state_type.default_name()),
            message: None,
            timestamp: Utc::now(),
            scheduled_time: None,
            persisted: None,
        }
    }

    /// The same state with a message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The same state with another name.
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// `Scheduled`: due at `at`.
    pub fn scheduled(at: DateTime<Utc>) -> Self {
        let mut state = Self::new(StateType::Scheduled);
        state.scheduled_time = Some(at);
        state
    }

    /// `AwaitingRetry`: a `Scheduled` state for the next attempt of a failed task run.
    pub fn awaiting_retry(at: DateTime<Utc>) -> Self {
        Self::scheduled(at).named("AwaitingRetry")
    }

    /// `Pending`: created, not started.
    pub fn pending() -> Self {
        Self::new(StateType::Pending)
    }

    /// `NotReady`: a `Pending` state that will not run because an upstream run did not complete.
    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::pending().named("NotReady").with_message(message)
    }

    /// `Running`.
    pub fn running() -> Self {
        Self::new(StateType::Running)
    }

    /// `Retrying`: a `Running` state for an attempt after the first.
    pub fn retrying() -> Self {
        Self::running().named("Retrying")
    }

    /// `Completed`.
    pub fn completed() -> Self {
        Self::new(StateType::Completed)
    }

    /// `Cached`: a `Completed` state for a run that did not run, because a value was stored
    /// under its cache key.
    pub fn cached(persisted: PersistedResult) -> Self {
        Self::completed().named("Cached").with_persisted(persisted)
    }

    /// The same state, saying where the run's value was persisted.
    pub fn with_persisted(mut self, persisted: PersistedResult) -> Self {
        self.persisted = Some(Box::new(persisted));
        self
    }

    /// `Failed`, with the reason.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(StateType::Failed).with_message(message)
    }

    /// `TimedOut`: a `Failed` state for a run that overran its timeout.
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::failed(message).named(TIMED_OUT)
    }

    /// `Crashed`, with the reason.
    pub fn crashed(message: impl Into<String>) -> Self {
        Self::new(StateType::Crashed).with_message(message)
    }

    /// `Cancelled`, with the reason.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(StateType::Cancelled).with_message(message)
    }

    /// Whether the run has ended for good in this state.
    pub fn is_final(&self) -> bool {
        self.state_type.is_final()
    }

    /// Whether this is a `Completed` state.
    pub fn is_completed(&self) -> bool {
        self.state_type == StateType::Completed
    }

    /// Whether this is a `Failed` state.
    pub fn is_failed(&self) -> bool {
        self.state_type == StateType::Failed
    }

    /// Whether this is a `Crashed` state.
    pub fn is_crashed(&self) -> bool {
        self.state_type == StateType::Crashed
    }

    /// Whether this is a `Cancelled` state.
    pub fn is_cancelled(&self) -> bool {
        self.state_type == StateType::Cancelled
    }

    /// Whether this is a `Pending` state.
    pub fn is_pending(&self) -> bool {
        self.state_type == StateType::Pending
    }

    /// Whether this is a `Running` state.
    pub fn is_running(&self) -> bool {
        self.state_type == StateType::Running
    }

    /// Whether this is a `Scheduled` state.
    pub fn is_scheduled(&self) -> bool {
        self.state_type == StateType::Scheduled
    }

    /// Whether this is a `TimedOut` state: a `Failed` one for a run that overran its timeout.
    pub fn is_timed_out(&self) -> bool {
        self.state_type == StateType::Failed && self.name == TIMED_OUT
    }
}

/// The name of a `Failed` state for a run that overran its timeout.
const TIMED_OUT: &str = "TimedOut";

/// Prefect's notation: `Completed()`, `Failed('boom')`, `Retrying(type=RUNNING)`.
impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        let mut parts = Vec::new();
        if let Some(message) = self.message.as_deref().filter(|m| !m.is_empty()) {
            parts.push(python_repr(message));
        }
        if !self.name.eq_ignore_ascii_case(self.state_type.default_name()) {
            parts.push(format!("type={}", self.state_type.api_name()));
        }
        write!(f, "{})", parts.join(", "))
    }
}

/// A string as Python's `repr` shows it, as Prefect's state notation does.
fn python_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_follows_prefect_notation() {
        assert_eq!(State::completed().to_string(), "Completed()");
        assert_eq!(State::failed("it's bad").to_string(), "Failed(\"it's bad\")");
        assert_eq!(State::failed("it's \"bad\"").to_string(), "Failed('it\\'s \"bad\"')");
        assert_eq!(State::timed_out("slow").to_string(), "TimedOut('slow', type=FAILED)");
        assert_eq!(State::not_ready("upstream failed").to_string(), "NotReady('upstream failed', type=PENDING)");
    }

    #[test]
    fn only_terminal_types_are_final() {
        let finals: Vec<_> = [
            StateType::Scheduled,
            StateType::Pending,
            StateType::Running,
            StateType::Completed,
            StateType::Failed,
            StateType::Cancelled,
            StateType::Crashed,
        ]
        .into_iter()
        .filter(|t| t.is_final())
        .collect();
        assert_eq!(finals, [StateType::Completed, StateType::Failed, StateType::Cancelled, StateType::Crashed]);
    }

    #[test]
    fn states_round_trip_through_serde_with_api_type_names() {
        let state = State::awaiting_retry(Utc::now());
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["state_type"], "SCHEDULED");
        let back: State = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
    }
}
