//! What a task on Ray writes reaches the program (and a Prefect server) while the task
//! runs, and so does its start: on a temporary instance, through a GCS address and through
//! Ray Client.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefect::observe::{LogRecord, RunObserver, TaskRunInfo};
use prefect::reporting::api::Client;
use prefect::reporting::api::testing::TestServer;
use prefect::{State, flow, task};
use prefect_ray::RayTaskRunner;
use serde_json::json;
use support::{Cluster, cluster};
use uuid::Uuid;

/// When each line and state of a task run reached this program.
#[derive(Default)]
struct Arrivals(Mutex<Vec<(Uuid, String, Instant)>>);

impl RunObserver for Arrivals {
    fn task_run_state(&self, info: &TaskRunInfo, state: &State) {
        let what = format!("state {:?}", state.state_type);
        self.0.lock().unwrap().push((info.id, what, Instant::now()));
    }
    fn task_run_progress(&self, task_run_id: Uuid, fraction: f64) {
        self.0.lock().unwrap().push((task_run_id, format!("progress {fraction}"), Instant::now()));
    }
    fn log(&self, record: &LogRecord) {
        if let Some(run) = record.task_run_id {
            self.0.lock().unwrap().push((run, record.message.clone(), Instant::now()));
        }
    }
}

impl Arrivals {
    fn at(&self, run: Uuid, what: &str) -> Option<Instant> {
        self.0.lock().unwrap().iter().find(|(id, text, _)| *id == run && text == what).map(|(_, _, at)| *at)
    }
}

/// Reports to the shared test server, or to one of this test's own (kept alive by the first
/// value); returns a client to read back what arrived.
fn report_to_a_server() -> (Option<TestServer>, Client) {
    let own = std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().unwrap());
    let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
    prefect::reporting::connect(&api_url, None).unwrap();
    (own, Client::new(&api_url))
}

fn arrivals() -> &'static Arc<Arrivals> {
    static ARRIVALS: std::sync::OnceLock<Arc<Arrivals>> = std::sync::OnceLock::new();
    ARRIVALS.get_or_init(|| {
        let arrivals = Arc::new(Arrivals::default());
        prefect::observe::add_observer(arrivals.clone());
        arrivals
    })
}

#[task]
fn slow_talker(name: String) -> u32 {
    println!("{name}: first");
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("{name}: second");
    7
}

#[flow(task_runner = match cluster {
    None => RayTaskRunner::new(),
    Some(cluster) if through_client => cluster.client_runner(),
    Some(cluster) => cluster.runner(),
})]
fn talk(cluster: Option<&Cluster>, through_client: bool, name: String, ids: std::sync::mpsc::Sender<Uuid>) -> u32 {
    let future = slow_talker.submit(name);
    ids.send(future.task_run_id()).unwrap();
    future.result().unwrap()
}

/// Runs `talk` on a temporary instance or `cluster`; checks that the first line and the start arrived here, and on
/// the server, well before the task ended.
fn first_line_arrives_while_the_task_runs(cluster: Option<&Cluster>, through_client: bool, name: &str) {
    let arrivals = arrivals();
    let (_own, client) = report_to_a_server();

    let (ids, id) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let flow = scope.spawn(|| talk(cluster, through_client, name.to_owned(), ids));
        let run = id.recv().unwrap();
        // On the server while the task runs: its first line, and its Running state.
        let first = format!("{name}: first");
        let mut on_server = None;
        let mut running_on_server = None;
        let started = Instant::now();
        while !flow.is_finished() && (on_server.is_none() || running_on_server.is_none()) {
            let logs = client.post("/logs/filter", &json!({"logs": {"task_run_id": {"any_": [run]}}})).unwrap();
            if on_server.is_none() && logs.as_array().unwrap().iter().any(|log| log["message"] == first.as_str()) {
                on_server = Some(Instant::now());
            }
            let state = client.get(&format!("/task_runs/{run}")).ok().map(|r| r["state_type"].clone());
            if running_on_server.is_none() && state.is_some_and(|s| s == "RUNNING") {
                running_on_server = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
            assert!(started.elapsed() < Duration::from_secs(120));
        }
        assert_eq!(flow.join().unwrap().unwrap(), 7);

        let ended = arrivals.at(run, "state Completed").expect("the run completed");
        let shown = arrivals.at(run, &first).expect("the first line was shown");
        let running = arrivals.at(run, "state Running").expect("the run was Running");
        let second = arrivals.at(run, &format!("{name}: second")).expect("the second line was shown");
        // The task slept 3 s between its lines: the first must have come well before its end.
        assert!(
            ended.duration_since(shown) > Duration::from_millis(1500),
            "first line {:?} before the end",
            ended - shown
        );
        assert!(
            ended.duration_since(running) > Duration::from_millis(1500),
            "Running {:?} before the end",
            ended - running
        );
        assert!(second <= ended + Duration::from_secs(1));
        assert!(on_server.is_some(), "the first line reached the server before the task ended");
        assert!(running_on_server.is_some(), "the task run was Running on the server before it ended");
        // Each line once, though it came live and again in the run's report.
        let count = arrivals.0.lock().unwrap().iter().filter(|(id, text, _)| *id == run && *text == first).count();
        assert_eq!(count, 1);
    });
}

#[test]
fn output_arrives_while_the_task_runs_on_a_temporary_instance() {
    first_line_arrives_while_the_task_runs(None, false, "temporary");
}

#[test]
fn output_arrives_while_the_task_runs_through_a_gcs_address_and_ray_client() {
    let cluster = cluster();
    first_line_arrives_while_the_task_runs(Some(&cluster), false, "gcs");
    first_line_arrives_while_the_task_runs(Some(&cluster), true, "client");
}

/// Ray would retry a run whose executor died: this one must end with its executor.
#[task(max_retries = 0)]
fn before_the_kill(name: String) {
    println!("{name}: before the kill");
    std::thread::sleep(Duration::from_secs(60));
}

/// The executor is killed once its run shows `Running` here (half a second after it wrote
/// its line): the line reaches the program and the server, though the run has no report.
#[test]
fn what_a_task_wrote_before_its_executor_was_killed_still_arrives() {
    let arrivals = arrivals();
    let (_own, client) = report_to_a_server();

    #[flow(task_runner = RayTaskRunner::new())]
    fn killed(ids: std::sync::mpsc::Sender<Uuid>) -> (State, String) {
        let future = before_the_kill.submit("killed".to_owned());
        ids.send(future.task_run_id()).unwrap();
        future.wait(None);
        let state = future.state();
        // The message says where Ray keeps the worker's log (while the instance lives).
        let message = state.message.clone().unwrap_or_default();
        let log = message.split("its output is in Ray's log ").nth(1).unwrap_or_else(|| panic!("{message}"));
        (state, std::fs::read_to_string(log.trim()).unwrap())
    }
    let (ids, id) = std::sync::mpsc::channel();
    let flow = std::thread::spawn(move || killed(ids));
    let run = id.recv().unwrap();
    assert!(support::eventually(Duration::from_secs(120), || arrivals.at(run, "state Running").is_some()));
    let executors = support::executors_below(std::process::id());
    assert_eq!(executors.len(), 1, "one executor runs the task");
    // SAFETY: kills an executor of this test's own temporary Ray instance.
    unsafe { libc::kill(executors[0] as libc::pid_t, libc::SIGKILL) };
    let (state, log) = flow.join().unwrap().unwrap();
    assert_eq!(state.state_type, prefect::StateType::Crashed);
    assert!(log.contains("killed: before the kill"), "the worker's log has what the executor wrote: {log}");

    let line = "killed: before the kill";
    assert!(
        support::eventually(Duration::from_secs(15), || arrivals.at(run, line).is_some()),
        "the line written before the executor was killed reached the program"
    );
    assert!(
        support::eventually(Duration::from_secs(15), || {
            let logs = client.post("/logs/filter", &json!({"logs": {"task_run_id": {"any_": [run]}}})).unwrap();
            logs.as_array().unwrap().iter().any(|log| log["message"] == line)
        }),
        "and the server"
    );
}

#[task]
fn flood(lines: u32) -> u32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for line in 0..lines {
        let _ = writeln!(out, "line {line} of a flood");
    }
    lines
}

/// A million lines: the run keeps (and shows) as many as the runner's cap (here 2,000) and
/// says how many more were dropped; neither the program nor the bridge grows with the flood.
#[test]
fn a_flood_of_output_is_capped_counted_and_keeps_memory_bounded() {
    use prefect_ray::diagnostics::{bridge_stats, peak_rss_bytes};
    let arrivals = arrivals();
    let cluster = cluster();
    #[flow(task_runner = cluster.runner().max_log_lines(2_000))]
    fn flooding(cluster: &Cluster) -> (Uuid, u64, u64, u64, u64) {
        let warm = flood.submit(10);
        warm.wait(None);
        let (program_before, bridge_before) = (peak_rss_bytes(), bridge_stats().unwrap().peak_rss_bytes);
        let future = flood.submit(1_000_000);
        assert_eq!(future.result().unwrap(), 1_000_000);
        (future.task_run_id(), program_before, bridge_before, peak_rss_bytes(), bridge_stats().unwrap().peak_rss_bytes)
    }
    let (run, program_before, bridge_before, program_after, bridge_after) = flooding(&cluster).unwrap();
    let mb = |bytes: u64| bytes as f64 / 1e6;
    println!(
        "program peak {:.0} -> {:.0} MB, bridge peak {:.0} -> {:.0} MB",
        mb(program_before),
        mb(program_after),
        mb(bridge_before),
        mb(bridge_after)
    );
    assert!(
        program_after - program_before < 100_000_000,
        "the program grew by {:.0} MB",
        mb(program_after - program_before)
    );
    assert!(
        bridge_after - bridge_before < 100_000_000,
        "the bridge grew by {:.0} MB",
        mb(bridge_after - bridge_before)
    );
    let shown =
        arrivals.0.lock().unwrap().iter().filter(|(id, text, _)| *id == run && text.ends_with("of a flood")).count();
    assert_eq!(shown, 2_000, "the run's first 2,000 lines were shown, once each");
    let dropped = "998000 more line(s) of output were dropped: a run keeps at most 2000 lines (PREFECT_LOGGING_MAX_LINES_PER_RUN)";
    assert!(arrivals.at(run, dropped).is_some(), "the count of dropped lines was reported");
}

#[task]
fn halfway() -> u32 {
    prefect::progress(0.5);
    std::thread::sleep(Duration::from_millis(2500));
    prefect::progress(1.0);
    2
}

/// `prefect::progress` inside a task on Ray reaches the program while the task runs, and
/// the server as the task run's progress artifact.
#[test]
fn progress_said_inside_a_task_arrives_while_it_runs_and_becomes_an_artifact() {
    let arrivals = arrivals();
    let (_own, client) = report_to_a_server();
    let cluster = cluster();

    #[flow(task_runner = cluster.runner())]
    fn progressing(cluster: &Cluster) -> Uuid {
        let future = halfway.submit();
        future.wait(None);
        future.task_run_id()
    }
    let run = progressing(&cluster).unwrap();
    let said = arrivals.at(run, "progress 0.5").expect("the progress arrived");
    let ended = arrivals.at(run, "state Completed").expect("the run completed");
    assert!(ended.duration_since(said) > Duration::from_secs(1), "progress {:?} before the end", ended - said);
    let artifacts = client.post("/artifacts/filter", &json!({"artifacts": {"task_run_id": {"any_": [run]}}})).unwrap();
    let artifacts = artifacts.as_array().unwrap();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert_eq!(artifacts[0]["type"], "progress");
    assert!(artifacts[0]["data"].as_f64().is_some_and(|percent| percent >= 50.0), "{artifacts:?}");
}
