//! The default runner: task runs on a pool of threads in this process.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::observe::FlowRunInfo;
use crate::runner::{RunnerError, TaskRunSpec, TaskRunner};
use crate::task_engine;

/// Runs task runs on threads of this process, as many at once as `max_workers`.
///
/// A run is queued once all runs it depends on have finished, so a waiting run never holds
/// a thread. Threads start when work arrives and stop with the flow run.
///
/// # Examples
///
/// ```
/// use prefect::{flow, task, ThreadPoolTaskRunner};
///
/// #[task]
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(4))]
/// fn squares() -> u64 {
///     let futures = square.map(1..=10);
///     futures.iter().map(|f| f.result().unwrap()).sum()
/// }
///
/// assert_eq!(squares().unwrap(), 385);
/// ```
#[derive(Debug)]
pub struct ThreadPoolTaskRunner {
    max_workers: usize,
    pool: Arc<Pool>,
}

impl Default for ThreadPoolTaskRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl ThreadPoolTaskRunner {
    /// A pool of up to 32 threads, or 4 per CPU when that is more: enough for tasks that
    /// mostly wait, which threads suit best (CPU-heavy work belongs on Ray).
    pub fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { max_workers: (4 * cpus).max(32), pool: Arc::new(Pool::default()) }
    }

    /// The same runner with at most `max_workers` threads (at least 1).
    #[must_use]
    pub fn max_workers(mut self, max_workers: usize) -> Self {
        self.max_workers = max_workers.max(1);
        self
    }
}

impl TaskRunner for ThreadPoolTaskRunner {
    fn name(&self) -> String {
        format!("ThreadPoolTaskRunner(max_workers={})", self.max_workers)
    }

    fn start(&self, _flow_run: &FlowRunInfo) -> Result<(), RunnerError> {
        Ok(())
    }

    fn submit(&self, spec: TaskRunSpec) {
        let dependencies: Vec<_> = spec.dependencies().filter(|run| !run.is_finished()).cloned().collect();
        let (pool, max_workers) = (self.pool.clone(), self.max_workers);
        if dependencies.is_empty() {
            pool.push(spec, max_workers);
            return;
        }
        let waiting = Arc::new(AtomicUsize::new(dependencies.len()));
        let spec = Arc::new(Mutex::new(Some(spec)));
        for dependency in dependencies {
            let (waiting, spec, pool) = (waiting.clone(), spec.clone(), pool.clone());
            dependency.on_finish(move |_| {
                if waiting.fetch_sub(1, Ordering::AcqRel) == 1
                    && let Some(spec) = spec.lock().unwrap_or_else(|p| p.into_inner()).take()
                {
                    pool.push(spec, max_workers);
                }
            });
        }
    }

    fn stop(&self) {
        self.pool.shut_down();
    }

    fn cancel_pending(&self, reason: &str) {
        self.pool.cancel_pending(reason);
    }
}

#[derive(Debug, Default)]
struct Pool {
    queue: Mutex<Queue>,
    work: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<TaskRunSpec>,
    idle: usize,
    threads: Vec<JoinHandle<()>>,
    stopping: bool,
    cancelled: Option<String>,
}

impl Pool {
    fn push(self: &Arc<Self>, spec: TaskRunSpec, max_workers: usize) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = queue.cancelled.clone() {
            drop(queue);
            spec.run.finish(crate::State::cancelled(reason), None);
            return;
        }
        queue.jobs.push_back(spec);
        if queue.idle == 0 && queue.threads.len() < max_workers {
            let pool = self.clone();
            let name = format!("prefect-worker-{}", queue.threads.len());
            match std::thread::Builder::new().name(name).spawn(move || pool.work()) {
                Ok(thread) => queue.threads.push(thread),
                Err(error) if queue.threads.is_empty() => {
                    let spec = queue.jobs.pop_back().expect("just pushed");
                    drop(queue);
                    spec.run.crash(format!("could not start a worker thread: {error}"));
                    return;
                }
                Err(_) => {}
            }
        }
        drop(queue);
        self.work.notify_one();
    }

    fn work(&self) {
        loop {
            let spec = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(spec) = queue.jobs.pop_front() {
                        break spec;
                    }
                    if queue.stopping {
                        return;
                    }
                    queue.idle += 1;
                    queue = self.work.wait(queue).unwrap_or_else(|p| p.into_inner());
                    queue.idle -= 1;
                }
            };
            // A panic outside the task's own guard (an engine or observer bug) must not
            // take the thread with it: the run's writer, dropped as the panic unwinds, ends
            // the run `Crashed`, and the thread goes on with the next run.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task_engine::run_here(spec)));
        }
    }

    fn cancel_pending(&self, reason: &str) {
        let jobs = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.cancelled = Some(reason.to_owned());
            std::mem::take(&mut queue.jobs)
        };
        for spec in jobs {
            spec.run.finish(crate::State::cancelled(reason), None);
        }
    }

    fn shut_down(&self) {
        let threads = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.stopping = true;
            std::mem::take(&mut queue.threads)
        };
        self.work.notify_all();
        let current = std::thread::current().id();
        for thread in threads {
            if thread.thread().id() != current {
                let _ = thread.join();
            }
        }
    }
}
