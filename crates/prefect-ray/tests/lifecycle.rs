//! A temporary Ray instance lives exactly as long as its flow run: it is torn down when the
//! run ends, however it ends (success, failure, panic, Ctrl-C, SIGTERM, or the driver being
//! killed), and no Ray process or file of it survives. An interrupted flow that reports to a
//! Prefect server leaves its flow run and task runs ended there.
//!
//! Each flow runs in a child process (this test binary, running one ignored test) whose
//! temporary directory is a fresh one of the test's, so everything the run started can be
//! found by that directory's name.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use prefect::reporting::api::Client;
use prefect::reporting::api::testing::TestServer;
use prefect::{flow, task};
use prefect_ray::RayTaskRunner;
use support::{eventually, max_overlap, now, processes_mentioning};
use uuid::Uuid;

fn two_cpus() -> RayTaskRunner {
    RayTaskRunner::new().init_kwargs(serde_json::json!({"num_cpus": 2, "include_dashboard": false}))
}

#[task]
fn shout(number: u32) -> (f64, f64) {
    let start = now();
    std::thread::sleep(Duration::from_millis(500));
    println!("#{number}");
    (start, now())
}

#[task]
fn fail(reason: String) -> Result<(), String> {
    Err(reason)
}

#[task]
fn sleep_forever(marker: String) {
    std::fs::write(marker, b"started").unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[flow(task_runner = two_cpus())]
fn count_to(highest_number: u32) -> Vec<(f64, f64)> {
    let shouts = shout.map(0..highest_number);
    shouts.iter().map(|f| f.result().unwrap()).collect()
}

#[flow(task_runner = two_cpus())]
fn failing() -> Result<(), prefect::TaskError> {
    fail.submit("on purpose".to_owned()).result()
}

#[flow(task_runner = two_cpus())]
fn panicking() {
    shout.submit(1).wait(None);
    panic!("the flow panics");
}

/// Three runs that never end on two CPUs: two run, one waits its turn.
#[flow(task_runner = two_cpus())]
fn waiting_forever(marker: String) {
    if let Some(reporting) = prefect::reporting::current() {
        let local = prefect::runtime::flow_run().unwrap().id;
        println!("SERVER_FLOW_RUN={}", reporting.server_flow_run_id(local).unwrap());
    }
    let runs: Vec<_> = (0..3).map(|_| sleep_forever.submit(marker.clone())).collect();
    prefect::wait(&runs, None);
}

/// The flows, run in the child process; which one comes from `LIFECYCLE_FLOW`.
#[test]
#[ignore = "runs in a child process of the lifecycle tests"]
fn child() {
    match std::env::var("LIFECYCLE_FLOW").unwrap().as_str() {
        "count_to" => {
            let intervals = count_to(10).unwrap();
            println!("PEAK={}", max_overlap(&intervals));
        }
        "failing" => println!("RESULT={}", failing().unwrap_err()),
        "panicking" => println!("RESULT={}", panicking().unwrap_err()),
        "waiting" => {
            let _ = waiting_forever(std::env::var("LIFECYCLE_MARKER").unwrap());
        }
        other => panic!("unknown flow {other}"),
    }
}

/// A directory for one child's temporary files, with a short path (Ray's sockets live there).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("prl-").tempdir_in("/tmp").unwrap()
}

fn child_command(flow: &str, tmp: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("LIFECYCLE_FLOW", flow)
        .env("TMPDIR", tmp)
        .env_remove("RAY_ADDRESS");
    command
}

/// Asserts that nothing the child started is left: no process mentions its directory, and
/// the directory is empty.
fn assert_nothing_left(tmp: &Path) {
    let needle = tmp.display().to_string();
    let gone = eventually(Duration::from_secs(30), || processes_mentioning(&needle).is_empty());
    assert!(gone, "Ray processes survived: {:?}", processes_mentioning(&needle));
    let left: Vec<_> = std::fs::read_dir(tmp).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "files survived: {left:?}");
}

#[test]
fn ten_shouts_run_two_at_a_time_and_the_instance_goes_with_the_run() {
    let tmp = scratch();
    let output = child_command("count_to", tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for number in 0..10 {
        assert!(stderr.contains(&format!(" - #{number}\n")), "#{number} reached the driver's console:\n{stderr}");
    }
    assert!(stdout.contains("PEAK=2"), "a 2-CPU instance ran two shouts at a time: {stdout}");
    assert!(stderr.contains("Started a temporary local Ray instance (Ray 2.60.0): 1 live node(s)"), "{stderr}");
    assert_nothing_left(tmp.path());
}

#[test]
fn a_failed_flow_tears_its_instance_down() {
    let tmp = scratch();
    let output = child_command("failing", tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("RESULT=") && stdout.contains("on purpose"), "{stdout}");
    assert_nothing_left(tmp.path());
}

#[test]
fn a_panicking_flow_tears_its_instance_down() {
    let tmp = scratch();
    let output = child_command("panicking", tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("RESULT=") && stdout.contains("the flow panics"), "{stdout}");
    assert_nothing_left(tmp.path());
}

/// Starts the waiting flow, reporting to `api_url` if given, and returns once a task is
/// running, with the server's id of its flow run.
fn start_waiting(tmp: &Path, api_url: Option<&str>) -> (std::process::Child, Option<Uuid>) {
    // Beside the child's directory, not in it: the tasks write it more than once.
    let marker = tmp.with_extension("task-started");
    let mut command = child_command("waiting", tmp);
    command.env("LIFECYCLE_MARKER", &marker).env_remove("PREFECT_API_URL");
    if let Some(url) = api_url {
        command.env("PREFECT_API_URL", url);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || BufReader::new(stderr).lines().for_each(drop));
    // The id, from a line of the child's stdout (after libtest's "test child ... ").
    let (id_sender, id) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, id)) = line.split_once("SERVER_FLOW_RUN=") {
                let _ = id_sender.send(id.trim().parse::<Uuid>().unwrap());
            }
        }
    });
    let flow_run =
        api_url.map(|_| id.recv_timeout(Duration::from_secs(120)).expect("the child printed its flow run's id"));
    assert!(eventually(Duration::from_secs(120), || marker.exists()), "the task started");
    (child, flow_run)
}

/// Interrupts a flow that reports to a Prefect server; checks that Ray is gone and that the
/// server has the flow run and all three task runs (two running, one waiting) Crashed.
fn interrupt(signal: i32) {
    let own =
        std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().expect("a Prefect test server"));
    let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
    let tmp = scratch();
    let (mut child, flow_run) = start_waiting(tmp.path(), Some(&api_url));
    let flow_run = flow_run.unwrap();
    // SAFETY: sends a signal to our own child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "the interrupted program did not claim success");
    assert_nothing_left(tmp.path());
    std::fs::remove_file(tmp.path().with_extension("task-started")).unwrap();

    // What the server has once the program is gone: nothing Running or Pending.
    let client = Client::new(&api_url);
    let run: serde_json::Value = client.get(&format!("/flow_runs/{flow_run}")).unwrap();
    assert_eq!(run["state_type"], "CRASHED", "{run:#}");
    assert!(run["state"]["message"].as_str().unwrap_or("").contains("interrupted"), "{run:#}");
    let filter = serde_json::json!({"flow_runs": {"id": {"any_": [flow_run]}}});
    let mut states = Vec::new();
    let recorded = eventually(Duration::from_secs(30), || {
        let runs: serde_json::Value = client.post("/task_runs/filter", &filter).unwrap();
        states =
            runs.as_array().unwrap().iter().map(|run| run["state_type"].as_str().unwrap_or("").to_owned()).collect();
        states.len() == 3 && states.iter().all(|state| state == "CRASHED")
    });
    assert!(recorded, "every task run ended Crashed on the server: {states:?}");
}

#[test]
fn ctrl_c_tears_the_instance_down_and_ends_the_runs_on_the_server() {
    interrupt(libc::SIGINT);
}

#[test]
fn sigterm_tears_the_instance_down_and_ends_the_runs_on_the_server() {
    interrupt(libc::SIGTERM);
}

#[test]
fn killing_the_driver_outright_still_ends_the_instance() {
    let tmp = scratch();
    let (mut child, _) = start_waiting(tmp.path(), None);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_nothing_left(tmp.path());
    std::fs::remove_file(tmp.path().with_extension("task-started")).unwrap();
}
