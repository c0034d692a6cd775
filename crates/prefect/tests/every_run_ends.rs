//! Every run ends exactly once: a run whose runner loses it, a pool thread that dies under
//! it, and options out of range all end the run at once, with a message that says why, and
//! the flow goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prefect::observe::{RunObserver, TaskRunInfo};
use prefect::runner::{FlowRunInfo, RunnerError, TaskRunSpec, TaskRunner};
use prefect::{FlowError, OptionsError, State, TaskError, ThreadPoolTaskRunner, flow, task};

#[task]
fn double(x: u32) -> u32 {
    x * 2
}

/// A runner with a bug: it forgets every run it is given.
#[derive(Debug)]
struct Forgetful;

impl TaskRunner for Forgetful {
    fn name(&self) -> String {
        "Forgetful".to_owned()
    }
    fn start(&self, _: &FlowRunInfo) -> Result<(), RunnerError> {
        Ok(())
    }
    fn submit(&self, spec: TaskRunSpec) {
        drop(spec);
    }
    fn stop(&self) {}
}

#[test]
fn a_run_its_runner_drops_ends_crashed_naming_the_runner() {
    #[flow(task_runner = Forgetful)]
    fn forgotten() -> TaskError {
        double.submit(1).result().unwrap_err()
    }
    let started = Instant::now();
    let error = forgotten().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "ended at once: {:?}", started.elapsed());
    assert!(matches!(error, TaskError::Crashed { .. }), "{error:?}");
    assert_eq!(error.message(), "Forgetful lost the task run before it ended: it was dropped without a final state");
}

/// A runner whose thread panics while it holds the run.
#[derive(Debug)]
struct Panicky;

impl TaskRunner for Panicky {
    fn name(&self) -> String {
        "Panicky".to_owned()
    }
    fn start(&self, _: &FlowRunInfo) -> Result<(), RunnerError> {
        Ok(())
    }
    fn submit(&self, spec: TaskRunSpec) {
        std::thread::spawn(move || {
            let _held = spec;
            panic!("the runner's thread died");
        });
    }
    fn stop(&self) {}
}

#[test]
fn a_run_whose_runner_thread_panics_ends_crashed() {
    #[flow(task_runner = Panicky)]
    fn unlucky() -> TaskError {
        double.submit(1).result().unwrap_err()
    }
    let error = unlucky().unwrap();
    assert!(matches!(error, TaskError::Crashed { .. }), "{error:?}");
    assert!(error.message().contains("Panicky lost the task run before it ended: a panic unwound"), "{error}");
}

/// Panics on the Running state of `double` runs while `ARMED`: a bug outside the task's own
/// code, on the pool thread that runs it.
struct Saboteur;

static ARMED: AtomicBool = AtomicBool::new(false);

impl RunObserver for Saboteur {
    fn task_run_state(&self, info: &TaskRunInfo, state: &State) {
        if state.is_running() && info.task_name == "double" && ARMED.swap(false, Ordering::SeqCst) {
            panic!("an observer failed");
        }
    }
}

#[test]
fn a_pool_thread_that_panics_outside_the_task_crashes_the_run_and_the_pool_goes_on() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| prefect::observe::add_observer(Arc::new(Saboteur)));
    #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(1))]
    fn sabotaged() -> (TaskError, u32) {
        ARMED.store(true, Ordering::SeqCst);
        let lost = double.submit(1).result().unwrap_err();
        (lost, double.submit(2).result().unwrap())
    }
    let started = Instant::now();
    let (lost, next) = sabotaged().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(matches!(lost, TaskError::Crashed { .. }), "{lost:?}");
    assert!(lost.message().starts_with("ThreadPoolTaskRunner(max_workers=1) lost the task run"), "{lost}");
    assert_eq!(next, 4, "the only worker thread survived and ran the next run");
}

#[test]
fn options_out_of_range_at_run_time_fail_the_run_with_a_clear_message() {
    #[flow]
    fn badly_configured(timeout: f64, delay: f64) -> (TaskError, TaskError) {
        let timeout = double.with_options(|o| o.timeout_seconds = Some(timeout)).submit(1);
        let delay = double.with_options(|o| o.retry_delay_seconds = vec![delay]).submit(1);
        (timeout.result().unwrap_err(), delay.result().unwrap_err())
    }
    let started = Instant::now();
    let (timeout, delay) = badly_configured(-1.0, f64::NAN).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(timeout, TaskError::Failed { .. }), "{timeout:?}");
    assert_eq!(
        timeout.message(),
        "invalid options for task 'double': timeout_seconds is -1; give a positive, finite number of seconds"
    );
    assert!(delay.message().contains("retry_delay_seconds has NaN"), "{delay}");
}

const NEGATIVE: f64 = -1.0;

#[test]
fn a_flow_option_out_of_range_fails_the_flow_before_it_runs() {
    static RAN: AtomicBool = AtomicBool::new(false);
    #[flow(timeout_seconds = NEGATIVE)]
    fn never() {
        RAN.store(true, Ordering::SeqCst);
    }
    let error = never().unwrap_err();
    assert!(matches!(error, FlowError::InvalidOptions { source: OptionsError::Timeout(_), .. }), "{error:?}");
    assert!(!RAN.load(Ordering::SeqCst), "the body never ran");
    assert!(error.to_string().contains("timeout_seconds is -1; give a positive"), "{error}");
}

#[test]
fn a_failed_returned_future_keeps_the_task_error_as_its_source() {
    #[task]
    fn refuse() -> Result<u8, String> {
        Err("no".to_owned())
    }
    #[flow]
    fn returns_failure() -> prefect::PrefectFuture<u8> {
        refuse.submit()
    }
    let error = returns_failure().unwrap_err();
    let FlowError::TaskFailed { source, .. } = &error else { panic!("{error:?}") };
    assert!(matches!(**source, TaskError::Failed { .. }), "{source:?}");
    assert!(std::error::Error::source(&error).is_some());
}
