//! Which flow run the current code belongs to.
//!
//! Like Prefect's context variables: a thread-local stack of flow runs (a subflow pushes on
//! top of its parent), carried into async flows by wrapping their futures.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll};

use crate::observe::FlowRunInfo;
use crate::runner::TaskRunner;
use crate::task_run::{TaskRun, WeakTaskRun};
use crate::thread_pool::ThreadPoolTaskRunner;

/// A flow run in progress: its runner and the task runs it created.
pub(crate) struct FlowRunContext {
    /// `None` for task runs created outside any flow.
    pub(crate) info: Option<FlowRunInfo>,
    /// Shared by the flow's task runs, each of which keeps its parent: one pointer a run,
    /// not a span's 40 bytes.
    pub(crate) span: Arc<tracing::Span>,
    pub(crate) runner: Arc<dyn TaskRunner>,
    /// The runner's name, for the messages of runs it loses.
    pub(crate) runner_name: Arc<str>,
    pub(crate) tracker: Arc<RunTracker>,
    dynamic_keys: Mutex<HashMap<&'static str, u64>>,
    /// Why the flow run was cancelled, once it is: its new task runs end `Cancelled`.
    cancelled: OnceLock<String>,
    /// The flow's `persist_result`, or its parent's: the default of its task runs.
    pub(crate) persist_result: Option<bool>,
    /// Whether the flow run is paused (from a Prefect server): new task runs wait.
    paused: Mutex<bool>,
    resumed: Condvar,
}

impl FlowRunContext {
    pub(crate) fn new(info: Option<FlowRunInfo>, span: tracing::Span, runner: Arc<dyn TaskRunner>) -> Self {
        let runner_name = runner.name().into();
        Self {
            info,
            span: Arc::new(span),
            runner,
            runner_name,
            tracker: Arc::default(),
            dynamic_keys: Mutex::default(),
            cancelled: OnceLock::new(),
            persist_result: None,
            paused: Mutex::new(false),
            resumed: Condvar::new(),
        }
    }

    /// Pauses the flow run: task runs submitted from now on wait until it is resumed (or
    /// cancelled); those already submitted go on. Returns whether it was running.
    pub(crate) fn pause(&self) -> bool {
        !std::mem::replace(&mut *self.paused.lock().unwrap_or_else(|p| p.into_inner()), true)
    }

    /// Resumes a paused flow run. Returns whether it was paused.
    pub(crate) fn resume(&self) -> bool {
        let was = std::mem::replace(&mut *self.paused.lock().unwrap_or_else(|p| p.into_inner()), false);
        self.resumed.notify_all();
        was
    }

    /// Waits while the flow run is paused.
    pub(crate) fn wait_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        while *paused {
            paused = self.resumed.wait(paused).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Cancels the flow run: the runner ends its unfinished task runs `Cancelled` (stopping
    /// running ones where it can), and runs submitted from now on end `Cancelled` at once.
    /// Returns whether this call cancelled it (and not an earlier one).
    pub(crate) fn cancel(&self, reason: &str) -> bool {
        if self.cancelled.set(reason.to_owned()).is_err() {
            return false;
        }
        // A paused run's waiting submissions go on, to end `Cancelled`.
        self.resume();
        self.runner.cancel_pending(reason);
        true
    }

    /// After a submission: a run that passed the check just before the flow run was
    /// cancelled reached the runner after its `cancel_pending`, so ask again.
    pub(crate) fn recheck_cancellation(&self) {
        if let Some(reason) = self.cancellation() {
            self.runner.cancel_pending(reason);
        }
    }

    /// Why the flow run was cancelled, if it was.
    pub(crate) fn cancellation(&self) -> Option<&str> {
        self.cancelled.get().map(String::as_str)
    }

    /// 0, 1, ...: which run of the task this is within the flow run.
    pub(crate) fn next_dynamic_key(&self, task_key: &'static str) -> u64 {
        let mut keys = self.dynamic_keys.lock().unwrap_or_else(|p| p.into_inner());
        let next = keys.entry(task_key).or_insert(0);
        *next += 1;
        *next - 1
    }
}

thread_local! {
    static STACK: RefCell<Vec<Arc<FlowRunContext>>> = const { RefCell::new(Vec::new()) };
}

/// The innermost flow run on this thread.
pub(crate) fn current() -> Option<Arc<FlowRunContext>> {
    STACK.with(|stack| stack.borrow().last().cloned())
}

/// The current flow run, or the context of task runs made outside any flow, which run on
/// a thread pool of their own.
pub(crate) fn current_or_standalone() -> Arc<FlowRunContext> {
    static STANDALONE: OnceLock<Arc<FlowRunContext>> = OnceLock::new();
    current().unwrap_or_else(|| {
        STANDALONE
            .get_or_init(|| {
                crate::logging::init();
                Arc::new(FlowRunContext::new(None, tracing::Span::none(), Arc::new(ThreadPoolTaskRunner::new())))
            })
            .clone()
    })
}

/// Makes `context` current on this thread until dropped.
pub(crate) struct Entered(());

pub(crate) fn enter(context: Arc<FlowRunContext>) -> Entered {
    STACK.with(|stack| stack.borrow_mut().push(context));
    Entered(())
}

impl Drop for Entered {
    fn drop(&mut self) {
        STACK.with(|stack| stack.borrow_mut().pop());
    }
}

/// A future that runs with `context` current on whatever thread polls it.
pub(crate) struct WithContext<F> {
    pub(crate) context: Arc<FlowRunContext>,
    pub(crate) future: Pin<Box<F>>,
}

impl<F: Future> Future for WithContext<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _entered = enter(self.context.clone());
        let _span = (*self.context.span).clone().entered();
        self.future.as_mut().poll(cx)
    }
}

/// The task runs of a flow run: how many are unfinished, and which are still referenced.
#[derive(Default)]
pub(crate) struct RunTracker {
    state: Mutex<Tracked>,
    idle: Condvar,
}

#[derive(Default)]
struct Tracked {
    runs: Vec<WeakTaskRun>,
    unfinished: usize,
}

impl RunTracker {
    pub(crate) fn track(self: &Arc<Self>, run: &TaskRun) {
        {
            let mut tracked = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if tracked.runs.len() == tracked.runs.capacity() && tracked.runs.len() >= 1024 {
                tracked.runs.retain(|weak| weak.upgrade().is_some());
            }
            tracked.runs.push(run.downgrade());
            tracked.unfinished += 1;
        }
        let tracker = self.clone();
        run.on_finish(move |_| {
            let mut tracked = tracker.state.lock().unwrap_or_else(|p| p.into_inner());
            tracked.unfinished -= 1;
            if tracked.unfinished == 0 {
                tracker.idle.notify_all();
            }
        });
    }

    /// Waits until every tracked run has finished.
    pub(crate) fn wait_idle(&self) {
        let mut tracked = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while tracked.unfinished > 0 {
            tracked = self.idle.wait(tracked).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits, without blocking the thread, until every tracked run has finished.
    pub(crate) async fn wait_idle_async(&self) {
        loop {
            let unfinished: Vec<TaskRun> = {
                let tracked = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if tracked.unfinished == 0 {
                    return;
                }
                tracked.runs.iter().filter_map(WeakTaskRun::upgrade).filter(|run| !run.is_finished()).collect()
            };
            if unfinished.is_empty() {
                return;
            }
            for run in unfinished {
                Finished(run).await;
            }
        }
    }

    /// The runs that futures still refer to: those the flow returned or kept.
    pub(crate) fn live_runs(&self) -> Vec<TaskRun> {
        let tracked = self.state.lock().unwrap_or_else(|p| p.into_inner());
        tracked.runs.iter().filter_map(WeakTaskRun::upgrade).filter(TaskRun::has_futures).collect()
    }
}

/// Resolves when a task run has finished.
pub(crate) struct Finished(pub(crate) TaskRun);

impl Future for Finished {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.poll_finished(cx.waker()) { Poll::Ready(()) } else { Poll::Pending }
    }
}
