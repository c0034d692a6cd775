//! Flow runs, task runs and logs reach a real Prefect server (`prefect server start`, 3.9.1),
//! and flows obey its orchestration. `cargo xtask test` starts one server for all tests and
//! passes its address in `PREFECT_TEST_API_URL`; without it, each test starts its own.

mod prefect_server;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prefect::runner::{FlowRunInfo, RunnerError, TaskRunSpec, TaskRunner};
use prefect::{FlowError, PrefectFuture, TaskRun, flow, task};
use prefect_server::{Server, names, server, time};
use serde_json::{Value, json};
use uuid::Uuid;

/// The run on the server with this id.
fn find(runs: &[Value], id: Uuid) -> &Value {
    runs.iter().find(|run| run["id"] == id.to_string()).unwrap_or_else(|| panic!("no task run {id} in {runs:#?}"))
}

fn input_ids(run: &Value, parameter: &str) -> Vec<String> {
    run["task_inputs"][parameter]
        .as_array()
        .unwrap_or_else(|| panic!("no input {parameter} in {run}"))
        .iter()
        .map(|input| {
            assert_eq!(input["input_type"], "task_run");
            input["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn handles<T>(futures: &[PrefectFuture<T>]) -> Vec<TaskRun> {
    futures.iter().map(|future| future.task_run().clone()).collect()
}

#[task(tags = ["source"])]
fn numbers(count: u64) -> Vec<u64> {
    tracing::info!("making {count} numbers");
    (1..=count).collect()
}

#[task]
fn square(values: Vec<u64>, index: usize) -> u64 {
    values[index] * values[index]
}

#[task(tags = ["gather", "sum"])]
fn total(values: Vec<u64>) -> u64 {
    values.iter().sum()
}

#[task]
fn announce(text: String) -> String {
    text
}

struct Reported {
    flow_run: FlowRunInfo,
    source: TaskRun,
    squares: Vec<TaskRun>,
    total: TaskRun,
    announce: TaskRun,
    sum: u64,
}

#[flow]
fn sum_of_squares(count: u64) -> Result<Reported, prefect::TaskError> {
    let source = numbers.submit(count);
    let squares: Vec<PrefectFuture<u64>> = (0..count as usize).map(|index| square.submit(&source, index)).collect();
    let sum = total.submit(&squares[..]);
    let done = announce.wait_for(&sum).submit("done".to_owned());
    done.result()?;
    Ok(Reported {
        flow_run: prefect::runtime::flow_run().unwrap(),
        source: source.task_run().clone(),
        squares: handles(&squares),
        total: sum.task_run().clone(),
        announce: done.task_run().clone(),
        sum: sum.result()?,
    })
}

#[test]
fn a_flow_run_its_task_runs_their_graph_and_logs_reach_the_server() {
    let server = server();
    let reported = sum_of_squares(3).unwrap();
    assert_eq!(reported.sum, 14);
    let id = server.flow_run_id(reported.flow_run.id);

    // The flow run ended on the server when the call returned: its states are orchestrated.
    let flow_run = server.flow_run(id);
    assert_eq!(flow_run["state_name"], "Completed", "{flow_run}");
    assert_eq!(flow_run["name"], reported.flow_run.name);
    assert_eq!(flow_run["parameters"], json!({"count": 3}));
    assert_eq!(names(&server.flow_run_states(id)), ["Pending", "Running", "Completed"]);
    let flow = server.client.get(&format!("/flows/{}", flow_run["flow_id"].as_str().unwrap())).unwrap();
    assert_eq!(flow["name"], "sum-of-squares");

    let runs = server.task_runs(id, 6);
    assert_eq!(runs.len(), 6, "{runs:#?}");
    let all: Vec<&TaskRun> =
        [&reported.source].into_iter().chain(&reported.squares).chain([&reported.total, &reported.announce]).collect();
    for handle in &all {
        let run = find(&runs, handle.id());
        let info = handle.info();
        assert_eq!(run["name"], info.name);
        assert_eq!(run["task_key"], info.task_key);
        assert_eq!(run["dynamic_key"], info.dynamic_key.to_string());
        assert_eq!(run["tags"], json!(info.tags));
        assert_eq!(run["state_type"], "COMPLETED");
        assert_eq!(run["run_count"], 1);
        let (start, end) = handle.times();
        // The server keeps microseconds.
        let micros = |at: Option<chrono::DateTime<Utc>>| at.unwrap().timestamp_micros();
        assert_eq!(
            time(&run["start_time"]).timestamp_micros(),
            micros(start),
            "{} started when it did here",
            info.name
        );
        assert_eq!(time(&run["end_time"]).timestamp_micros(), micros(end), "{} ended when it did here", info.name);
        assert_eq!(names(&server.task_run_states(handle.id())), ["Pending", "Running", "Completed"]);
    }
    assert_eq!(find(&runs, reported.source.id())["tags"], json!(["source"]));
    let mut dynamic_keys: Vec<_> = reported.squares.iter().map(|h| h.info().dynamic_key).collect();
    dynamic_keys.sort();
    assert_eq!(dynamic_keys, [0, 1, 2]);

    // Upstream runs are task inputs, and the graph the UI draws has them as parents.
    for square_run in &reported.squares {
        assert_eq!(input_ids(find(&runs, square_run.id()), "values"), [reported.source.id().to_string()]);
        assert_eq!(input_ids(find(&runs, square_run.id()), "index"), Vec::<String>::new());
    }
    let square_ids: Vec<String> = reported.squares.iter().map(|h| h.id().to_string()).collect();
    assert_eq!(input_ids(find(&runs, reported.total.id()), "values"), square_ids);
    assert_eq!(input_ids(find(&runs, reported.announce.id()), "wait_for"), [reported.total.id().to_string()]);
    let graph = server.client.get(&format!("/flow_runs/{id}/graph-v2")).unwrap();
    let nodes = graph["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6, "{graph}");
    let total_node = nodes.iter().find(|node| node[0] == reported.total.id().to_string()).expect("the total is drawn");
    let mut parents: Vec<String> =
        total_node[1]["parents"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect();
    parents.sort();
    parents.dedup();
    let mut expected = square_ids.clone();
    expected.sort();
    assert_eq!(parents, expected);

    // Logs of the flow run and of each task run, attributed to them.
    let logs = server.logs(id);
    let line = |message: &str, task_run: Option<Uuid>| {
        logs.iter().find(|log| {
            log["message"] == message && log["task_run_id"] == task_run.map_or(Value::Null, |id| json!(id.to_string()))
        })
    };
    let beginning = format!("Beginning flow run '{}' for flow 'sum-of-squares'", reported.flow_run.name);
    let begun = line(&beginning, None).unwrap_or_else(|| panic!("no {beginning:?} in {logs:#?}"));
    assert_eq!((begun["name"].as_str(), begun["level"].as_u64()), (Some("prefect.flow_runs"), Some(20)));
    assert!(line("Finished in state Completed()", None).is_some(), "the flow's last line: {logs:#?}");
    assert!(line("making 3 numbers", Some(reported.source.id())).is_some(), "the task's own line: {logs:#?}");
    for handle in &all {
        assert!(line("Finished in state Completed()", Some(handle.id())).is_some(), "{}: {logs:#?}", handle.name());
    }
}

#[test]
fn retries_failures_and_runs_that_never_ran_are_reported() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    #[task(retries = 2, retry_delay_seconds = [0.3])]
    fn flaky() -> Result<usize, String> {
        match ATTEMPTS.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Err("not yet".to_owned()),
            n => Ok(n),
        }
    }
    #[task]
    fn broken() -> Result<u32, String> {
        Err("boom".to_owned())
    }
    #[task]
    fn after(value: u32) -> u32 {
        value
    }
    #[flow]
    fn shaky() -> (Uuid, TaskRun, TaskRun, TaskRun) {
        let (flaky_run, broken_run) = (flaky.submit(), broken.submit());
        let after_run = after.submit(&broken_run);
        after_run.wait(None);
        flaky_run.wait(None);
        let id = prefect::runtime::flow_run().unwrap().id;
        (id, flaky_run.task_run().clone(), broken_run.task_run().clone(), after_run.task_run().clone())
    }

    let server = server();
    let (local, flaky_run, broken_run, after_run) = shaky().unwrap();
    let id = server.flow_run_id(local);
    let runs = server.task_runs(id, 3);

    let run = find(&runs, flaky_run.id());
    assert_eq!(run["state_name"], "Completed");
    assert_eq!(run["run_count"], 3);
    assert_eq!(run["empirical_policy"]["retries"], 2);
    let states = server.task_run_states(flaky_run.id());
    assert_eq!(
        names(&states),
        ["Pending", "Running", "AwaitingRetry", "Retrying", "AwaitingRetry", "Retrying", "Completed"]
    );
    assert_eq!(time(&run["start_time"]), time(&states[1]["timestamp"]), "started at the first Running");
    assert_eq!(time(&run["end_time"]), time(&states[6]["timestamp"]));
    let elapsed = (time(&run["end_time"]) - time(&run["start_time"])).as_seconds_f64();
    let running = run["total_run_time"].as_f64().unwrap();
    assert!(running < elapsed - 0.5, "the retry delays are not running time: {running} of {elapsed}");
    assert_eq!(states[2]["type"], "SCHEDULED");
    assert!(states[2]["state_details"]["scheduled_time"].is_string(), "{}", states[2]);

    let run = find(&runs, broken_run.id());
    assert_eq!((run["state_type"].as_str(), run["run_count"].as_u64()), (Some("FAILED"), Some(1)));
    assert!(run["state"]["message"].as_str().unwrap().contains("boom"), "{run}");

    let run = find(&runs, after_run.id());
    assert_eq!((run["state_type"].as_str(), run["state_name"].as_str()), (Some("PENDING"), Some("NotReady")));
    assert_eq!(run["run_count"], 0);
    assert!(run["start_time"].is_null() && run["end_time"].is_null(), "it never ran: {run}");
    assert_eq!(input_ids(run, "value"), [broken_run.id().to_string()]);

    let logs = server.logs(id);
    let retried = logs.iter().find(|log| log["message"].as_str().unwrap_or("").contains("Retry 1/2 will start"));
    assert_eq!(retried.unwrap_or_else(|| panic!("{logs:#?}"))["task_run_id"], flaky_run.id().to_string());
    let failed = logs.iter().find(|log| log["task_run_id"] == broken_run.id().to_string() && log["level"] == 40);
    assert!(failed.is_some(), "the failure is logged at ERROR: {logs:#?}");
}

#[test]
fn flow_retries_are_orchestrated_by_the_server() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    #[flow(retries = 1, retry_delay_seconds = 0.2)]
    fn second_time_lucky() -> Result<Uuid, String> {
        match ATTEMPTS.fetch_add(1, Ordering::SeqCst) {
            0 => Err("first attempt fails".to_owned()),
            _ => Ok(prefect::runtime::flow_run().unwrap().id),
        }
    }
    let server = server();
    let id = server.flow_run_id(second_time_lucky().unwrap());
    let states = server.flow_run_states(id);
    assert_eq!(names(&states), ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]);
    let flow_run = server.flow_run(id);
    assert_eq!(flow_run["run_count"], 2);
    assert_eq!(flow_run["empirical_policy"]["retries"], 1);
}

#[test]
fn a_subflow_run_sits_under_a_task_run_of_its_parent() {
    #[flow]
    fn child(word: String) -> (Uuid, usize) {
        (prefect::runtime::flow_run().unwrap().id, word.len())
    }
    #[flow]
    fn parent() -> (Uuid, Uuid) {
        let (child_id, _) = child("hello".to_owned()).unwrap();
        (prefect::runtime::flow_run().unwrap().id, child_id)
    }
    let server = server();
    let (parent_local, child_local) = parent().unwrap();
    let (parent_id, child_id) = (server.flow_run_id(parent_local), server.flow_run_id(child_local));
    let child_run = server.flow_run(child_id);
    assert_eq!(child_run["state_name"], "Completed");
    assert_eq!(child_run["parameters"], json!({"word": "hello"}));
    let task_run_id: Uuid =
        child_run["parent_task_run_id"].as_str().expect("the subflow has a parent task run").parse().unwrap();
    let runs = server.task_runs(parent_id, 1);
    let stand_in = find(&runs, task_run_id);
    assert_eq!(stand_in["name"].as_str().unwrap().split('-').next(), Some("child"));
    assert_eq!(stand_in["state_name"], "Completed", "the server mirrors the subflow's state: {stand_in}");
}

/// A runner that lets a test act on the server between the creation of a flow run and its
/// start, as a person in the UI might, then runs tasks on the calling thread.
struct Meddling {
    api_url: String,
    meddle: fn(&Server, Uuid),
}

impl TaskRunner for Meddling {
    fn name(&self) -> String {
        "Meddling".into()
    }
    fn start(&self, flow_run: &FlowRunInfo) -> Result<(), RunnerError> {
        let server = prefect_server::connect(&self.api_url);
        (self.meddle)(&server, server.flow_run_id(flow_run.id));
        Ok(())
    }
    fn submit(&self, spec: TaskRunSpec) {
        spec.dependencies().for_each(|run| {
            run.wait(None);
        });
        prefect::runner::run_here(spec);
    }
    fn stop(&self) {}
}

static BODY_RUNS: AtomicUsize = AtomicUsize::new(0);

#[flow(task_runner = Meddling { api_url: api_url.clone(), meddle })]
fn meddled(api_url: String, meddle: fn(&Server, Uuid)) -> (Uuid, DateTime<Utc>) {
    BODY_RUNS.fetch_add(1, Ordering::SeqCst);
    (prefect::runtime::flow_run().unwrap().id, Utc::now())
}

#[test]
fn a_wait_from_the_server_delays_the_start() {
    let server = server();
    let scheduled = |server: &Server, id: Uuid| {
        let at = Utc::now() + chrono::TimeDelta::seconds(2);
        server.force_state(
            id,
            json!({"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": at}}),
        );
    };
    let started = Instant::now();
    let (local, body_began) = meddled(server.client.api_url().to_owned(), scheduled).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500), "the flow waited: {:?}", started.elapsed());
    let id = server.flow_run_id(local);
    let states = server.flow_run_states(id);
    assert_eq!(names(&states), ["Pending", "Scheduled", "Running", "Completed"]);
    // The server lets a run start once its scheduled time is less than half a second away
    // (it rounds the wait to whole seconds). The Running state's timestamp is no measure: the
    // server stamps it when the request arrives, which under load is long before it decides.
    let due = time(&states[1]["state_details"]["scheduled_time"]);
    assert!(body_began >= due - chrono::TimeDelta::milliseconds(500), "began {body_began}, due {due}");
}

#[test]
fn a_rejected_start_keeps_the_flow_from_running() {
    let server = server();
    let cancelling = |server: &Server, id: Uuid| {
        server.force_state(id, json!({"type": "CANCELLING", "name": "Cancelling"}));
    };
    let before = BODY_RUNS.load(Ordering::SeqCst);
    let error = meddled(server.client.api_url().to_owned(), cancelling).unwrap_err();
    assert!(matches!(error, FlowError::Cancelled { .. }), "{error}");
    assert!(error.to_string().contains("Cancelling"), "{error}");
    assert_eq!(BODY_RUNS.load(Ordering::SeqCst), before, "the body did not run");
}

#[test]
fn an_abort_from_the_server_stops_the_flow() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    #[flow(retries = 2)]
    fn failing(api_url: String) -> Result<(), String> {
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        // Someone marks the run Failed on the server while it runs: it may not be rescheduled.
        let server = prefect_server::connect(&api_url);
        let id = server.flow_run_id(prefect::runtime::flow_run().unwrap().id);
        server.force_state(id, json!({"type": "FAILED", "name": "Failed", "message": "marked failed"}));
        Err("this attempt fails".to_owned())
    }
    let server = server();
    let error = failing(server.client.api_url().to_owned()).unwrap_err();
    assert!(matches!(error, FlowError::Cancelled { .. }), "{error}");
    assert!(error.to_string().contains("aborted"), "{error}");
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 1, "no retry after the abort");
}

#[test]
fn a_thousand_task_runs_are_all_reported() {
    #[task]
    fn one(index: u32) -> u32 {
        index
    }
    #[flow]
    fn thousand() -> Uuid {
        let futures: Vec<_> = (0..1000).map(|i| one.submit(i)).collect();
        prefect::wait(&futures, None);
        prefect::runtime::flow_run().unwrap().id
    }
    let server = server();
    let started = Instant::now();
    let local = thousand().unwrap();
    let returned = started.elapsed();
    let id = server.flow_run_id(local);
    let runs = server.task_runs(id, 1000);
    assert_eq!(runs.len(), 1000);
    assert!(runs.iter().all(|run| run["state_name"] == "Completed" && run["run_count"] == 1));
    eprintln!("1,000 task runs: the flow returned after {returned:?}, all recorded after {:?}", started.elapsed());
}

/// Runs a flow in a child process of this test binary, with or without `PREFECT_API_URL`.
#[test]
fn prefect_api_url_turns_reporting_on_and_nothing_is_reported_without_it() {
    let server = server();
    let child = |api_url: Option<&str>| {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command.args(["--exact", "child_flow", "--ignored", "--nocapture"]).env_remove("PREFECT_API_URL");
        if let Some(url) = api_url {
            command.env("PREFECT_API_URL", url);
        }
        let output = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
        stdout
    };
    let silent = child(None);
    assert!(silent.contains("reporting: off"), "{silent}");

    let reported = child(Some(server.client.api_url()));
    let id: Uuid = reported
        .lines()
        .find_map(|line| line.strip_prefix("reporting: on, flow run "))
        .unwrap_or_else(|| panic!("{reported}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(server.flow_run(id)["state_name"], "Completed");
}

#[test]
#[ignore = "run by prefect_api_url_turns_reporting_on_and_nothing_is_reported_without_it"]
fn child_flow() {
    #[flow]
    fn tiny() -> Uuid {
        prefect::runtime::flow_run().unwrap().id
    }
    let local = tiny().unwrap();
    match prefect::reporting::current() {
        None => {
            assert!(!prefect::observe::active(), "no observer collects anything");
            println!("reporting: off");
        }
        Some(reporting) => println!("reporting: on, flow run {}", reporting.server_flow_run_id(local).unwrap()),
    }
}

/// Blocks until the test that started this child process is done with it (it never is).
#[task]
fn block_forever(marker: String) {
    std::fs::write(marker, b"started").unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
#[ignore = "run by a_program_that_exits_mid_flow_leaves_its_runs_crashed_on_the_server"]
fn child_exiting_mid_flow() {
    #[flow]
    fn never_ends(marker: String) {
        let reporting = prefect::reporting::current().unwrap();
        let local = prefect::runtime::flow_run().unwrap().id;
        println!("SERVER_FLOW_RUN={}", reporting.server_flow_run_id(local).unwrap());
        let runs: Vec<_> = (0..3).map(|_| block_forever.submit(marker.clone())).collect();
        prefect::wait(&runs, None);
    }
    let marker = std::env::var("MARKER").unwrap();
    let watched = marker.clone();
    std::thread::spawn(move || never_ends(marker));
    while !std::path::Path::new(&watched).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The program ends while its flow runs on another thread: `main` returns, or, as here,
    // something calls exit.
    std::process::exit(3);
}

#[test]
fn a_program_that_exits_mid_flow_leaves_its_runs_crashed_on_the_server() {
    let server = server();
    let marker = std::env::temp_dir().join(format!("prefect-exiting-{}", Uuid::new_v4()));
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_exiting_mid_flow", "--ignored", "--nocapture"])
        .env("PREFECT_API_URL", server.client.api_url())
        .env("MARKER", &marker)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&marker);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let id: Uuid = stdout
        .lines()
        .find_map(|line| line.split_once("SERVER_FLOW_RUN=").map(|(_, id)| id.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("{stdout}"));
    let run = server.flow_run(id);
    assert_eq!(run["state_type"], "CRASHED", "{run:#}");
    assert_eq!(run["state"]["message"], "the program exited before the run ended");
    let runs = server.task_runs(id, 3);
    let states: Vec<_> = runs.iter().map(|run| run["state_type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(states, vec!["CRASHED"; 3]);
}

#[test]
fn a_flow_run_and_its_subflow_have_the_ids_the_server_knows_them_by() {
    let server = server();
    #[flow]
    fn inner() -> Uuid {
        prefect::runtime::flow_run().unwrap().id
    }
    #[flow]
    fn outer() -> (Uuid, Uuid) {
        (prefect::runtime::flow_run().unwrap().id, inner().unwrap())
    }
    let (parent, child) = outer().unwrap();
    assert_eq!(server.flow_run_id(parent), parent, "the program's id is the server's");
    assert_eq!(server.flow_run(parent)["id"], parent.to_string());
    let child_run = server.flow_run(child);
    assert_eq!(child_run["id"], child.to_string());
    assert_eq!(child_run["state_type"], "COMPLETED");
    // The subflow sits under the task run that stands for it in its parent.
    let task_run: Value =
        server.client.get(&format!("/task_runs/{}", child_run["parent_task_run_id"].as_str().unwrap())).unwrap();
    assert_eq!(task_run["flow_run_id"], parent.to_string());
}
