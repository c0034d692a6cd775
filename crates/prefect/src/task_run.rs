//! The record of one task run: a read-only view for futures and user code, and one write
//! handle for the runner that executes it.
//!
//! "Every submitted run ends exactly once" holds by construction: the only way to write a
//! run's states is its [`TaskRunWriter`], which is not `Clone`, which the engine creates once
//! per run and hands to the runner, and whose [`finish`](TaskRunWriter::finish) consumes it.
//! A writer dropped without finishing (a runner bug, a thread that panicked, a queue dropped
//! with the process that served it) ends its run `Crashed`, naming the runner, so nobody
//! waits forever for a run that nobody holds.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::TaskError;
use crate::observe::{self, TaskRunInfo};
use crate::registry::TaskDefinition;
use crate::state::State;

/// A task run's value in serialized form, where the runner keeps it.
#[derive(Clone)]
pub enum ResultData {
    /// In this process.
    Inline(Arc<Vec<u8>>),
    /// Somewhere else (a Ray object store, say), fetched when someone asks.
    Remote(Arc<dyn RemoteResult>),
}

impl fmt::Debug for ResultData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(bytes) => f.debug_tuple("Inline").field(&format_args!("{} bytes", bytes.len())).finish(),
            Self::Remote(_) => f.write_str("Remote"),
        }
    }
}

/// A result kept outside this process by a runner.
pub trait RemoteResult: Send + Sync {
    /// Brings the serialized value into this process.
    ///
    /// # Errors
    ///
    /// If the value can no longer be reached, in one line that says why.
    fn fetch(&self) -> Result<Vec<u8>, String>;
}

type Callback = Box<dyn FnOnce(&TaskRun) + Send>;

struct Progress {
    state: State,
    finished: bool,
    result: Option<ResultData>,
    run_count: u32,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    callbacks: Vec<Callback>,
    wakers: Vec<Waker>,
    runner_data: Option<Arc<dyn Any + Send + Sync>>,
    /// The run's span while it is in use; none before (a map's runs waiting their turn
    /// would hold a subscriber's record each) and none once the run has ended. Boxed, so
    /// the many runs without one keep a pointer's room for it, not a span's.
    span: Option<Box<tracing::Span>>,
}

struct Inner {
    info: TaskRunInfo,
    /// How many `PrefectFuture`s refer to the run: a flow's returned futures are those
    /// still alive once its function has returned.
    futures: AtomicUsize,
    task: &'static TaskDefinition,
    /// The flow run's span, the parent of this run's.
    parent: Arc<tracing::Span>,
    progress: Mutex<Progress>,
    finished: Condvar,
}

/// A read-only view of one task run: its identity, its state, and a way to wait for it.
///
/// Futures, user code and runners looking at the runs a run depends on all get this view;
/// only the run's [`TaskRunWriter`] changes it. Cloning is cheap: every clone is the same run.
#[derive(Clone)]
pub struct TaskRun(Arc<Inner>);

impl fmt::Debug for TaskRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskRun").field("name", &self.name()).field("state", &self.state()).finish()
    }
}

impl TaskRun {
    /// The task run's id.
    pub fn id(&self) -> Uuid {
        self.0.info.id
    }

    /// The task run's name, such as `shout-3f2`.
    pub fn name(&self) -> &str {
        &self.0.info.name
    }

    /// What the engine reports about this run: ids, keys, tags, inputs.
    pub fn info(&self) -> &TaskRunInfo {
        &self.0.info
    }

    /// The task this is a run of.
    pub fn task(&self) -> &'static TaskDefinition {
        self.0.task
    }

    /// The `task_run` tracing span: events inside it are attributed to this run. It is made
    /// when first asked for and kept until the run ends, so that runs waiting their turn by
    /// the million hold none.
    pub fn span(&self) -> tracing::Span {
        if let Some(span) = &self.progress().span {
            return (**span).clone();
        }
        // Made outside the lock: a subscriber may look at anything while it records a span.
        let made =
            tracing::info_span!(parent: &*self.0.parent, "task_run", name = %self.0.info.name, id = %self.0.info.id);
        let mut progress = self.progress();
        if progress.finished {
            return made;
        }
        (**progress.span.get_or_insert_with(|| Box::new(made))).clone()
    }

    /// The run's current state.
    pub fn state(&self) -> State {
        self.progress().state.clone()
    }

    /// How many times the run has started running (1 + the retries it used).
    pub fn run_count(&self) -> u32 {
        self.progress().run_count
    }

    /// When the run first started running and when it finished, once known.
    pub fn times(&self) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let progress = self.progress();
        (progress.start_time, progress.end_time)
    }

    /// Whether the run has finished, in any final state.
    pub fn is_finished(&self) -> bool {
        self.progress().finished
    }

    /// Runs `callback` once the run has finished: now, if it already has. The callback runs
    /// on the thread that finishes the run; it must be quick and must not panic.
    pub fn on_finish(&self, callback: impl FnOnce(&TaskRun) + Send + 'static) {
        {
            let mut progress = self.progress();
            if !progress.finished {
                progress.callbacks.push(Box::new(callback));
                return;
            }
        }
        callback(self);
    }

    /// Waits until the run has finished or `timeout` has passed; returns whether it finished.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut progress = self.progress();
        while !progress.finished {
            progress = match deadline {
                None => self.0.finished.wait(progress).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    self.0.finished.wait_timeout(progress, deadline - now).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
        true
    }

    /// The run's serialized value once it has completed, fetched into this process if a
    /// runner keeps it elsewhere. Blocks until the run finishes.
    ///
    /// # Errors
    ///
    /// If the run did not complete, or its value cannot be fetched.
    pub fn result_bytes(&self) -> Result<Arc<Vec<u8>>, TaskError> {
        self.wait(None);
        let (state, result) = {
            let progress = self.progress();
            (progress.state.clone(), progress.result.clone())
        };
        if let Some(error) = TaskError::from_state(self.name(), &state) {
            return Err(error);
        }
        match result {
            Some(ResultData::Inline(bytes)) => Ok(bytes),
            Some(ResultData::Remote(remote)) => {
                let bytes = Arc::new(
                    remote.fetch().map_err(|message| TaskError::result_unavailable(self.name(), message, None))?,
                );
                self.progress().result = Some(ResultData::Inline(bytes.clone()));
                Ok(bytes)
            }
            None => Err(TaskError::result_unavailable(self.name(), "its runner kept no value", None)),
        }
    }

    /// Where the runner keeps the value, once the run has completed.
    pub fn result_data(&self) -> Option<ResultData> {
        self.progress().result.clone()
    }

    /// The runner's own handle for this run (such as the Ray object that will hold its
    /// value), if its writer stored one of type `T`.
    pub fn runner_data<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.progress().runner_data.clone()?.downcast::<T>().ok()
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.0.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a waker to wake when the run finishes; returns whether it already has.
    pub(crate) fn poll_finished(&self, waker: &Waker) -> bool {
        let mut progress = self.progress();
        if !progress.finished {
            if !progress.wakers.iter().any(|w| w.will_wake(waker)) {
                progress.wakers.push(waker.clone());
            }
            return false;
        }
        true
    }

    /// Brings a value a runner keeps elsewhere into this process, so it outlives the runner.
    pub(crate) fn materialize(&self) {
        if matches!(self.result_data(), Some(ResultData::Remote(_))) {
            let _ = self.result_bytes();
        }
    }

    /// Counts a new `PrefectFuture` of this run.
    pub(crate) fn future_created(&self) {
        self.0.futures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a dropped `PrefectFuture` of this run.
    pub(crate) fn future_dropped(&self) {
        self.0.futures.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether some `PrefectFuture` still refers to this run.
    pub(crate) fn has_futures(&self) -> bool {
        self.0.futures.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn downgrade(&self) -> WeakTaskRun {
        WeakTaskRun(Arc::downgrade(&self.0))
    }

    /// Enters an intermediate state; for the engine's own execution loop, which runs on
    /// behalf of the run's writer.
    pub(crate) fn enter_state(&self, state: State) {
        {
            let mut progress = self.progress();
            if progress.finished {
                return;
            }
            if state.is_running() {
                progress.run_count += 1;
                progress.start_time.get_or_insert(state.timestamp);
            }
            progress.state = state.clone();
        }
        let span = self.span();
        let _entered = span.enter();
        tracing::debug!(target: "prefect::task_run", "Entered state {state}");
        observe::task_run_state(&self.0.info, &state);
    }

    fn end(&self, state: State, result: Option<ResultData>) {
        let (callbacks, wakers) = {
            let mut progress = self.progress();
            if progress.finished {
                return;
            }
            progress.finished = true;
            if progress.start_time.is_some() {
                progress.end_time = Some(state.timestamp);
            }
            progress.state = state.clone();
            progress.result = result;
            (std::mem::take(&mut progress.callbacks), std::mem::take(&mut progress.wakers))
        };
        let span = self.span();
        {
            let _entered = span.enter();
            if state.is_completed() {
                tracing::info!(target: "prefect::task_run", "Finished in state {state}");
            } else {
                tracing::error!(target: "prefect::task_run", "Finished in state {state}");
            }
        }
        observe::task_run_state(&self.0.info, &state);
        {
            // Before anyone waiting wakes: `.result()` returns after the hooks ran.
            let _entered = span.enter();
            crate::hooks::call_each(self.0.task.hooks.for_state(&state), |hook| hook(self, &state));
        }
        // Ended, the run needs its span no more (whoever holds a clone keeps it alive).
        let kept = self.progress().span.take();
        drop((kept, span));
        self.0.finished.notify_all();
        wakers.into_iter().for_each(Waker::wake);
        for callback in callbacks {
            callback(self);
        }
    }
}

/// The one handle that writes a task run's states: the engine creates it with the run and
/// hands it to the runner that executes the run (inside its
/// [`TaskRunSpec`](crate::runner::TaskRunSpec)).
///
/// The runner reports each intermediate state with [`set_state`](Self::set_state) and ends
/// the run with [`finish`](Self::finish), which consumes the writer, so a run ends exactly
/// once. Everything else (logging, reporting to a Prefect server, waking waiters, starting
/// dependent runs) follows from those calls. A writer dropped without `finish` ends its run
/// `Crashed`, with a message that names the runner.
///
/// It dereferences to the run's read-only [`TaskRun`] view.
pub struct TaskRunWriter {
    run: TaskRun,
    runner: Arc<str>,
    /// Set by `finish`, so `Drop` knows it has nothing to do.
    ended: bool,
}

impl fmt::Debug for TaskRunWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskRunWriter").field("run", &self.run).field("runner", &self.runner).finish()
    }
}

impl std::ops::Deref for TaskRunWriter {
    type Target = TaskRun;

    fn deref(&self) -> &TaskRun {
        &self.run
    }
}

impl TaskRunWriter {
    /// A new run in state `Pending`, executed by the runner called `runner`.
    pub(crate) fn new(
        info: TaskRunInfo,
        task: &'static TaskDefinition,
        parent: &Arc<tracing::Span>,
        runner: Arc<str>,
    ) -> Self {
        let state = State::pending();
        observe::task_run_created(&info, &state);
        let run = TaskRun(Arc::new(Inner {
            info,
            futures: AtomicUsize::new(0),
            task,
            parent: parent.clone(),
            progress: Mutex::new(Progress {
                state,
                finished: false,
                result: None,
                run_count: 0,
                start_time: None,
                end_time: None,
                callbacks: Vec::new(),
                wakers: Vec::new(),
                runner_data: None,
                span: None,
            }),
            finished: Condvar::new(),
        }));
        Self { run, runner, ended: false }
    }

    /// The run's read-only view, to keep after the writer is gone.
    pub fn run(&self) -> &TaskRun {
        &self.run
    }

    /// Moves the run to an intermediate state (`Running`, `AwaitingRetry`, ...). A final
    /// state belongs in [`finish`](Self::finish): given here, it is ignored with a warning.
    pub fn set_state(&self, state: State) {
        if state.is_final() {
            let span = self.run.span();
            let _entered = span.enter();
            tracing::warn!(target: "prefect::task_run", "{} reported the final state {state} as an intermediate one; ignored", self.runner);
            return;
        }
        self.run.enter_state(state);
    }

    /// Stores the runner's own handle for this run, such as the Ray object that will hold
    /// its value, so a dependent run submitted to the same runner can refer to it.
    pub fn set_runner_data(&self, data: Arc<dyn Any + Send + Sync>) {
        self.run.progress().runner_data = Some(data);
    }

    /// Forgets the runner's handle stored with [`set_runner_data`](Self::set_runner_data):
    /// for a run whose value the runner no longer needs to keep (it came into this process
    /// with the run's report), so that a dependent run takes it from here and the runner can
    /// let its copy go.
    pub fn clear_runner_data(&self) {
        let data = self.run.progress().runner_data.take();
        // Dropped outside the lock: a handle may tell its runner when it goes.
        drop(data);
    }

    /// Ends the run in `state` (a final state, or `NotReady` for a run that never ran
    /// because an upstream run did not complete), with its value for a completed run: logs
    /// the state, wakes everyone waiting, and starts dependent runs.
    pub fn finish(mut self, state: State, result: Option<ResultData>) {
        self.ended = true;
        self.run.end(state, result);
    }

    /// Ends the run `Crashed`: its infrastructure failed for `reason`.
    pub fn crash(self, reason: impl Into<String>) {
        self.finish(State::crashed(reason), None);
    }
}

impl Drop for TaskRunWriter {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let why = if std::thread::panicking() {
            "a panic unwound the thread that held it"
        } else {
            "it was dropped without a final state"
        };
        let message = format!("{} lost the task run before it ended: {why}", self.runner);
        self.run.end(State::crashed(message), None);
    }
}

/// A task run that the engine tracks without keeping it alive.
pub(crate) struct WeakTaskRun(Weak<Inner>);

impl WeakTaskRun {
    pub(crate) fn upgrade(&self) -> Option<TaskRun> {
        self.0.upgrade().map(TaskRun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TaskBody;

    static NOOP: TaskDefinition = TaskDefinition {
        name: "noop",
        key: "tests::noop",
        fingerprint: "0",
        task_key: "tests::noop-0",
        parameters: &[],
        options: crate::options::TaskOptions::default,
        run_name: None,
        body: TaskBody::Sync(|_| Ok(Vec::new())),
        hooks: crate::hooks::StateHooks::NONE,
        retry_condition: None,
        cache_key_fn: None,
    };

    fn writer() -> TaskRunWriter {
        let info = TaskRunInfo {
            id: Uuid::new_v4(),
            name: "noop-abc".into(),
            task_name: "noop",
            task_key: "tests::noop",
            dynamic_key: 0,
            flow_run_id: None,
            tags: Vec::new(),
            inputs: Vec::new(),
            retries: 0,
            retry_delay_seconds: Vec::new(),
            created: Utc::now(),
        };
        TaskRunWriter::new(info, &NOOP, &Arc::new(tracing::Span::none()), "TestRunner".into())
    }

    #[test]
    fn a_dropped_writer_crashes_its_run_naming_the_runner() {
        let writer = writer();
        let run = writer.run().clone();
        drop(writer);
        let state = run.state();
        assert!(state.is_crashed(), "{state}");
        assert_eq!(
            state.message.as_deref(),
            Some("TestRunner lost the task run before it ended: it was dropped without a final state")
        );
    }

    #[test]
    fn a_writer_dropped_by_a_panic_says_so() {
        let writer = writer();
        let run = writer.run().clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = writer;
            panic!("runner thread died");
        }));
        assert!(outcome.is_err());
        assert!(run.state().message.unwrap().contains("a panic unwound the thread that held it"));
    }

    #[test]
    fn a_run_holds_its_span_only_from_first_use_to_its_end() {
        let writer = writer();
        let run = writer.run().clone();
        assert!(run.progress().span.is_none(), "a pending run holds no span");
        writer.set_state(State::running());
        assert!(run.progress().span.is_some(), "a running run keeps the one it logged in");
        writer.finish(State::completed(), None);
        assert!(run.progress().span.is_none(), "an ended run lets it go");
    }

    #[test]
    fn a_final_state_given_as_intermediate_is_ignored() {
        let writer = writer();
        writer.set_state(State::completed());
        assert!(!writer.is_finished());
        writer.finish(State::completed(), None);
    }
}
