//! Options of tasks and flows: retries, delays, timeouts, tags, remote options.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::OptionsError;
use crate::results::CachePolicy;

/// How a task's runs behave: retries, timeouts, tags, and the resources it asks of a runner.
///
/// `#[task(...)]` sets these for every run of a task; `task.with_options(...)` changes them
/// for the runs submitted through the returned handle. They travel with each task run, so a
/// runner in another process applies the same retries and timeout.
///
/// # Examples
///
/// ```
/// use prefect::TaskOptions;
///
/// let options = TaskOptions::default()
///     .retries(2)
///     .retry_delay_seconds([1.0, 10.0])
///     .timeout_seconds(30.0)
///     .tag("io");
/// assert_eq!(options.retries, 2);
/// assert_eq!(options.retry_delay(1).as_secs_f64(), 1.0);
/// assert_eq!(options.retry_delay(5).as_secs_f64(), 10.0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    /// How many times a failed run is tried again.
    pub retries: u32,
    /// Seconds to wait before each retry: the first value before the first retry, and so on;
    /// the last value is used for every later retry. Empty means no wait.
    pub retry_delay_seconds: Vec<f64>,
    /// Spread retries of many runs apart: each delay is drawn at random around its value, up
    /// to `delay * (1 + factor)` (Prefect's clamped Poisson interval).
    pub retry_jitter_factor: Option<f64>,
    /// Seconds one attempt may take before it fails with a timeout.
    pub timeout_seconds: Option<f64>,
    /// Tags of the task's runs, shown and filterable in Prefect's UI.
    pub tags: Vec<String>,
    /// Resources and placement asked of a runner that schedules on a cluster, such as Ray's
    /// `num_cpus`, `num_gpus`, `memory` or `resources`. The engine only carries them; each runner
    /// documents the keys it understands.
    pub remote_options: Map<String, Value>,
    /// Whether each run's value is written to result storage. `None` leaves it to the
    /// cache options (a cache policy or key function persists) and then to the program's
    /// `PREFECT_RESULTS_PERSIST_BY_DEFAULT`. See [`results`](crate::results).
    pub persist_result: Option<bool>,
    /// What a run's cache key is made of; Prefect's default (`INPUTS + TASK_SOURCE +
    /// RUN_ID`) when `None`. Setting it persists results.
    pub cache_policy: Option<CachePolicy>,
    /// Seconds a stored value serves as a cached value; forever when `None`.
    pub cache_expiration_seconds: Option<f64>,
    /// Run even when a value is stored under the run's key, and store the new value.
    pub refresh_cache: bool,
    /// Where values are stored: a directory or a URL (`s3://bucket/prefix`, `file:///dir`);
    /// the program's setting when `None` (`PREFECT_RESULTS_STORAGE`, else
    /// `PREFECT_LOCAL_STORAGE_PATH`, else `~/.prefect/storage`).
    pub result_storage: Option<String>,
}

impl TaskOptions {
    /// These options with `retries` retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// These options with these retry delays, in seconds.
    pub fn retry_delay_seconds(mut self, delays: impl IntoIterator<Item = f64>) -> Self {
        self.retry_delay_seconds = delays.into_iter().collect();
        self
    }

    /// These options with a retry jitter factor.
    pub fn retry_jitter_factor(mut self, factor: f64) -> Self {
        self.retry_jitter_factor = Some(factor);
        self
    }

    /// These options with a timeout per attempt, in seconds.
    pub fn timeout_seconds(mut self, seconds: f64) -> Self {
        self.timeout_seconds = Some(seconds);
        self
    }

    /// These options with one more tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// These options with results persisted, or not.
    pub fn persist_result(mut self, persist: bool) -> Self {
        self.persist_result = Some(persist);
        self
    }

    /// These options with a cache policy (which persists results).
    pub fn cache_policy(mut self, policy: CachePolicy) -> Self {
        self.cache_policy = Some(policy);
        self
    }

    /// These options with stored values serving as cached values for `seconds`.
    pub fn cache_expiration_seconds(mut self, seconds: f64) -> Self {
        self.cache_expiration_seconds = Some(seconds);
        self
    }

    /// These options with cached values ignored and replaced.
    pub fn refresh_cache(mut self, refresh: bool) -> Self {
        self.refresh_cache = refresh;
        self
    }

    /// These options with values stored at `location`: a directory or a URL.
    pub fn result_storage(mut self, location: impl Into<String>) -> Self {
        self.result_storage = Some(location.into());
        self
    }

    /// These options with one more remote option, for runners that understand it.
    pub fn remote_option(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.remote_options.insert(key.into(), value.into());
        self
    }

    /// Checks that every number is in range: what the engine does before a run is created,
    /// and an executor before it runs one.
    ///
    /// # Errors
    ///
    /// The first option out of range: a timeout that is not a positive, finite number of
    /// seconds; a negative, NaN or infinite retry delay or jitter factor.
    ///
    /// # Examples
    ///
    /// ```
    /// use prefect::{OptionsError, TaskOptions};
    ///
    /// assert_eq!(TaskOptions::default().timeout_seconds(-1.0).validate(), Err(OptionsError::Timeout(-1.0)));
    /// assert!(TaskOptions::default().retry_delay_seconds([0.0, 2.5]).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<(), OptionsError> {
        if let Some(timeout) = self.timeout_seconds.filter(|t| !is_positive_seconds(*t)) {
            return Err(OptionsError::Timeout(timeout));
        }
        if let Some(delay) = self.retry_delay_seconds.iter().find(|d| !is_seconds(**d)) {
            return Err(OptionsError::RetryDelay(*delay));
        }
        if let Some(factor) = self.retry_jitter_factor.filter(|f| !is_seconds(*f)) {
            return Err(OptionsError::Jitter(factor));
        }
        if let Some(expiration) = self.cache_expiration_seconds.filter(|e| !is_positive_seconds(*e)) {
            return Err(OptionsError::CacheExpiration(expiration));
        }
        Ok(())
    }

    /// The timeout of one attempt, if any (a timeout too long to represent is none).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_seconds.and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
    }

    /// How long to wait before retry number `retry` (1 for the first retry), jitter included.
    pub fn retry_delay(&self, retry: u32) -> Duration {
        let index = (retry.max(1) as usize - 1).min(self.retry_delay_seconds.len().saturating_sub(1));
        let base = self.retry_delay_seconds.get(index).copied().unwrap_or(0.0).max(0.0);
        let seconds = match self.retry_jitter_factor {
            Some(factor) if factor > 0.0 && base > 0.0 => clamped_poisson_interval(base, factor),
            _ => base,
        };
        seconds_duration(seconds)
    }
}

/// Whether `seconds` is a finite number of seconds, zero or more.
fn is_seconds(seconds: f64) -> bool {
    seconds.is_finite() && seconds >= 0.0
}

/// Whether `seconds` is a finite number of seconds above zero.
fn is_positive_seconds(seconds: f64) -> bool {
    seconds.is_finite() && seconds > 0.0
}

/// `seconds` as a duration, never panicking: NaN and negatives are zero, and more than a
/// duration can hold is the longest one.
pub(crate) fn seconds_duration(seconds: f64) -> Duration {
    if seconds.is_nan() || seconds <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
    }
}

/// A random interval around `average` seconds, between a lower bound and
/// `average * (1 + clamping_factor)`: Prefect's jitter, so many runs retried at once spread out.
fn clamped_poisson_interval(average: f64, clamping_factor: f64) -> f64 {
    let upper_multiple = 1.0 + clamping_factor;
    let upper_bound = average * upper_multiple;
    let lower_bound = (average * lower_clamp_multiple(upper_multiple)).max(0.0);
    let cdf = |x: f64| 1.0 - (-x / average).exp();
    let (low, high) = (cdf(lower_bound), cdf(upper_bound));
    let uniform = low + (high - low) * rand::random::<f64>();
    -(1.0 - uniform).max(1e-10).ln() * average
}

/// The lower bound's multiple of the average that keeps the distribution's mean at the average.
fn lower_clamp_multiple(upper_multiple: f64) -> f64 {
    if upper_multiple >= 50.0 {
        0.0
    } else {
        let power = 2f64.powf(upper_multiple);
        (power / (power - 1.0)).max(1e-10).log2()
    }
}

thread_local! {
    static REMOTE_SCOPES: RefCell<Vec<Map<String, Value>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `body` with `options` added to the remote options of every task run it submits on
/// this thread. Scopes nest: an inner scope's keys win over an outer one's, and a scope's
/// keys win over the task's own (from its attribute or `with_options`).
///
/// # Examples
///
/// A runner sees the scope's options in each run's spec:
///
/// ```
/// use std::sync::Mutex;
/// use prefect::runner::{FlowRunInfo, RunnerError, TaskRunSpec, TaskRunner, run_here, with_remote_options};
/// use serde_json::{json, Map, Value};
///
/// static SEEN: Mutex<Vec<Value>> = Mutex::new(Vec::new());
///
/// #[derive(Debug)]
/// struct Recording;
///
/// impl TaskRunner for Recording {
///     fn name(&self) -> String {
///         "Recording".into()
///     }
///     fn start(&self, _: &FlowRunInfo) -> Result<(), RunnerError> {
///         Ok(())
///     }
///     fn submit(&self, spec: TaskRunSpec) {
///         SEEN.lock().unwrap().push(spec.options.remote_options["num_cpus"].clone());
///         run_here(spec);
///     }
///     fn stop(&self) {}
/// }
///
/// #[prefect::task(num_cpus = 1)]
/// fn train(epochs: u32) -> u32 {
///     epochs
/// }
///
/// #[prefect::flow(task_runner = Recording)]
/// fn training() {
///     let mut more = Map::new();
///     more.insert("num_cpus".into(), json!(4));
///     with_remote_options(more, || train.submit(1).wait(None));
///     train.submit(2).wait(None);
/// }
///
/// training().unwrap();
/// assert_eq!(*SEEN.lock().unwrap(), [json!(4), json!(1)]);
/// ```
pub fn with_remote_options<R>(options: Map<String, Value>, body: impl FnOnce() -> R) -> R {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            REMOTE_SCOPES.with(|scopes| scopes.borrow_mut().pop());
        }
    }
    REMOTE_SCOPES.with(|scopes| scopes.borrow_mut().push(options));
    let _pop = Pop;
    body()
}

/// [`with_remote_options`] for async code: the scope applies while `future` is polled.
pub fn with_remote_options_async<F: Future>(options: Map<String, Value>, future: F) -> impl Future<Output = F::Output> {
    struct Scoped<F> {
        options: Map<String, Value>,
        future: Pin<Box<F>>,
    }
    impl<F: Future> Future for Scoped<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            let options = self.options.clone();
            with_remote_options(options, || self.future.as_mut().poll(cx))
        }
    }
    Scoped { options, future: Box::pin(future) }
}

/// Applies the remote options of the scopes around this call to `options`.
pub(crate) fn apply_remote_scopes(options: &mut TaskOptions) {
    REMOTE_SCOPES.with(|scopes| {
        for scope in scopes.borrow().iter() {
            for (key, value) in scope {
                options.remote_options.insert(key.clone(), value.clone());
            }
        }
    });
}

/// How a flow's runs behave: retries and timeout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowOptions {
    /// How many times a failed flow run is run again.
    pub retries: u32,
    /// Seconds to wait before each retry of the flow run.
    pub retry_delay_seconds: f64,
    /// Seconds the flow function may run before the flow run fails with a timeout.
    pub timeout_seconds: Option<f64>,
    /// Whether the values of the task runs inside it (and its subflows) are persisted when a
    /// task says nothing of it (`persist_result` and cache settings of a task come first).
    /// The flow's own return value goes to its caller and is not persisted.
    pub persist_result: Option<bool>,
}

impl FlowOptions {
    /// Checks that every number is in range, as [`TaskOptions::validate`] does.
    ///
    /// # Errors
    ///
    /// The first option out of range.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if let Some(timeout) = self.timeout_seconds.filter(|t| !is_positive_seconds(*t)) {
            return Err(OptionsError::Timeout(timeout));
        }
        if !is_seconds(self.retry_delay_seconds) {
            return Err(OptionsError::RetryDelay(self.retry_delay_seconds));
        }
        Ok(())
    }

    /// The timeout of the flow function, if any (a timeout too long to represent is none).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_seconds.and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
    }

    /// How long to wait before running a failed flow again.
    pub fn retry_delay(&self) -> Duration {
        seconds_duration(self.retry_delay_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_numbers_are_refused_and_never_panic() {
        for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
            let task = TaskOptions::default().timeout_seconds(bad);
            assert!(matches!(task.validate(), Err(OptionsError::Timeout(_))), "{bad}");
            let flow = FlowOptions { timeout_seconds: Some(bad), ..FlowOptions::default() };
            assert!(matches!(flow.validate(), Err(OptionsError::Timeout(_))), "{bad}");
        }
        for bad in [-0.5, f64::NAN, f64::NEG_INFINITY] {
            let delays = TaskOptions::default().retry_delay_seconds([1.0, bad]);
            assert!(matches!(delays.validate(), Err(OptionsError::RetryDelay(_))), "{bad}");
            let jitter = TaskOptions::default().retry_jitter_factor(bad);
            assert!(matches!(jitter.validate(), Err(OptionsError::Jitter(_))), "{bad}");
        }
        let wild =
            TaskOptions { timeout_seconds: Some(-3.0), retry_delay_seconds: vec![f64::NAN], ..TaskOptions::default() };
        assert_eq!(wild.timeout(), None);
        assert_eq!(wild.retry_delay(1), Duration::ZERO);
        assert_eq!(TaskOptions::default().retry_delay_seconds([1e300]).retry_delay(1), Duration::MAX);
    }

    #[test]
    fn retry_delays_use_the_last_value_for_later_retries() {
        let options = TaskOptions::default().retry_delay_seconds([1.0, 2.0]);
        let delays: Vec<f64> = (1..=4).map(|r| options.retry_delay(r).as_secs_f64()).collect();
        assert_eq!(delays, [1.0, 2.0, 2.0, 2.0]);
        assert_eq!(TaskOptions::default().retry_delay(1), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_within_its_clamps_and_varies() {
        let options = TaskOptions::default().retry_delay_seconds([10.0]).retry_jitter_factor(0.5);
        let draws: Vec<f64> = (0..500).map(|_| options.retry_delay(1).as_secs_f64()).collect();
        assert!(draws.iter().all(|d| *d <= 15.0 + 1e-9 && *d >= 0.0), "{draws:?}");
        let distinct = draws.iter().map(|d| d.to_bits()).collect::<std::collections::HashSet<_>>();
        assert!(distinct.len() > 400, "jitter should spread delays, got {} distinct", distinct.len());
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((6.0..=14.0).contains(&mean), "mean {mean} should stay near the base delay");
    }
}
