//! The record of one task run, shared by the engine, its runner and its futures.

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

/// A result kept outside this process by a runner.
pub trait RemoteResult: Send + Sync {
    /// Brings the serialized value into this process.
    ///
    /// # Errors
    ///
    /// If the value can no longer be reached, in one line that says why.
    fn fetch(&self) -> Result<Vec<u8>, String>;
}

type Callback = Box<dyn FnOnce(&TaskRunHandle) + Send>;

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
}

struct TaskRun {
    info: TaskRunInfo,
    /// How many `PrefectFuture`s refer to the run: a flow's returned futures are those
    /// still alive once its function has returned.
    futures: AtomicUsize,
    task: &'static TaskDefinition,
    span: tracing::Span,
    progress: Mutex<Progress>,
    finished: Condvar,
}

/// A shared handle to one task run: the engine creates it, the runner reports the run's
/// states into it, and futures wait on it.
///
/// A runner calls [`set_state`](Self::set_state) for each state the run passes through and
/// [`finish`](Self::finish) once, with the final state and, for a completed run, where its
/// value is. Everything else (logging, reporting to a Prefect server, waking waiters and
/// dependent runs) follows from those two calls.
#[derive(Clone)]
pub struct TaskRunHandle(Arc<TaskRun>);

impl fmt::Debug for TaskRunHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskRun").field("name", &self.name()).field("state", &self.state()).finish()
    }
}

impl TaskRunHandle {
    pub(crate) fn new(info: TaskRunInfo, task: &'static TaskDefinition, parent: &tracing::Span) -> Self {
        let span = tracing::info_span!(parent: parent, "task_run", name = %info.name, id = %info.id);
        let state = State::pending();
        observe::task_run_created(&info, &state);
        Self(Arc::new(TaskRun {
            info,
            futures: AtomicUsize::new(0),
            task,
            span,
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
            }),
            finished: Condvar::new(),
        }))
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.0.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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

    /// The `task_run` tracing span: events inside it are attributed to this run.
    pub fn span(&self) -> &tracing::Span {
        &self.0.span
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

    /// Moves the run to an intermediate state (`Running`, `AwaitingRetry`, ...).
    /// Ignored once the run has finished.
    pub fn set_state(&self, state: State) {
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
        let _entered = self.0.span.enter();
        tracing::debug!(target: "prefect::task_run", "Entered state {state}");
        observe::task_run_state(&self.0.info, &state);
    }

    /// Ends the run in `state`, with its value for a completed run. Logs the final state,
    /// wakes everyone waiting, and starts dependent runs. Only the first call counts.
    pub fn finish(&self, state: State, result: Option<ResultData>) {
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
        {
            let _entered = self.0.span.enter();
            if state.is_completed() {
                tracing::info!(target: "prefect::task_run", "Finished in state {state}");
            } else {
                tracing::error!(target: "prefect::task_run", "Finished in state {state}");
            }
        }
        observe::task_run_state(&self.0.info, &state);
        self.0.finished.notify_all();
        wakers.into_iter().for_each(Waker::wake);
        for callback in callbacks {
            callback(self);
        }
    }

    /// Runs `callback` once the run has finished: now, if it already has.
    pub fn on_finish(&self, callback: impl FnOnce(&TaskRunHandle) + Send + 'static) {
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
                let bytes =
                    Arc::new(remote.fetch().map_err(|message| TaskError::ResultUnavailable {
                        task_run: self.name().to_owned(),
                        message,
                    })?);
                self.progress().result = Some(ResultData::Inline(bytes.clone()));
                Ok(bytes)
            }
            None => Err(TaskError::ResultUnavailable {
                task_run: self.name().to_owned(),
                message: "its runner kept no value".to_owned(),
            }),
        }
    }

    /// Where the runner keeps the value, once the run has completed.
    pub fn result_data(&self) -> Option<ResultData> {
        self.progress().result.clone()
    }

    /// Brings a value a runner keeps elsewhere into this process, so it outlives the runner.
    pub(crate) fn materialize(&self) {
        if matches!(self.result_data(), Some(ResultData::Remote(_))) {
            let _ = self.result_bytes();
        }
    }

    /// Stores the runner's own handle for this run, such as the Ray object that will hold
    /// its value, so a dependent run submitted to the same runner can refer to it.
    pub fn set_runner_data(&self, data: Arc<dyn Any + Send + Sync>) {
        self.progress().runner_data = Some(data);
    }

    /// The runner's handle stored by [`set_runner_data`](Self::set_runner_data), if it is a `T`.
    pub fn runner_data<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.progress().runner_data.clone()?.downcast::<T>().ok()
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
}

/// A task run that the engine tracks without keeping it alive.
pub(crate) struct WeakTaskRun(Weak<TaskRun>);

impl WeakTaskRun {
    pub(crate) fn upgrade(&self) -> Option<TaskRunHandle> {
        self.0.upgrade().map(TaskRunHandle)
    }
}
