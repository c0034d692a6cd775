//! State hooks: plain functions that a task or a flow calls when one of its runs reaches a
//! final state, like Prefect's `on_completion`, `on_failure`, `on_crashed` and
//! `on_cancellation`.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! static FAILURES: AtomicUsize = AtomicUsize::new(0);
//!
//! fn count_failure(_run: &prefect::TaskRun, state: &prefect::State) {
//!     assert!(state.is_failed());
//!     FAILURES.fetch_add(1, Ordering::SeqCst);
//! }
//!
//! #[prefect::task(on_failure = [count_failure])]
//! fn refuse() -> Result<(), String> {
//!     Err("no".into())
//! }
//!
//! #[prefect::flow]
//! fn refusing() {
//!     refuse.submit().wait(None);
//! }
//!
//! refusing().unwrap();
//! assert_eq!(FAILURES.load(Ordering::SeqCst), 1);
//! ```
//!
//! A run ends exactly once, so each of its hooks for that final state runs exactly once: a
//! task run's hooks as the run ends, before anyone waiting for it wakes (so `.result()`
//! returns after them); a flow run's once its final state is entered. They run in the
//! program: a task run on Ray has its hooks called in the program when its final state
//! arrives there, not on the worker. A hook that panics is logged and does not change the
//! run's state. `NotReady` (a run that never ran because an upstream run failed) calls no
//! hook; `TimedOut` is a failure.

use crate::observe::FlowRunInfo;
use crate::state::{State, StateType};
use crate::task_run::TaskRun;

/// A task's state hook: the run, and the final state it entered.
pub type TaskHook = fn(&TaskRun, &State);

/// A flow's state hook: the flow run, and the final state it entered.
pub type FlowHook = fn(&FlowRunInfo, &State);

/// Whether a failed attempt of a task is worth a retry: given the `Failed` state the
/// attempt would end the run in (its message is the task's error), `true` retries it (if
/// retries are left). `#[task(retries = 3, retry_condition_fn = is_transient)]`. It runs
/// where the attempt ran: on Ray, in the executor on the worker. A panic counts as `false`.
pub type RetryCondition = fn(&State) -> bool;

/// The hooks of a task or flow, per final state.
#[derive(Debug)]
pub struct StateHooks<H: 'static> {
    /// Called for `Completed`.
    pub on_completion: &'static [H],
    /// Called for `Failed` (including `TimedOut`).
    pub on_failure: &'static [H],
    /// Called for `Crashed`.
    pub on_crashed: &'static [H],
    /// Called for `Cancelled`.
    pub on_cancellation: &'static [H],
}

impl<H> StateHooks<H> {
    /// No hooks.
    pub const NONE: Self = Self { on_completion: &[], on_failure: &[], on_crashed: &[], on_cancellation: &[] };

    /// The hooks for `state`.
    pub fn for_state(&self, state: &State) -> &'static [H] {
        match state.state_type {
            StateType::Completed => self.on_completion,
            StateType::Failed => self.on_failure,
            StateType::Crashed => self.on_crashed,
            StateType::Cancelled => self.on_cancellation,
            _ => &[],
        }
    }
}

/// Calls each hook; a panic in one is logged, and the others still run.
pub(crate) fn call_each<H>(hooks: &[H], call: impl Fn(&H)) {
    for hook in hooks {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(hook))) {
            let message = crate::panic::panic_message(panic);
            tracing::error!(target: "prefect::hooks", "A state hook panicked: {message}");
        }
    }
}
