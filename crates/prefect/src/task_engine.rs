//! Runs a task's attempts in this process: retries, delays, timeouts, panics.
//!
//! The same loop runs a task on a thread-pool worker, in a direct call, and in a Ray
//! executor on another machine, so a task behaves the same wherever it runs.

use std::borrow::Cow;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use chrono::Utc;
use tracing::{Instrument, Span};

use crate::error::TaskFailure;
use crate::options::TaskOptions;
use crate::panic::{PanicAware, catch_task_panic, install_panic_hook, panic_failure};
use crate::registry::{TaskBody, TaskDefinition};
use crate::results::{Keeper, ResultPlan};
use crate::runner::TaskRunSpec;
use crate::state::State;
use crate::task_run::ResultData;
use crate::wire::{Arg, assemble};

/// How a task run ended after all its attempts.
#[derive(Debug)]
pub struct Execution {
    /// `Completed`, or `Failed` with the last attempt's error.
    pub state: State,
    /// The serialized value, for a completed run.
    pub result: Option<Vec<u8>>,
}

impl Execution {
    fn refused(message: String) -> Self {
        Self { state: State::failed(message), result: None }
    }
}

/// Executes a task run on this thread once its dependencies have finished, and finishes it:
/// the whole job of a runner that executes in this process.
pub fn run_here(spec: TaskRunSpec) {
    if let Some(state) = spec.upstream_failure() {
        spec.run.finish(state, None);
        return;
    }
    let results = match spec.upstream_results() {
        Ok(results) => results,
        Err(error) => {
            spec.run.finish(State::not_ready(error.to_string()), None);
            return;
        }
    };
    let slices: Vec<&[u8]> = results.iter().map(|result| result.as_slice()).collect();
    let args = assemble(spec.args.iter().map(Arg::view), &slices);
    let execution =
        execute(spec.run.task(), &args, &spec.options, spec.results.as_ref(), &spec.run.span(), &mut |state| {
            spec.run.set_state(state)
        });
    spec.run.finish(execution.state, execution.result.map(|bytes| ResultData::Inline(Arc::new(bytes))));
}

/// [`run_here`] for async code: the run's attempts and delays run on the engine's runtime.
pub(crate) async fn run_here_async(spec: TaskRunSpec) {
    if let Some(state) = spec.upstream_failure() {
        spec.run.finish(state, None);
        return;
    }
    let results = match spec.upstream_results() {
        Ok(results) => results,
        Err(error) => {
            spec.run.finish(State::not_ready(error.to_string()), None);
            return;
        }
    };
    let slices: Vec<&[u8]> = results.iter().map(|result| result.as_slice()).collect();
    let args: Vec<Vec<u8>> =
        assemble(spec.args.iter().map(Arg::view), &slices).into_iter().map(Cow::into_owned).collect();
    let TaskRunSpec { run, options, results, .. } = spec;
    let view = run.run().clone();
    let execution =
        execute_async(run.task(), args, options, results, run.span(), move |state| view.enter_state(state)).await;
    run.finish(execution.state, execution.result.map(|bytes| ResultData::Inline(Arc::new(bytes))));
}

/// Runs every attempt of a task run on this thread, reporting each intermediate state
/// (`Running`, `AwaitingRetry`, `Retrying`) through `report`; returns the final one.
///
/// A sync task runs on this thread, or, when it has a timeout, on a thread of its own that
/// is abandoned if it overruns: Rust cannot stop a thread, so it runs on until its code
/// returns, and its value is dropped. An async task runs on the engine's tokio runtime and
/// is cancelled (dropped at its next `.await`) when it overruns. Options out of range fail
/// the run before it starts.
///
/// With a [`ResultPlan`], a value stored under the run's cache key ends the run `Cached`
/// without running it, and a new value is written to result storage from here (on Ray, from
/// the worker that made it).
pub fn execute(
    task: &'static TaskDefinition,
    args: &[Cow<'_, [u8]>],
    options: &TaskOptions,
    results: Option<&ResultPlan>,
    span: &Span,
    report: &mut dyn FnMut(State),
) -> Execution {
    if let Err(error) = options.validate() {
        return Execution::refused(format!("invalid options for task '{}': {error}", task.name));
    }
    install_panic_hook();
    let borrowed: Vec<&[u8]> = args.iter().map(|arg| arg.as_ref()).collect();
    let keeper = match before_running(task, results, &borrowed, span) {
        Before::Run(keeper) => keeper,
        Before::Done(execution) => return execution,
    };
    // An attempt on a thread of its own (one with a timeout) needs arguments it can keep.
    let mut owned: Option<Arc<Vec<Vec<u8>>>> = None;
    let mut retries = Retries::new(task, options);
    report(State::running());
    loop {
        let outcome = match (task.body, options.timeout()) {
            (TaskBody::Sync(body), None) => {
                let _entered = span.enter();
                catch_task_panic(|| body(&borrowed))
            }
            (TaskBody::Sync(body), Some(limit)) => {
                let owned = owned.get_or_insert_with(|| Arc::new(to_owned(args))).clone();
                attempt_sync_timed(body, owned, limit, span)
            }
            (TaskBody::Async(body), timeout) => {
                runtime().block_on(attempt_async(body, to_owned(args), timeout, span.clone()))
            }
        };
        match retries.after(outcome, span) {
            Next::Done(execution) => return keep(execution, keeper.as_ref(), span),
            Next::Retry(delay) => {
                report(State::awaiting_retry(Utc::now() + delay));
                std::thread::sleep(delay);
                report(State::retrying());
            }
        }
    }
}

/// [`execute`] for async code: every attempt and delay runs on the engine's runtime, so the
/// caller may await it from any executor.
pub(crate) async fn execute_async(
    task: &'static TaskDefinition,
    args: Vec<Vec<u8>>,
    options: TaskOptions,
    results: Option<ResultPlan>,
    span: Span,
    mut report: impl FnMut(State) + Send + 'static,
) -> Execution {
    if let Err(error) = options.validate() {
        return Execution::refused(format!("invalid options for task '{}': {error}", task.name));
    }
    install_panic_hook();
    let args = Arc::new(args);
    // Storage is read and written on a blocking thread: it may wait on the network.
    let (looked_up, looking_span) = (Arc::clone(&args), span.clone());
    let before = tokio::task::spawn_blocking(move || {
        let borrowed: Vec<&[u8]> = looked_up.iter().map(Vec::as_slice).collect();
        before_running(task, results.as_ref(), &borrowed, &looking_span)
    });
    let keeper = match before.await {
        Ok(Before::Run(keeper)) => keeper,
        Ok(Before::Done(execution)) => return execution,
        Err(error) => return Execution::refused(format!("the task's cached value could not be looked up: {error}")),
    };
    let job = async move {
        let mut retries = Retries::new(task, &options);
        report(State::running());
        loop {
            let outcome = match (task.body, options.timeout()) {
                (TaskBody::Sync(body), None) => {
                    let (args, span) = (args.clone(), span.clone());
                    tokio::task::spawn_blocking(move || {
                        let _entered = span.enter();
                        let borrowed: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                        catch_task_panic(|| body(&borrowed))
                    })
                    .await
                    .unwrap_or_else(|error| Err(TaskFailure::retryable(format!("task thread failed: {error}"))))
                }
                (TaskBody::Sync(body), Some(limit)) => {
                    let (args, span) = (args.clone(), span.clone());
                    tokio::task::spawn_blocking(move || attempt_sync_timed(body, args, limit, &span))
                        .await
                        .unwrap_or_else(|error| Err(TaskFailure::retryable(format!("task thread failed: {error}"))))
                }
                (TaskBody::Async(body), timeout) => {
                    attempt_async(body, args.as_ref().clone(), timeout, span.clone()).await
                }
            };
            match retries.after(outcome, &span) {
                Next::Done(execution) => {
                    let span = span.clone();
                    return tokio::task::spawn_blocking(move || keep(execution, keeper.as_ref(), &span))
                        .await
                        .unwrap_or_else(|error| {
                            Execution::refused(format!("the task's result could not be kept: {error}"))
                        });
                }
                Next::Retry(delay) => {
                    report(State::awaiting_retry(Utc::now() + delay));
                    tokio::time::sleep(delay).await;
                    report(State::retrying());
                }
            }
        }
    };
    runtime().spawn(job).await.unwrap_or_else(|error| Execution {
        state: State::crashed(format!("the task's runtime stopped: {error}")),
        result: None,
    })
}

/// What result keeping makes of a run before it runs.
enum Before {
    /// The run runs, and its value is kept after by the keeper, if any.
    Run(Option<Keeper>),
    /// The run is over: a stored value ended it `Cached`, or storage cannot be used.
    Done(Execution),
}

fn before_running(task: &'static TaskDefinition, results: Option<&ResultPlan>, args: &[&[u8]], span: &Span) -> Before {
    let Some(plan) = results else { return Before::Run(None) };
    let _entered = span.enter();
    match Keeper::new(task, plan, args) {
        Ok(keeper) => match keeper.cached() {
            Some((value, state)) => Before::Done(Execution { state, result: Some(value) }),
            None => Before::Run(Some(keeper)),
        },
        Err(error) => Before::Done(Execution::refused(format!("task '{}': {error}", task.name))),
    }
}

/// A completed execution with its value written to result storage; a failed one when the
/// value could not be written (the run's value would be lost to later runs).
fn keep(execution: Execution, keeper: Option<&Keeper>, span: &Span) -> Execution {
    let (Some(keeper), Some(value)) = (keeper, execution.result.as_deref()) else { return execution };
    if !execution.state.is_completed() {
        return execution;
    }
    let _entered = span.enter();
    match keeper.keep(value) {
        Ok(persisted) => Execution { state: execution.state.with_persisted(persisted), result: execution.result },
        Err(error) => {
            tracing::error!(target: "prefect::task_run", "{error}");
            Execution::refused(format!("the run's value could not be persisted: {error}; check the result storage"))
        }
    }
}

enum Next {
    Done(Execution),
    Retry(Duration),
}

/// Counts retries and decides what follows an attempt.
struct Retries<'a> {
    options: &'a TaskOptions,
    condition: Option<crate::hooks::RetryCondition>,
    used: u32,
}

impl<'a> Retries<'a> {
    fn new(task: &TaskDefinition, options: &'a TaskOptions) -> Self {
        Self { options, condition: task.retry_condition, used: 0 }
    }

    /// Whether the task's retry condition (if any) says the failure is worth a retry.
    fn worth_retrying(&self, failure: &TaskFailure) -> bool {
        let Some(condition) = self.condition else { return true };
        let state =
            if failure.timed_out { State::timed_out(&failure.message) } else { State::failed(&failure.message) };
        let answer = std::panic::catch_unwind(|| condition(&state)).unwrap_or(false);
        if !answer {
            tracing::info!(target: "prefect::task_run", "The task's retry condition declined a retry");
        }
        answer
    }

    fn after(&mut self, outcome: Result<Vec<u8>, TaskFailure>, span: &Span) -> Next {
        let _entered = span.enter();
        match outcome {
            Ok(bytes) => Next::Done(Execution { state: State::completed(), result: Some(bytes) }),
            Err(failure) if failure.retryable && self.used < self.options.retries && self.worth_retrying(&failure) => {
                self.used += 1;
                let delay = self.options.retry_delay(self.used);
                let when = if delay.is_zero() {
                    "immediately".to_owned()
                } else {
                    format!("{} second(s) from now", delay.as_secs_f64())
                };
                tracing::info!(
                    target: "prefect::task_run",
                    "Task run failed: {} - Retry {}/{} will start {when}",
                    failure.message,
                    self.used,
                    self.options.retries,
                );
                Next::Retry(delay)
            }
            Err(failure) => {
                if self.options.retries > 0 && failure.retryable {
                    tracing::error!(target: "prefect::task_run", "Task run failed: {} - Retries are exhausted", failure.message);
                } else {
                    tracing::error!(target: "prefect::task_run", "Task run failed: {}", failure.message);
                }
                let state =
                    if failure.timed_out { State::timed_out(failure.message) } else { State::failed(failure.message) };
                Next::Done(Execution { state, result: None })
            }
        }
    }
}

/// The message of a task run that overran its timeout.
pub(crate) fn timeout_message(limit: Duration) -> String {
    format!("Task run exceeded timeout of {} second(s)", seconds_text(limit))
}

/// Seconds as Prefect writes them (a Python float): `5.0`, `0.25`.
pub(crate) fn seconds_text(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds.fract() == 0.0 { format!("{seconds:.1}") } else { seconds.to_string() }
}

fn to_owned(args: &[Cow<'_, [u8]>]) -> Vec<Vec<u8>> {
    args.iter().map(|arg| arg.to_vec()).collect()
}

/// One attempt of a sync task on a thread of its own, abandoned if it overruns `limit`.
fn attempt_sync_timed(
    body: crate::registry::SyncBody,
    args: Arc<Vec<Vec<u8>>>,
    limit: Duration,
    span: &Span,
) -> Result<Vec<u8>, TaskFailure> {
    let (sender, receiver) = mpsc::channel();
    let span = span.clone();
    let spawned = std::thread::Builder::new().name("prefect-task".into()).spawn(move || {
        let _entered = span.enter();
        let borrowed: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let outcome = catch_task_panic(|| body(&borrowed));
        if sender.send(outcome).is_err() {
            ABANDONED.fetch_sub(1, Ordering::SeqCst);
        }
    });
    if let Err(error) = spawned {
        return Err(TaskFailure::retryable(format!("could not start a thread for the task: {error}")));
    }
    match receiver.recv_timeout(limit) {
        Ok(outcome) => outcome,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            ABANDONED.fetch_add(1, Ordering::SeqCst);
            drop(receiver);
            Err(TaskFailure::timed_out(timeout_message(limit)))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(TaskFailure::retryable("the task's thread ended without a result"))
        }
    }
}

async fn attempt_async(
    body: fn(Vec<Vec<u8>>) -> crate::registry::BodyFuture,
    args: Vec<Vec<u8>>,
    timeout: Option<Duration>,
    span: Span,
) -> Result<Vec<u8>, TaskFailure> {
    let job = async move {
        let run = PanicAware(body(args)).instrument(span);
        match timeout {
            None => run.await,
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .unwrap_or_else(|_| Err(TaskFailure::timed_out(timeout_message(limit)))),
        }
    };
    match runtime().spawn(job).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => Err(panic_failure(error.into_panic())),
        Err(error) => Err(TaskFailure::retryable(format!("the task was stopped: {error}"))),
    }
}

/// Attempts that overran their timeout and whose threads are still running.
static ABANDONED: AtomicIsize = AtomicIsize::new(0);

/// Whether threads of timed-out attempts are still running in this process. A runner that
/// owns its process (an executor) can end the process to stop them.
pub fn abandoned_attempts_running() -> bool {
    ABANDONED.load(Ordering::SeqCst) > 0
}

/// The engine's tokio runtime, for async tasks.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("prefect-async")
            .build()
            .expect("the engine could not start its tokio runtime")
    })
}
