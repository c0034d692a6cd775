//! Runs a task's attempts in this process: retries, delays, timeouts, panics.
//!
//! The same loop runs a task on a thread-pool worker, in a direct call, and in a Ray
//! executor on another machine, so a task behaves the same wherever it runs.

use std::any::Any;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Once, OnceLock, mpsc};
use std::time::Duration;

use chrono::Utc;
use tracing::{Instrument, Span};

use crate::args::assemble;
use crate::error::TaskFailure;
use crate::options::TaskOptions;
use crate::registry::{TaskBody, TaskDefinition};
use crate::runner::TaskRunSpec;
use crate::state::State;
use crate::task_run::ResultData;

/// How a task run ended after all its attempts.
#[derive(Debug)]
pub struct Execution {
    /// `Completed`, or `Failed` with the last attempt's error.
    pub state: State,
    /// The serialized value, for a completed run.
    pub result: Option<Vec<u8>>,
}

/// Executes a task run on this thread once its dependencies have finished, and finishes its
/// handle: the whole job of a runner that executes in this process.
pub fn run_here(spec: &TaskRunSpec) {
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
    let args = assemble(&spec.args, &slices);
    let execution =
        execute(spec.run.task(), &args, &spec.options, spec.run.span(), &mut |state| spec.run.set_state(state));
    spec.run.finish(execution.state, execution.result.map(|bytes| ResultData::Inline(Arc::new(bytes))));
}

/// Runs every attempt of a task run on this thread, reporting each intermediate state
/// (`Running`, `AwaitingRetry`, `Retrying`) through `report`; returns the final one.
///
/// A sync task runs on this thread, or, when it has a timeout, on a thread of its own that
/// is abandoned if it overruns: Rust cannot stop a thread, so it runs on until its code
/// returns, and its value is dropped. An async task runs on the engine's tokio runtime and
/// is cancelled (dropped at its next `.await`) when it overruns.
pub fn execute(
    task: &'static TaskDefinition,
    args: &[Cow<'_, [u8]>],
    options: &TaskOptions,
    span: &Span,
    report: &mut dyn FnMut(State),
) -> Execution {
    install_panic_hook();
    let borrowed: Vec<&[u8]> = args.iter().map(|arg| arg.as_ref()).collect();
    // An attempt on a thread of its own (one with a timeout) needs arguments it can keep.
    let mut owned: Option<Arc<Vec<Vec<u8>>>> = None;
    let mut retries = Retries::new(options);
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
            Next::Done(execution) => return execution,
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
pub async fn execute_async(
    task: &'static TaskDefinition,
    args: Vec<Vec<u8>>,
    options: TaskOptions,
    span: Span,
    mut report: impl FnMut(State) + Send + 'static,
) -> Execution {
    install_panic_hook();
    let args = Arc::new(args);
    let job = async move {
        let mut retries = Retries::new(&options);
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
                Next::Done(execution) => return execution,
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

enum Next {
    Done(Execution),
    Retry(Duration),
}

/// Counts retries and decides what follows an attempt.
struct Retries<'a> {
    options: &'a TaskOptions,
    used: u32,
}

impl<'a> Retries<'a> {
    fn new(options: &'a TaskOptions) -> Self {
        Self { options, used: 0 }
    }

    fn after(&mut self, outcome: Result<Vec<u8>, TaskFailure>, span: &Span) -> Next {
        let _entered = span.enter();
        match outcome {
            Ok(bytes) => Next::Done(Execution { state: State::completed(), result: Some(bytes) }),
            Err(failure) if failure.retryable && self.used < self.options.retries => {
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
pub fn timeout_message(limit: Duration) -> String {
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
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("prefect-async")
            .build()
            .expect("the engine could not start its tokio runtime")
    })
}

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Routes panics inside tasks to the task run's state instead of stderr; other panics go
/// to the hook that was installed before.
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_TASK.with(Cell::get) {
                let message = payload_message(info.payload());
                let located = match info.location() {
                    Some(at) => {
                        format!("{message} (at {}:{}:{})", at.file(), at.line(), at.column())
                    }
                    None => message,
                };
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(located));
            } else {
                previous(info);
            }
        }));
    });
}

/// Marks this thread as running task code until dropped, also when a panic unwinds.
pub(crate) struct InTask(bool);

impl InTask {
    pub(crate) fn enter() -> Self {
        Self(IN_TASK.with(|flag| flag.replace(true)))
    }
}

impl Drop for InTask {
    fn drop(&mut self) {
        IN_TASK.with(|flag| flag.set(self.0));
    }
}

fn catch_task_panic(body: impl FnOnce() -> Result<Vec<u8>, TaskFailure>) -> Result<Vec<u8>, TaskFailure> {
    catch_panic(body).unwrap_or_else(|message| Err(TaskFailure::retryable(format!("Task run panicked: {message}"))))
}

/// Runs `body`, turning a panic into its message and location instead of printing it.
pub fn catch_panic<T>(body: impl FnOnce() -> T) -> Result<T, String> {
    install_panic_hook();
    let outcome = {
        let _in_task = InTask::enter();
        panic::catch_unwind(AssertUnwindSafe(body))
    };
    outcome.map_err(panic_message)
}

/// The message of a panic caught on this thread, with its location when the hook saw it.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    LAST_PANIC.with(|last| last.borrow_mut().take()).unwrap_or_else(|| payload_message(payload.as_ref()))
}

fn panic_failure(payload: Box<dyn Any + Send>) -> TaskFailure {
    TaskFailure::retryable(format!("Task run panicked: {}", panic_message(payload)))
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with a non-text payload".to_owned()
    }
}

/// Marks the thread as running task code while the future is polled, so the panic hook
/// attributes a panic to the task.
pub(crate) struct PanicAware<F>(pub(crate) F);

impl<F: std::future::Future + Unpin> std::future::Future for PanicAware<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let _in_task = InTask::enter();
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}
