//! A temporary Ray instance lives exactly as long as its flow run: it is torn down when the
//! run ends, however it ends (success, failure, panic, Ctrl-C, SIGTERM, or the driver being
//! killed), and no Ray process or file of it survives.
//!
//! Each flow runs in a child process (this test binary, running one ignored test) whose
//! temporary directory is a fresh one of the test's, so everything the run started can be
//! found by that directory's name.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use prefect::{flow, task};
use prefect_ray::RayTaskRunner;
use support::{eventually, max_overlap, now, processes_mentioning};

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

#[flow(task_runner = two_cpus())]
fn waiting_forever(marker: String) {
    sleep_forever.submit(marker).wait(None);
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

/// Starts the waiting flow, and returns once its task is running.
fn start_waiting(tmp: &Path) -> std::process::Child {
    let marker = tmp.join("task-started");
    let mut child = child_command("waiting", tmp)
        .env("LIFECYCLE_MARKER", &marker)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || BufReader::new(stderr).lines().for_each(drop));
    assert!(eventually(Duration::from_secs(120), || marker.exists()), "the task started");
    std::fs::remove_file(&marker).unwrap();
    child
}

fn interrupt(signal: i32) {
    let tmp = scratch();
    let mut child = start_waiting(tmp.path());
    // SAFETY: sends a signal to our own child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "the interrupted program did not claim success");
    assert_nothing_left(tmp.path());
}

#[test]
fn ctrl_c_tears_the_instance_down() {
    interrupt(libc::SIGINT);
}

#[test]
fn sigterm_tears_the_instance_down() {
    interrupt(libc::SIGTERM);
}

#[test]
fn killing_the_driver_outright_still_ends_the_instance() {
    let tmp = scratch();
    let mut child = start_waiting(tmp.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_nothing_left(tmp.path());
}
