//! The gate in front of a flow's runner that keeps tag concurrency limits.
//!
//! A run whose tags have a limit waits here, not in its runner: once the runs it depends on
//! have finished, the gate's thread asks for a slot of each of its tags' limits, and hands
//! the run to the runner only with the slots taken. So a waiting run holds no thread of a
//! pool and no Ray worker. The slots go back when the run ends, whatever ends it. Runs
//! without a limited tag pass straight through.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Holder, LimitError, Limiter, Mode, Take, UNREACHABLE_PATIENCE, limiter, tag_limit_names};
use crate::observe::FlowRunInfo;
use crate::runner::{RunnerError, TaskRunSpec, TaskRunner};
use crate::state::State;

/// `runner`, behind a gate for tag concurrency limits if there is a server to keep them.
pub(crate) fn gate(runner: Arc<dyn TaskRunner>) -> Arc<dyn TaskRunner> {
    match limiter() {
        Some(limiter) => Arc::new(TagGate::new(runner, limiter)),
        None => runner,
    }
}

/// A runner in front of another that holds back runs with limited tags until they have slots.
pub(crate) struct TagGate {
    inner: Arc<dyn TaskRunner>,
    limiter: Arc<dyn Limiter>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Runs waiting for their dependencies or for slots, in the order they came.
    waiting: VecDeque<Waiting>,
    /// The lease of each run that holds slots.
    held: HashMap<Uuid, Uuid>,
    /// Runs that held slots and have ended: their leases are to be given back.
    ended: Vec<Uuid>,
    /// The flow run is over: the thread ends once nothing waits or is held.
    stopping: bool,
    /// Why the flow run was cancelled, once it is: runs that get their slots now end
    /// `Cancelled` instead of running.
    cancelled: Option<String>,
}

struct Waiting {
    spec: TaskRunSpec,
    names: Vec<String>,
    /// Not asked again before then (the server's `Retry-After`).
    not_before: Instant,
    /// Since when the server has not answered, if it has not.
    unreachable_since: Option<Instant>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        drop(self.queue());
        self.changed.notify_all();
    }
}

impl TagGate {
    pub(crate) fn new(inner: Arc<dyn TaskRunner>, limiter: Arc<dyn Limiter>) -> Self {
        Self { inner, limiter, shared: Arc::default(), thread: Mutex::new(None) }
    }

    /// Queues `spec` if its tags have a limit; otherwise hands it back.
    fn hold(&self, spec: TaskRunSpec) -> Option<TaskRunSpec> {
        let names = tag_limit_names(&spec.options.tags);
        if names.is_empty() || !self.limiter.limits_any(&names) {
            return Some(spec);
        }
        // Wake the gate when a dependency finishes: then the run may ask for its slots.
        for dependency in spec.dependencies() {
            let shared = Arc::downgrade(&self.shared);
            dependency.on_finish(move |_| {
                if let Some(shared) = shared.upgrade() {
                    shared.notify();
                }
            });
        }
        let waiting = Waiting { spec, names, not_before: Instant::now(), unreachable_since: None };
        self.shared.queue().waiting.push_back(waiting);
        self.shared.changed.notify_all();
        self.ensure_thread();
        None
    }

    fn ensure_thread(&self) {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.is_none() {
            let (inner, limiter, shared) = (self.inner.clone(), self.limiter.clone(), self.shared.clone());
            let spawned = std::thread::Builder::new()
                .name("prefect-concurrency-gate".into())
                .spawn(move || keep_the_gate(&*inner, &*limiter, &shared))
                .expect("the OS starts a thread");
            *thread = Some(spawned);
        }
    }
}

impl TaskRunner for TagGate {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn start(&self, flow_run: &FlowRunInfo) -> Result<(), RunnerError> {
        self.inner.start(flow_run)
    }

    fn submit(&self, spec: TaskRunSpec) {
        if let Some(spec) = self.hold(spec) {
            self.inner.submit(spec);
        }
    }

    fn submit_many(&self, specs: Vec<TaskRunSpec>) {
        let free: Vec<TaskRunSpec> = specs.into_iter().filter_map(|spec| self.hold(spec)).collect();
        if !free.is_empty() {
            self.inner.submit_many(free);
        }
    }

    fn stop(&self) {
        // Every run has ended by now, unless the flow run was stopped from outside: then
        // those still waiting end here, and the runner ends the rest.
        let waiting = {
            let mut queue = self.shared.queue();
            queue.stopping = true;
            std::mem::take(&mut queue.waiting)
        };
        self.shared.changed.notify_all();
        for waiting in waiting {
            waiting.spec.run.crash("the flow run ended before the run got a slot of its tags' concurrency limits");
        }
        self.inner.stop();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    fn cancel_pending(&self, reason: &str) {
        let waiting = {
            let mut queue = self.shared.queue();
            queue.cancelled = Some(reason.to_owned());
            std::mem::take(&mut queue.waiting)
        };
        for waiting in waiting {
            waiting.spec.run.finish(State::cancelled(reason), None);
        }
        self.inner.cancel_pending(reason);
    }
}

impl Drop for TagGate {
    fn drop(&mut self) {
        // A gate dropped without `stop` (its runner never started) lets its thread go.
        self.shared.queue().stopping = true;
        self.shared.changed.notify_all();
    }
}

/// The gate's thread: gives back the slots of ended runs, asks for slots for waiting runs
/// whose dependencies have finished, and hands those that got them to the runner.
fn keep_the_gate(inner: &dyn TaskRunner, limiter: &dyn Limiter, shared: &Arc<Shared>) {
    loop {
        let mut queue = shared.queue();
        let ended: Vec<Uuid> = std::mem::take(&mut queue.ended);
        let leases: Vec<Uuid> = ended.iter().filter_map(|run| queue.held.remove(run)).collect();
        if !leases.is_empty() {
            drop(queue);
            leases.into_iter().for_each(|lease| limiter.give_back(lease));
            continue;
        }
        if queue.stopping && queue.waiting.is_empty() {
            let leases: Vec<Uuid> = queue.held.drain().map(|(_, lease)| lease).collect();
            drop(queue);
            leases.into_iter().for_each(|lease| limiter.give_back(lease));
            return;
        }
        let now = Instant::now();
        let ready =
            queue.waiting.iter().position(|w| w.not_before <= now && w.spec.dependencies().all(|d| d.is_finished()));
        let Some(index) = ready else {
            let next = queue.waiting.iter().map(|w| w.not_before).filter(|at| *at > now).min();
            let wait = next.map_or(Duration::from_secs(3600), |at| at - now);
            drop(shared.changed.wait_timeout(queue, wait).unwrap_or_else(|p| p.into_inner()));
            continue;
        };
        let mut waiting = queue.waiting.remove(index).expect("the index is in the queue");
        drop(queue);
        if waiting.spec.upstream_failure().is_some() {
            // It will not run (the runner ends it NotReady): it needs no slot.
            inner.submit(waiting.spec);
            continue;
        }
        let run = waiting.spec.run.run().clone();
        match limiter.take(&waiting.names, 1, Mode::Concurrency, Some(Holder::Task(run.id()))) {
            Ok(Take::Taken { lease, .. }) => {
                let cancelled = shared.queue().cancelled.clone();
                if let Some(reason) = cancelled {
                    // Cancelled while it asked: it must not run.
                    lease.into_iter().for_each(|lease| limiter.give_back(lease));
                    waiting.spec.run.finish(State::cancelled(reason), None);
                    continue;
                }
                if let Some(lease) = lease {
                    shared.queue().held.insert(run.id(), lease);
                    let weak = Arc::downgrade(shared);
                    run.on_finish(move |run| {
                        if let Some(shared) = weak.upgrade() {
                            shared.queue().ended.push(run.id());
                            shared.changed.notify_all();
                        }
                    });
                }
                inner.submit(waiting.spec);
            }
            Ok(Take::Wait(wait)) => {
                waiting.unreachable_since = None;
                wait_again(shared, waiting, wait);
            }
            Err(LimitError::Refused(source)) => {
                let message = format!("the Prefect server refused a slot of {:?}: {source}", waiting.names);
                waiting.spec.run.finish(State::failed(message), None);
            }
            Err(LimitError::Unreachable(source)) => {
                let since = *waiting.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNREACHABLE_PATIENCE {
                    let message = format!(
                        "could not reach the Prefect server for {} s to take a slot of {:?}: {source}",
                        since.elapsed().as_secs(),
                        waiting.names
                    );
                    waiting.spec.run.crash(message);
                } else {
                    wait_again(shared, waiting, Duration::from_secs(1));
                }
            }
        }
    }
}

/// Puts a run back in its place in the queue, not to ask before `wait` has passed; later runs
/// for the same limits wait as long, so they keep their order. A run of a flow run cancelled
/// meanwhile ends `Cancelled` instead.
fn wait_again(shared: &Shared, mut waiting: Waiting, wait: Duration) {
    let not_before = Instant::now() + wait;
    waiting.not_before = not_before;
    let mut queue = shared.queue();
    if let Some(reason) = queue.cancelled.clone() {
        drop(queue);
        waiting.spec.run.finish(State::cancelled(reason), None);
        return;
    }
    if queue.stopping {
        drop(queue);
        waiting.spec.run.crash("the flow run ended before the run got a slot of its tags' concurrency limits");
        return;
    }
    for other in queue.waiting.iter_mut().filter(|other| other.names == waiting.names) {
        other.not_before = other.not_before.max(not_before);
    }
    queue.waiting.push_front(waiting);
}
