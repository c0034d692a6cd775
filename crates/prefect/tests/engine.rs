//! The engine on real threads: calls, submits, maps, dependencies, states, retries, timeouts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prefect::observe::{FlowRunInfo, RunObserver, TaskRunInfo};
use prefect::{FlowError, PrefectFuture, State, StateType, TaskError, ThreadPoolTaskRunner, flow, task, unmapped};
use uuid::Uuid;

/// Every state every task run entered, and every flow run created, across this process.
#[derive(Default)]
struct Recorder {
    task_runs: Mutex<Vec<TaskRunInfo>>,
    task_states: Mutex<Vec<(Uuid, State)>>,
    flow_runs: Mutex<Vec<FlowRunInfo>>,
}

impl RunObserver for Recorder {
    fn flow_run_created(&self, info: &FlowRunInfo) {
        self.flow_runs.lock().unwrap().push(info.clone());
    }
    fn task_run_created(&self, info: &TaskRunInfo, state: &State) {
        self.task_runs.lock().unwrap().push(info.clone());
        self.task_states.lock().unwrap().push((info.id, state.clone()));
    }
    fn task_run_state(&self, info: &TaskRunInfo, state: &State) {
        self.task_states.lock().unwrap().push((info.id, state.clone()));
    }
}

fn recorder() -> &'static Arc<Recorder> {
    static RECORDER: OnceLock<Arc<Recorder>> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = Arc::new(Recorder::default());
        prefect::observe::add_observer(recorder.clone());
        recorder
    })
}

fn states_of(id: Uuid) -> Vec<State> {
    recorder().task_states.lock().unwrap().iter().filter(|(run, _)| *run == id).map(|(_, s)| s.clone()).collect()
}

fn runs_in(flow_run: Uuid) -> Vec<TaskRunInfo> {
    recorder().task_runs.lock().unwrap().iter().filter(|r| r.flow_run_id == Some(flow_run)).cloned().collect()
}

fn this_flow_run() -> Uuid {
    prefect::runtime::flow_run().expect("inside a flow").id
}

#[task]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
fn sum(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

#[task]
fn divide(a: i64, b: i64) -> Result<i64, String> {
    if b == 0 { Err(format!("cannot divide {a} by zero")) } else { Ok(a / b) }
}

#[task]
fn explode(message: String) -> u8 {
    panic!("{message}")
}

#[task(name = "greeter", tags = ["io", "greeting"], task_run_name = "greet-{who}")]
fn greet(who: String, punctuation: char) -> String {
    format!("hello {who}{punctuation}")
}

#[test]
fn a_direct_call_runs_now_as_a_task_run_and_returns_its_value() {
    recorder();
    #[flow]
    fn direct() -> (i64, Uuid) {
        (add(2, 3).unwrap(), this_flow_run())
    }
    let (value, flow_run) = direct().unwrap();
    assert_eq!(value, 5);
    let runs = runs_in(flow_run);
    assert_eq!(runs.len(), 1, "the direct call made one task run");
    assert_eq!(runs[0].task_name, "add");
    let states: Vec<_> = states_of(runs[0].id).iter().map(|s| s.name.clone()).collect();
    assert_eq!(states, ["Pending", "Running", "Completed"]);
}

#[test]
#[allow(clippy::needless_borrows_for_generic_args)] // references are what this test passes
fn arguments_can_be_values_references_futures_and_lists_of_futures() {
    #[flow]
    fn arithmetic() -> i64 {
        let one = 1;
        let three = add.submit(one, 2);
        let five = add.submit(&one, &4);
        let eight = add.submit(&three, &five);
        let nine = add.submit(eight.clone(), 1);
        let futures = vec![three.clone(), five, eight, nine];
        let total = sum.submit(&futures);
        let slice_total = sum.submit(&futures[..2]);
        let array_total = sum.submit([three.clone(), three]);
        total.result().unwrap() * 10_000 + slice_total.result().unwrap() * 100 + array_total.result().unwrap()
    }
    assert_eq!(arithmetic().unwrap(), 25 * 10_000 + 8 * 100 + 6);
}

#[test]
fn upstream_futures_become_recorded_task_inputs() {
    recorder();
    #[flow]
    fn graph() -> (Uuid, Uuid, Uuid) {
        let a = add.submit(1, 1);
        let b = add.submit(&a, 1);
        let total = sum.submit(vec![a.clone(), b.clone()]);
        total.wait(None);
        (a.task_run_id(), b.task_run_id(), total.task_run_id())
    }
    let (a, b, total) = graph().unwrap();
    let info = recorder().task_runs.lock().unwrap().iter().find(|r| r.id == total).cloned().unwrap();
    assert_eq!(info.inputs, vec![("values", vec![a, b])]);
    let b_info = recorder().task_runs.lock().unwrap().iter().find(|r| r.id == b).cloned().unwrap();
    assert_eq!(b_info.inputs, vec![("a", vec![a]), ("b", vec![])]);
}

#[test]
fn map_makes_one_run_per_element_and_zips_iterables() {
    #[flow]
    fn mapped() -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let zipped = add.map(vec![1, 2, 3], [10, 20, 30]);
        let with_constant = add.map(0..3, unmapped(100));
        let seeds = add.map(vec![1, 2], unmapped(0));
        let from_futures = add.map(&seeds, unmapped(add.submit(1, 1)));
        let values = |futures: Vec<PrefectFuture<i64>>| futures.iter().map(|f| f.result().unwrap()).collect::<Vec<_>>();
        (values(zipped), values(with_constant), values(from_futures))
    }
    let (zipped, with_constant, from_futures) = mapped().unwrap();
    assert_eq!(zipped, [11, 22, 33]);
    assert_eq!(with_constant, [100, 101, 102]);
    assert_eq!(from_futures, [3, 4]);
}

#[test]
fn map_over_iterables_of_different_lengths_fails_the_flow_with_a_clear_error() {
    static LINE: AtomicUsize = AtomicUsize::new(0);
    #[flow]
    fn uneven() {
        LINE.store(line!() as usize + 1, Ordering::SeqCst);
        add.map(vec![1, 2, 3], vec![1, 2]);
    }
    let error = uneven().unwrap_err();
    assert!(error.message().contains("iterables of different lengths: 'a' has 3 item(s) but 'b' has 2"), "{error}");
    let at = format!("engine.rs:{}:", LINE.load(Ordering::SeqCst));
    assert!(error.message().contains(&at), "the panic points at the map call ({at}): {error}");
}

#[test]
fn wait_for_orders_runs_without_passing_values() {
    static STEPS: Mutex<Vec<&str>> = Mutex::new(Vec::new());
    #[task]
    fn record(step: String, pause_ms: u64) {
        std::thread::sleep(Duration::from_millis(pause_ms));
        STEPS.lock().unwrap().push(if step == "first" { "first" } else { "second" });
    }
    #[flow]
    fn ordered() {
        let first = record.submit("first".to_owned(), 300);
        record.wait_for(&first).submit("second".to_owned(), 0).wait(None);
    }
    ordered().unwrap();
    assert_eq!(*STEPS.lock().unwrap(), ["first", "second"]);
}

#[test]
fn futures_wait_report_state_and_ids() {
    let gate = Arc::new(Barrier::new(2));
    static GATE: OnceLock<Arc<Barrier>> = OnceLock::new();
    GATE.set(gate.clone()).ok();
    #[task]
    fn gated() -> u8 {
        GATE.get().unwrap().wait();
        7
    }
    #[flow]
    fn waiting() -> (Option<State>, StateType, State, u8) {
        let future = gated.submit();
        let early = future.wait(Duration::from_millis(50));
        let during = future.state().state_type;
        GATE.get().unwrap().wait();
        let done = future.wait(None).unwrap();
        assert_ne!(future.task_run_id(), Uuid::nil());
        (early, during, done, future.result().unwrap())
    }
    let (early, during, done, value) = waiting().unwrap();
    assert!(early.is_none(), "the run cannot finish before the gate opens");
    assert!(matches!(during, StateType::Pending | StateType::Running));
    assert!(done.is_completed());
    assert_eq!(value, 7);
}

#[test]
fn wait_and_as_completed_follow_completion_order() {
    static GATE: OnceLock<Arc<Barrier>> = OnceLock::new();
    GATE.set(Arc::new(Barrier::new(2))).ok();
    #[task]
    fn blocked(value: u8) -> u8 {
        if value == 1 {
            GATE.get().unwrap().wait();
        }
        value
    }
    #[flow]
    fn ordering() -> (usize, usize, Vec<u8>) {
        let futures = vec![blocked.submit(1), blocked.submit(2)];
        let (done, not_done) = prefect::wait(&futures, Duration::from_millis(300));
        let counts = (done.len(), not_done.len());
        let mut order = Vec::new();
        let mut completed = prefect::as_completed(futures);
        order.push(completed.next().unwrap().result().unwrap());
        GATE.get().unwrap().wait();
        order.extend(completed.map(|f| f.result().unwrap()));
        (counts.0, counts.1, order)
    }
    assert_eq!(ordering().unwrap(), (1, 1, vec![2, 1]));
}

#[test]
fn errors_and_panics_fail_the_run_with_their_message() {
    #[flow]
    fn failing() -> (TaskError, TaskError, State) {
        let error = divide.submit(1, 0);
        let panic = explode.submit("kaboom".to_owned());
        (error.result().unwrap_err(), panic.result().unwrap_err(), panic.state())
    }
    let (error, panic, panic_state) = failing().unwrap();
    assert!(matches!(error, TaskError::Failed { .. }), "{error:?}");
    assert!(error.to_string().contains("cannot divide 1 by zero"), "{error}");
    assert!(error.task_run().starts_with("divide-"));
    assert!(matches!(panic, TaskError::Failed { .. }), "{panic:?}");
    assert!(panic.message().contains("kaboom"), "{panic}");
    assert!(panic.message().contains("engine.rs"), "the panic's location is kept: {panic}");
    assert_eq!(panic_state.state_type, StateType::Failed);
}

#[test]
fn a_run_downstream_of_a_failure_does_not_run_and_names_the_upstream() {
    static RAN: AtomicUsize = AtomicUsize::new(0);
    #[task]
    fn count_and_add(a: i64) -> i64 {
        RAN.fetch_add(1, Ordering::SeqCst);
        a + 1
    }
    #[flow]
    fn chain() -> (String, State, TaskError) {
        let failed = divide.submit(1, 0);
        let downstream = count_and_add.submit(&failed);
        let after = count_and_add.wait_for(&downstream).submit(1);
        let error = downstream.result().unwrap_err();
        after.wait(None);
        assert!(matches!(error, TaskError::NotReady { .. }), "{error:?}");
        (failed.task_run_name().to_owned(), downstream.state(), after.result().unwrap_err())
    }
    let (failed_name, state, after) = chain().unwrap();
    assert_eq!(RAN.load(Ordering::SeqCst), 0, "neither downstream run executed");
    assert_eq!(state.name, "NotReady");
    assert!(state.message.as_deref().unwrap().contains(&failed_name), "{state}");
    assert!(matches!(after, TaskError::NotReady { .. }));
}

#[test]
fn the_flow_fails_on_err_on_panic_and_on_returned_failed_futures_only() {
    #[flow]
    fn returns_err() -> Result<u8, String> {
        Err("bad input".to_owned())
    }
    #[flow]
    fn panics() {
        panic!("flow went wrong");
    }
    #[flow]
    fn returns_failed_future() -> PrefectFuture<i64> {
        divide.submit(1, 0)
    }
    #[flow]
    fn drops_failed_future() -> u8 {
        let _ = divide.submit(1, 0);
        3
    }
    let error = returns_err().unwrap_err();
    assert!(
        matches!(&error, FlowError::Failed { flow, message, .. } if flow == "returns-err" && message == "Flow run encountered an error: bad input"),
        "{error}"
    );
    let error = panics().unwrap_err();
    assert!(error.message().contains("flow went wrong"), "{error}");
    let error = returns_failed_future().unwrap_err();
    assert!(error.message().starts_with("1/1 returned task run(s) did not complete; 'divide-"), "{error}");
    assert!(error.message().contains("cannot divide 1 by zero"), "{error}");
    assert_eq!(drops_failed_future().unwrap(), 3, "an unreturned failure does not fail the flow (Prefect 3)");
}

#[test]
fn retries_wait_their_delays_and_end_completed() {
    recorder();
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    #[task(retries = 2, retry_delay_seconds = [0.2, 0.4])]
    fn flaky() -> Result<usize, String> {
        match ATTEMPTS.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Err("not yet".to_owned()),
            n => Ok(n),
        }
    }
    #[flow]
    fn retrying() -> (usize, Uuid, Duration) {
        let started = Instant::now();
        let future = flaky.submit();
        (future.result().unwrap(), future.task_run_id(), started.elapsed())
    }
    let (value, id, elapsed) = retrying().unwrap();
    assert_eq!(value, 2, "third attempt succeeds");
    assert!(elapsed >= Duration::from_millis(600), "both delays were waited: {elapsed:?}");
    let names: Vec<_> = states_of(id).iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["Pending", "Running", "AwaitingRetry", "Retrying", "AwaitingRetry", "Retrying", "Completed"]);
}

#[test]
fn a_task_that_exhausts_its_retries_fails_with_the_last_error() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    #[task(retries = 1)]
    fn always_fails() -> Result<(), String> {
        Err(format!("attempt {}", ATTEMPTS.fetch_add(1, Ordering::SeqCst) + 1))
    }
    #[flow]
    fn exhausted() -> TaskError {
        always_fails.submit().result().unwrap_err()
    }
    let error = exhausted().unwrap();
    assert!(error.message().contains("attempt 2"), "{error}");
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 2);
}

#[test]
fn a_timeout_fails_the_run_and_says_so() {
    static RELEASE: OnceLock<Arc<Barrier>> = OnceLock::new();
    RELEASE.set(Arc::new(Barrier::new(2))).ok();
    #[task(timeout_seconds = 0.2)]
    fn stuck() {
        RELEASE.get().unwrap().wait();
    }
    #[flow]
    fn timing_out() -> TaskError {
        stuck.submit().result().unwrap_err()
    }
    let error = timing_out().unwrap();
    RELEASE.get().unwrap().wait();
    assert!(matches!(error, TaskError::TimedOut { .. }));
    assert!(error.message().contains("Task run exceeded timeout of 0.2 second(s)"), "{error}");
}

#[test]
fn the_thread_pool_runs_tasks_in_parallel() {
    static BARRIER: OnceLock<Barrier> = OnceLock::new();
    BARRIER.set(Barrier::new(5)).ok();
    #[task(timeout_seconds = 20)]
    fn meet(_i: u32) -> bool {
        BARRIER.get().unwrap().wait();
        true
    }
    #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(5))]
    fn gathering() -> Vec<bool> {
        meet.map(0..5).iter().map(|f| f.result().unwrap()).collect()
    }
    assert_eq!(gathering().unwrap(), vec![true; 5], "five runs met at a barrier of five: they ran at once");
}

#[test]
fn max_workers_caps_how_many_runs_execute_at_once() {
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);
    #[task]
    fn busy(_i: u32) {
        let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
    #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(2))]
    fn capped() {
        busy.map(0..8);
    }
    capped().unwrap();
    assert_eq!(PEAK.load(Ordering::SeqCst), 2);
}

#[test]
fn task_options_and_run_name_templates_apply() {
    recorder();
    #[flow]
    fn named() -> (String, Uuid, String) {
        let future = greet.submit("world".to_owned(), '!');
        (future.task_run_name().to_owned(), future.task_run_id(), future.result().unwrap())
    }
    let (name, id, greeting) = named().unwrap();
    assert_eq!(name, "greet-world");
    assert_eq!(greeting, "hello world!");
    let info = recorder().task_runs.lock().unwrap().iter().find(|r| r.id == id).cloned().unwrap();
    assert_eq!(info.task_name, "greeter");
    assert_eq!(info.tags, ["io", "greeting"]);
    assert_eq!(greet.name(), "greeter");
    let place = greet.key().strip_prefix("engine::greet@").expect("module path, name, then the place");
    let (line, column) = place.split_once(':').expect("line:column");
    assert!(line.parse::<u32>().is_ok() && column.parse::<u32>().is_ok(), "{place}");
}

#[test]
fn with_options_changes_runs_submitted_through_it() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    #[task]
    fn once_bad() -> Result<(), String> {
        if ATTEMPTS.fetch_add(1, Ordering::SeqCst) == 0 { Err("first".into()) } else { Ok(()) }
    }
    #[flow]
    fn retried() -> Result<(), TaskError> {
        once_bad.with_options(|o| o.retries = 1).submit().result()
    }
    retried().unwrap();
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 2);
}

#[test]
fn a_subflow_is_its_own_flow_run_under_its_parent() {
    recorder();
    #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(1))]
    fn child(x: i64) -> (i64, Uuid) {
        (add.submit(x, 1).result().unwrap(), this_flow_run())
    }
    #[flow]
    fn parent() -> (i64, Uuid, Uuid) {
        let (value, child_run) = child(41).unwrap();
        (value, child_run, this_flow_run())
    }
    let (value, child_run, parent_run) = parent().unwrap();
    assert_eq!(value, 42);
    assert_ne!(child_run, parent_run);
    let info = recorder().flow_runs.lock().unwrap().iter().find(|r| r.id == child_run).cloned().unwrap();
    assert_eq!(info.parent.as_ref().unwrap().flow_run_id, parent_run);
    assert_eq!(info.parameters, serde_json::json!({"x": 41}));
    assert_eq!(runs_in(child_run).len(), 1, "the child's task run belongs to the child");
}

#[test]
fn a_flow_can_return_futures_that_the_caller_resolves() {
    #[flow]
    fn producer() -> Vec<PrefectFuture<i64>> {
        add.map(vec![1, 2], unmapped(10))
    }
    let futures = producer().unwrap();
    let values: Vec<i64> = futures.iter().map(|f| f.result().unwrap()).collect();
    assert_eq!(values, [11, 12]);
}

#[test]
fn a_flow_waits_for_every_run_it_submitted() {
    static DONE: AtomicUsize = AtomicUsize::new(0);
    #[task]
    fn slow(_i: u32) {
        std::thread::sleep(Duration::from_millis(100));
        DONE.fetch_add(1, Ordering::SeqCst);
    }
    #[flow]
    fn fire_and_forget() {
        slow.map(0..4);
    }
    fire_and_forget().unwrap();
    assert_eq!(DONE.load(Ordering::SeqCst), 4);
}

#[test]
fn flow_retries_run_the_function_again() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    #[flow(retries = 2)]
    fn stubborn(limit: usize) -> Result<usize, String> {
        let call = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        if call < limit { Err(format!("call {call}")) } else { Ok(call) }
    }
    assert_eq!(stubborn(3).unwrap(), 3);
}

#[test]
fn a_flow_timeout_fails_the_flow_run() {
    #[flow(timeout_seconds = 0.3)]
    fn too_slow() {
        std::thread::sleep(Duration::from_secs(2));
    }
    let started = Instant::now();
    let error = too_slow().unwrap_err();
    assert!(error.message().contains("exceeded timeout of 0.3 second(s)"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2), "the caller did not wait for the abandoned function");
}

#[test]
fn async_tasks_and_flows() {
    #[task(timeout_seconds = 0.2)]
    async fn sleepy(millis: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        millis
    }
    #[flow]
    async fn asynchronous() -> (u64, u64, TaskError) {
        let direct = sleepy(1).await.unwrap();
        let submitted = sleepy.submit(2).await.unwrap();
        let timed_out = sleepy.submit(5_000).await.unwrap_err();
        (direct, submitted, timed_out)
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (direct, submitted, timed_out) = runtime.block_on(asynchronous()).unwrap();
    assert_eq!((direct, submitted), (1, 2));
    assert!(timed_out.message().contains("exceeded timeout"), "{timed_out}");
}

#[test]
fn tasks_outside_flows_run_standalone() {
    assert_eq!(add(1, 2).unwrap(), 3);
    assert_eq!(add.submit(2, 2).result().unwrap(), 4);
}

#[test]
fn a_cancelled_flow_run_stops_submitting_and_ends_cancelled_with_its_subflows() {
    use std::sync::mpsc::{Receiver, Sender, channel};

    #[flow]
    fn inner(ids: Sender<Uuid>, go: Arc<Mutex<Receiver<()>>>) -> StateType {
        ids.send(this_flow_run()).unwrap();
        go.lock().unwrap().recv().unwrap();
        add.submit(1, 2).state().state_type
    }
    #[flow]
    fn outer(ids: Sender<Uuid>, go: Arc<Mutex<Receiver<()>>>) -> (StateType, Result<StateType, String>) {
        ids.send(this_flow_run()).unwrap();
        let before = add.submit(1, 1);
        before.wait(None);
        let subflow = inner(ids, go).map_err(|error| error.to_string());
        let after = add.submit(2, 2);
        after.wait(None);
        (after.state().state_type, subflow)
    }
    recorder();
    let (ids, id) = channel();
    let (go, gate) = channel();
    let flow = std::thread::spawn(move || outer(ids, Arc::new(Mutex::new(gate))));
    let (outer_id, inner_id) = (id.recv().unwrap(), id.recv().unwrap());
    assert!(prefect::observe::cancel_flow_run(outer_id, "stopped by the test"));
    go.send(()).unwrap();
    let error = flow.join().unwrap().unwrap_err();
    assert!(matches!(&error, FlowError::Cancelled { message, .. } if message == "stopped by the test"), "{error}");
    // The subflow was cancelled with its parent; runs submitted after that never ran.
    let final_states = |flow_run| -> Vec<StateType> {
        runs_in(flow_run).iter().map(|run| states_of(run.id).last().unwrap().state_type).collect()
    };
    assert_eq!(final_states(inner_id), [StateType::Cancelled]);
    assert_eq!(final_states(outer_id), [StateType::Completed, StateType::Cancelled]);
    assert!(!prefect::observe::cancel_flow_run(outer_id, "again"), "an ended run is not live");
}

#[test]
fn state_hooks_run_once_per_final_state_of_tasks_and_flows() {
    use std::sync::atomic::AtomicU32;
    static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

    use prefect::TaskRun;

    fn task_done(run: &TaskRun, state: &State) {
        CALLS.lock().unwrap().push(format!("task {} {}", run.name().split('-').next().unwrap(), state.name));
    }
    fn flow_done(info: &prefect::observe::FlowRunInfo, state: &State) {
        CALLS.lock().unwrap().push(format!("flow {} {}", info.flow_name, state.name));
    }
    fn panicking(_: &TaskRun, _: &State) {
        panic!("a hook that panics");
    }

    #[task(on_completion = [task_done], on_failure = [panicking, task_done])]
    fn flaky_step(fail: bool) -> Result<u32, String> {
        if fail { Err("asked to fail".into()) } else { Ok(1) }
    }
    #[task(retries = 2, on_failure = [task_done], on_completion = [task_done])]
    fn retried() -> Result<u32, String> {
        match ATTEMPTS.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Err("not yet".into()),
            _ => Ok(3),
        }
    }
    #[flow(on_completion = [flow_done], on_failure = [flow_done])]
    fn hooked(fail_flow: bool) -> Result<u32, String> {
        let ok = flaky_step.submit(false);
        let failed = flaky_step.submit(true);
        failed.wait(None);
        let after_retries = retried.submit().result().unwrap();
        let value = ok.result().unwrap() + after_retries;
        if fail_flow { Err("the flow fails".into()) } else { Ok(value) }
    }

    assert_eq!(hooked(false).unwrap(), 4);
    assert!(hooked(true).is_err());
    let mut calls = CALLS.lock().unwrap().clone();
    calls.sort();
    // Each final state once: the retried task's failed attempts (two, in the first flow run)
    // were not final.
    let mut expected = vec![
        "flow hooked Completed",
        "flow hooked Failed",
        "task flaky_step Completed",
        "task flaky_step Completed",
        "task flaky_step Failed",
        "task flaky_step Failed",
        "task retried Completed",
        "task retried Completed",
    ];
    expected.sort();
    assert_eq!(calls, expected);
}

#[test]
fn a_retry_condition_decides_which_failures_are_retried() {
    use std::sync::atomic::AtomicU32;
    static ATTEMPTS: AtomicU32 = AtomicU32::new(0);
    fn transient_only(state: &State) -> bool {
        state.message.as_deref().is_some_and(|message| message.contains("transient"))
    }
    #[task(retries = 3, retry_condition_fn = transient_only)]
    fn sometimes(error: String) -> Result<u32, String> {
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        Err(error)
    }
    #[flow]
    fn conditional(error: String) -> u32 {
        ATTEMPTS.store(0, Ordering::SeqCst);
        sometimes.submit(error).wait(None);
        ATTEMPTS.load(Ordering::SeqCst)
    }
    assert_eq!(conditional("a permanent error".into()).unwrap(), 1, "not worth a retry");
    assert_eq!(conditional("a transient error".into()).unwrap(), 4, "tried, then retried three times");
}
