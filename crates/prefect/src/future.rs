//! Typed futures of task runs, and waiting on many of them.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::context::Finished;
use crate::error::TaskError;
use crate::state::State;
use crate::task_run::TaskRun;

/// The future value of a task run, of type `T`: what `task.submit(...)` returns.
///
/// Pass it to another task to make a dependency (the downstream run gets the value, and
/// with a cluster runner the value moves there without passing through this process), or
/// wait for it here. Cloning is cheap; every clone refers to the same run. In async code
/// it can be awaited.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use prefect::{flow, task};
///
/// #[task]
/// fn add(a: i64, b: i64) -> i64 {
///     a + b
/// }
///
/// #[flow]
/// fn sums() -> i64 {
///     let future = add.submit(1, 2);
///     let state = future.wait(Duration::from_secs(10)).expect("finished in time");
///     assert!(state.is_completed());
///     future.result().unwrap()
/// }
///
/// assert_eq!(sums().unwrap(), 3);
/// ```
pub struct PrefectFuture<T> {
    run: TaskRun,
    value: PhantomData<fn() -> T>,
}

impl<T> Clone for PrefectFuture<T> {
    fn clone(&self) -> Self {
        Self::new(self.run.clone())
    }
}

impl<T> Drop for PrefectFuture<T> {
    fn drop(&mut self) {
        self.run.future_dropped();
    }
}

impl<T> std::fmt::Debug for PrefectFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefectFuture").field("task_run", &self.run.name()).field("state", &self.run.state()).finish()
    }
}

impl<T> PrefectFuture<T> {
    /// The future of `run`, whose task returns `T`: only the engine makes futures, from the
    /// typed task that submitted the run.
    pub(crate) fn new(run: TaskRun) -> Self {
        run.future_created();
        Self { run, value: PhantomData }
    }

    /// A read-only view of the task run.
    pub fn task_run(&self) -> &TaskRun {
        &self.run
    }

    /// The task run's id.
    pub fn task_run_id(&self) -> Uuid {
        self.run.id()
    }

    /// The task run's name.
    pub fn task_run_name(&self) -> &str {
        self.run.name()
    }

    /// The run's state now.
    pub fn state(&self) -> State {
        self.run.state()
    }

    /// Waits until the run has finished, or `timeout` has passed (`None`: no limit).
    /// Returns the final state, or `None` if the time ran out first.
    pub fn wait(&self, timeout: impl Into<Option<Duration>>) -> Option<State> {
        self.run.wait(timeout.into()).then(|| self.run.state())
    }
}

impl<T: DeserializeOwned> PrefectFuture<T> {
    /// Waits for the run and returns its value.
    ///
    /// # Errors
    ///
    /// If the run failed, crashed, was cancelled or never ran because an upstream run did
    /// not complete, or if its value cannot be fetched or decoded as a `T`.
    pub fn result(&self) -> Result<T, TaskError> {
        let bytes = self.run.result_bytes()?;
        rmp_serde::from_slice(&bytes).map_err(|error| {
            let message = format!("its value does not decode as `{}`: {error}", std::any::type_name::<T>());
            TaskError::result_unavailable(self.run.name(), message, Some(Box::new(error)))
        })
    }
}

impl<T: DeserializeOwned + Send + 'static> IntoFuture for PrefectFuture<T> {
    type Output = Result<T, TaskError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T, TaskError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            Finished(self.run.clone()).await;
            self.result()
        })
    }
}

/// Waits until every future has finished or `timeout` has passed; returns the futures
/// that finished and those that did not, each in their original order.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use prefect::{flow, task};
///
/// #[task]
/// fn nap(millis: u64) -> u64 {
///     std::thread::sleep(Duration::from_millis(millis));
///     millis
/// }
///
/// #[flow]
/// fn naps() -> (usize, usize) {
///     let futures = vec![nap.submit(0), nap.submit(5_000)];
///     let (done, not_done) = prefect::wait(&futures, Duration::from_millis(2_000));
///     (done.len(), not_done.len())
/// }
///
/// assert_eq!(naps().unwrap(), (1, 1));
/// ```
pub fn wait<T>(
    futures: &[PrefectFuture<T>],
    timeout: impl Into<Option<Duration>>,
) -> (Vec<PrefectFuture<T>>, Vec<PrefectFuture<T>>) {
    let deadline = timeout.into().map(|t| Instant::now() + t);
    for future in futures {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if !future.run.wait(left) {
            break;
        }
    }
    futures.iter().cloned().partition(|future| future.run.is_finished())
}

/// Yields the futures in the order their runs finish.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use prefect::{flow, task};
///
/// #[task]
/// fn nap(millis: u64) -> u64 {
///     std::thread::sleep(Duration::from_millis(millis));
///     millis
/// }
///
/// #[flow]
/// fn fastest_first() -> Vec<u64> {
///     let futures = vec![nap.submit(600), nap.submit(10)];
///     prefect::as_completed(futures).map(|f| f.result().unwrap()).collect()
/// }
///
/// assert_eq!(fastest_first().unwrap(), [10, 600]);
/// ```
pub fn as_completed<T: 'static>(futures: impl IntoIterator<Item = PrefectFuture<T>>) -> AsCompleted<T> {
    let (sender, receiver) = mpsc::channel();
    let mut pending = 0;
    for future in futures {
        pending += 1;
        let sender = sender.clone();
        let handle = future.run.clone();
        handle.on_finish(move |_| {
            let _ = sender.send(future);
        });
    }
    AsCompleted { receiver, pending }
}

/// The iterator of [`as_completed`].
#[derive(Debug)]
pub struct AsCompleted<T> {
    receiver: mpsc::Receiver<PrefectFuture<T>>,
    pending: usize,
}

impl<T> Iterator for AsCompleted<T> {
    type Item = PrefectFuture<T>;

    fn next(&mut self) -> Option<PrefectFuture<T>> {
        if self.pending == 0 {
            return None;
        }
        self.pending -= 1;
        self.receiver.recv().ok()
    }
}
