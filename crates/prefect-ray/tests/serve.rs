//! Rust flows served as Prefect deployments, against a real Prefect server: runs created
//! through the REST API, the `prefect` CLI and a schedule execute in child processes with
//! the server's parameters; a parameter that does not fit fails its run; a dead run process
//! leaves its run `Crashed`; a run cancelled on the server stops its tasks on Ray and ends
//! `Cancelled`, with nothing of it left; Ctrl-C stops serving.
//!
//! The serving program is this test binary: `serving_program`, an ignored test that each
//! test starts in a child process, serves the deployments it names.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prefect::reporting::api::testing::{TestServer, prefect_bin};
use prefect::reporting::api::{Client, FlowRunRead};
use prefect::{flow, task};
use prefect_ray::RayTaskRunner;
use serde_json::{Value, json};
use support::{SHARED_CLUSTER_ENV, cluster, descendants, eventually, executors_below};
use uuid::Uuid;

/// Which deployments `serving_program` serves: each test its own, so tests that share a
/// server never take each other's runs.
const DEPLOYMENTS_ENV: &str = "PREFECT_RAY_TEST_SERVED";

#[task]
fn shout(number: u32) -> u32 {
    println!("#{number}");
    number
}

/// The shared test cluster, or a temporary Ray instance.
fn ray() -> RayTaskRunner {
    match std::env::var(SHARED_CLUSTER_ENV) {
        Ok(_) => cluster().runner(),
        Err(_) => RayTaskRunner::new(),
    }
}

/// Counts to a number on Ray, and adds up what it counted.
#[flow(task_runner = ray())]
fn count_to(highest_number: u32, label: Option<String>) -> u32 {
    let numbers = shout.map(0..highest_number);
    let total = numbers.into_iter().map(|number| number.result().unwrap()).sum();
    println!("{}: {total}", label.unwrap_or_default());
    total
}

#[task]
fn nap(seconds: u64) {
    std::thread::sleep(Duration::from_secs(seconds));
}

/// Naps on a temporary Ray instance: long enough that only cancellation ends it.
#[flow(task_runner = RayTaskRunner::new())]
fn long_naps(naps: u32) {
    let naps: Vec<_> = (0..naps).map(|_| nap.submit(60)).collect();
    prefect::wait(&naps, None);
}

/// Fails its first attempt in a process, completes the next.
#[flow]
fn flaky() -> u32 {
    static ATTEMPTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    match ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => panic!("the first attempt fails"),
        attempt => attempt + 1,
    }
}

#[task]
fn step(number: u32) -> u32 {
    std::thread::sleep(Duration::from_millis(300));
    number
}

/// Takes `count` steps, one after another.
#[flow]
fn steps(count: u32) -> u32 {
    (0..count).map(|number| step.submit(number).result().unwrap()).sum()
}

/// Dies without a word.
#[flow]
fn doomed() {
    std::process::abort();
}

#[test]
#[ignore = "the serving program of the tests in this file, which start it"]
fn serving_program() {
    let deployments = match std::env::var(DEPLOYMENTS_ENV).as_deref() {
        Ok("runs") => vec![
            count_to::to_deployment("counting").parameter("highest_number", 3).enforce_parameter_schema(false),
            count_to::to_deployment("hourly").interval(Duration::from_secs(3600)).parameter("highest_number", 2),
            doomed::to_deployment("doomed"),
        ],
        Ok("cancel") => vec![long_naps::to_deployment("napping")],
        Ok("orchestration") => vec![
            flaky::to_deployment("flaky"),
            steps::to_deployment("stepping"),
            steps::to_deployment("one-at-a-time").concurrency_limit(1),
        ],
        other => panic!("{DEPLOYMENTS_ENV} names no deployments: {other:?}"),
    };
    prefect::serve(deployments).unwrap();
}

/// The serving program, started; interrupted and awaited on drop.
struct Serving {
    child: Child,
    client: Client,
    _own: Option<TestServer>,
    api_url: String,
}

impl Serving {
    fn start(deployments: &str) -> Self {
        let own =
            std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().expect("a Prefect test server"));
        let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "serving_program", "--ignored", "--nocapture"])
            .env(DEPLOYMENTS_ENV, deployments)
            .env("PREFECT_API_URL", &api_url)
            .env("PREFECT_RUNNER_POLL_FREQUENCY", "0.5")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, client: Client::new(&api_url), _own: own, api_url }
    }

    /// The deployment's id, once the serving program has registered it.
    fn deployment(&self, full_name: &str) -> Uuid {
        let mut id = None;
        let registered = eventually(Duration::from_secs(60), || {
            id = self
                .client
                .get(&format!("/deployments/name/{full_name}"))
                .ok()
                .and_then(|d| d["id"].as_str()?.parse().ok());
            id.is_some()
        });
        assert!(registered, "deployment {full_name} was not registered");
        id.unwrap()
    }

    fn run(&self, deployment: Uuid, parameters: Value) -> Uuid {
        let Value::Object(parameters) = parameters else { panic!("parameters are an object") };
        self.client.create_deployment_flow_run(deployment, parameters).unwrap().id
    }

    /// Waits up to `limit` for the run to reach a final state, and returns it.
    fn final_state(&self, run: Uuid, limit: Duration) -> FlowRunRead {
        let mut read = None;
        let ended = eventually(limit, || {
            read = self.client.read_flow_run(run).ok();
            read.as_ref().is_some_and(|r| ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"].contains(&r.state_type()))
        });
        assert!(ended, "flow run {run} did not end within {limit:?}: {read:?}");
        read.unwrap()
    }

    fn task_run_states(&self, run: Uuid) -> Vec<String> {
        let body = json!({"flow_runs": {"id": {"any_": [run]}}});
        let runs = self.client.post("/task_runs/filter", &body).unwrap();
        runs.as_array().unwrap().iter().map(|r| r["state_type"].as_str().unwrap_or("").to_owned()).collect()
    }

    fn logs(&self, run: Uuid) -> Vec<String> {
        let body = json!({"logs": {"flow_run_id": {"any_": [run]}}, "limit": 200});
        let logs = self.client.post("/logs/filter", &body).unwrap();
        logs.as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap_or("").to_owned()).collect()
    }

    /// Ctrl-C, as a user would: the program stops serving and exits cleanly.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGINT);
        let mut status = None;
        let exited = eventually(Duration::from_secs(30), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        assert!(exited, "the serving program did not stop on Ctrl-C");
        status.unwrap()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), libc::SIGINT);
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: signals a child process of this test.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

#[test]
fn runs_from_the_api_the_cli_and_a_schedule_execute_with_the_servers_parameters() {
    let mut serving = Serving::start("runs");
    let counting = serving.deployment("count-to/counting");

    // The deployment carries the flow's parameters as a schema, and its doc comment.
    let deployment = serving.client.get(&format!("/deployments/{counting}")).unwrap();
    let schema = &deployment["parameter_openapi_schema"];
    assert_eq!(schema["properties"]["highest_number"]["type"], "integer", "{schema}");
    assert_eq!(schema["required"], json!(["highest_number"]), "{schema}");
    assert_eq!(deployment["description"], "Counts to a number on Ray, and adds up what it counted.");
    assert_eq!(deployment["parameters"], json!({"highest_number": 3}));

    // From the REST API, with the server's parameters over the deployment's defaults.
    let from_api = serving.run(counting, json!({"highest_number": 5, "label": "api"}));
    let read = serving.final_state(from_api, Duration::from_secs(120));
    assert_eq!(read.state_type(), "COMPLETED", "{read:?}");
    assert_eq!(Value::Object(read.parameters.clone()), json!({"highest_number": 5, "label": "api"}));
    let states = serving.task_run_states(from_api);
    assert!(
        eventually(Duration::from_secs(30), || {
            let states = serving.task_run_states(from_api);
            states.len() == 5 && states.iter().all(|s| s == "COMPLETED")
        }),
        "{states:?}"
    );
    assert!(
        eventually(Duration::from_secs(30), || serving.logs(from_api).iter().any(|line| line == "#4")),
        "the run's output reached the server: {:?}",
        serving.logs(from_api)
    );

    // From the CLI, as a user would.
    let cli = Command::new(prefect_bin())
        .args(["deployment", "run", "count-to/counting", "-p", "highest_number=4"])
        .env("PREFECT_API_URL", &serving.api_url)
        .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        .env("DO_NOT_TRACK", "1")
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let text = String::from_utf8_lossy(&cli.stdout);
    let from_cli: Uuid = text
        .split_whitespace()
        .find_map(|word| word.trim_matches(|c: char| !c.is_ascii_hexdigit() && c != '-').parse().ok())
        .unwrap_or_else(|| panic!("the CLI names the run's id: {text}"));
    let read = serving.final_state(from_cli, Duration::from_secs(120));
    assert_eq!(read.state_type(), "COMPLETED", "{read:?}");
    assert_eq!(read.parameters["highest_number"], 4);

    // A parameter that does not fit the flow's type fails that run, naming the parameter.
    let misfit = serving.run(counting, json!({"highest_number": "many"}));
    let read = serving.final_state(misfit, Duration::from_secs(60));
    assert_eq!(read.state_type(), "FAILED", "{read:?}");
    let message = read.state.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
    assert!(message.contains("parameter 'highest_number'") && message.contains("u32"), "{message}");

    // A run whose process dies ends Crashed, saying how it died; serving goes on.
    let doomed = serving.deployment("doomed/doomed");
    let crashed = serving.run(doomed, json!({}));
    let read = serving.final_state(crashed, Duration::from_secs(60));
    assert_eq!(read.state_type(), "CRASHED", "{read:?}");
    let message = read.state.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
    assert!(message.contains("killed by signal 6"), "{message}");

    // A schedule's run: the test server's scheduler service is off, so the test asks the
    // server to create the schedule's runs, as that service would.
    let hourly = serving.deployment("count-to/hourly");
    let deployment = serving.client.get(&format!("/deployments/{hourly}")).unwrap();
    assert_eq!(deployment["schedules"][0]["schedule"]["interval"], 3600.0, "{deployment}");
    let soon = chrono::Utc::now() + chrono::TimeDelta::seconds(2);
    let body = json!({"start_time": chrono::Utc::now() - chrono::TimeDelta::hours(1), "end_time": soon, "max_runs": 1, "min_runs": 1});
    serving.client.post(&format!("/deployments/{hourly}/schedule"), &body).unwrap();
    let filter = json!({"deployments": {"id": {"any_": [hourly]}}});
    let mut scheduled: Vec<FlowRunRead> = Vec::new();
    assert!(eventually(Duration::from_secs(30), || {
        scheduled = serving.client.read_flow_runs(&filter).unwrap();
        !scheduled.is_empty()
    }));
    let read = serving.final_state(scheduled[0].id, Duration::from_secs(120));
    assert_eq!(read.state_type(), "COMPLETED", "{read:?}");

    // Ctrl-C stops serving cleanly, with nothing of it left.
    let pid = serving.child.id();
    let status = serving.interrupt();
    assert!(status.success(), "{status:?}");
    assert!(descendants(pid).is_empty());
}

#[test]
fn a_run_cancelled_on_the_server_stops_its_tasks_on_ray_and_ends_cancelled() {
    let serving = Serving::start("cancel");
    let napping = serving.deployment("long-naps/napping");
    let run = serving.run(napping, json!({"naps": 2}));

    // Wait until both naps run on Ray: two executors (this binary, below a Ray worker).
    assert!(
        eventually(Duration::from_secs(120), || executors_below(serving.child.id()).len() == 2),
        "the naps did not start: {:?}",
        serving.task_run_states(run)
    );

    // Cancel as `prefect flow-run cancel` does.
    let cancelled_at = Instant::now();
    let cancelling = json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": false});
    serving.client.post(&format!("/flow_runs/{run}/set_state"), &cancelling).unwrap();
    let read = serving.final_state(run, Duration::from_secs(30));
    let took = cancelled_at.elapsed();
    assert_eq!(read.state_type(), "CANCELLED", "{read:?}");
    assert!(took < Duration::from_secs(10), "cancelling took {took:?}");
    assert!(
        eventually(Duration::from_secs(30), || serving.task_run_states(run).iter().all(|s| s == "CANCELLED")),
        "{:?}",
        serving.task_run_states(run)
    );
    // The run's process, its temporary Ray instance, workers and executors are gone.
    assert!(
        eventually(Duration::from_secs(30), || descendants(serving.child.id()).is_empty()),
        "left: {:?}",
        descendants(serving.child.id())
    );
}

#[test]
fn served_runs_follow_the_servers_retries_and_pauses() {
    let serving = Serving::start("orchestration");

    // A run the server gives retries of its own: the failed attempt's Failed is rejected
    // into AwaitingRetry, and the flow runs again in the same process.
    let flaky = serving.deployment("flaky/flaky");
    let body = json!({"parameters": {}, "empirical_policy": {"retries": 1, "retry_delay": 0}});
    let run: Uuid = serving.client.post(&format!("/deployments/{flaky}/create_flow_run"), &body).unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let read = serving.final_state(run, Duration::from_secs(60));
    assert_eq!(read.state_type(), "COMPLETED", "{read:?}");
    let history = serving.client.get(&format!("/flow_run_states/?flow_run_id={run}")).unwrap();
    let names: Vec<&str> = history.as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"AwaitingRetry") && names.contains(&"Retrying"), "{names:?}");

    // A run paused on the server submits nothing until it is resumed.
    let stepping = serving.deployment("steps/stepping");
    let run = serving.run(stepping, json!({"count": 12}));
    assert!(eventually(Duration::from_secs(60), || serving.task_run_states(run).len() >= 2), "the steps started");
    let paused_at = chrono::Utc::now();
    let pause = json!({"state": {"type": "PAUSED", "name": "Paused"}, "force": true});
    serving.client.post(&format!("/flow_runs/{run}/set_state"), &pause).unwrap();
    // The pause lasts a while, as a user's would; steps created in it would be a failure.
    std::thread::sleep(Duration::from_secs(4));
    let resumed_at = chrono::Utc::now();
    serving.client.post(&format!("/flow_runs/{run}/resume"), &json!({})).unwrap();
    let read = serving.final_state(run, Duration::from_secs(60));
    assert_eq!(read.state_type(), "COMPLETED", "{read:?}");
    assert_eq!(read.parameters["count"], 12);
    let body = json!({"flow_runs": {"id": {"any_": [run]}}});
    let mut created: Vec<chrono::DateTime<chrono::Utc>> = Vec::new();
    let recorded = eventually(Duration::from_secs(30), || {
        let runs = serving.client.post("/task_runs/filter", &body).unwrap();
        created = runs
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["expected_start_time"].as_str().unwrap().parse().unwrap())
            .collect();
        created.len() == 12
    });
    assert!(recorded, "the server recorded {} of 12 steps", created.len());
    // The watcher looks once a second, and one step may be on its way when it does.
    let noticed = paused_at + chrono::TimeDelta::milliseconds(1500);
    let during: Vec<_> = created.iter().filter(|at| **at > noticed && **at < resumed_at).collect();
    assert!(during.is_empty(), "steps created while paused: {during:?} (paused {paused_at}, resumed {resumed_at})");
    assert!(created.iter().any(|at| *at > resumed_at), "steps went on after the resume");
}

#[test]
fn a_deployments_concurrency_limit_holds_its_runs_one_at_a_time() {
    let serving = Serving::start("orchestration");
    let deployment = serving.deployment("steps/one-at-a-time");
    let runs: Vec<Uuid> = (0..3).map(|_| serving.run(deployment, json!({"count": 3}))).collect();
    let mut spans = Vec::new();
    for run in &runs {
        let read = serving.final_state(*run, Duration::from_secs(120));
        assert_eq!(read.state_type(), "COMPLETED", "{read:?}");
        let run = serving.client.get(&format!("/flow_runs/{run}")).unwrap();
        let time = |field: &str| -> chrono::DateTime<chrono::Utc> { run[field].as_str().unwrap().parse().unwrap() };
        spans.push((time("start_time"), time("end_time")));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "runs overlapped: {pair:?}");
    }
}
