//! Task runs on Ray reach a real Prefect server with the times they ran on the worker.
//! `cargo xtask test` passes its shared Prefect server in `PREFECT_TEST_API_URL` and its Ray
//! cluster in `PREFECT_RAY_TEST_CLUSTER`; without them this test starts its own server and
//! runs on a temporary Ray instance.

mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prefect::reporting::api::Client;
use prefect::reporting::api::testing::TestServer;
use prefect::{flow, task};
use prefect_ray::RayTaskRunner;
use serde_json::{Value, json};
use support::{SHARED_CLUSTER_ENV, cluster, now};
use uuid::Uuid;

/// Sleeps, and says when it ran by the worker's clock (seconds since the epoch).
#[task(tags = ["ray"])]
fn nap(millis: u64) -> (f64, f64) {
    let start = now();
    println!("napping {millis} ms");
    std::thread::sleep(Duration::from_millis(millis));
    (start, now())
}

#[task]
fn span(times: Vec<(f64, f64)>) -> f64 {
    times.iter().map(|t| t.1).fold(0.0, f64::max) - times.iter().map(|t| t.0).fold(f64::MAX, f64::min)
}

/// The shared test cluster, or a temporary Ray instance.
fn ray() -> RayTaskRunner {
    match std::env::var(SHARED_CLUSTER_ENV) {
        Ok(_) => cluster().runner(),
        Err(_) => RayTaskRunner::new(),
    }
}

/// A nap's task run, and when it ran by its own account.
type Nap = (Uuid, (f64, f64));

fn seconds(value: &Value) -> f64 {
    let text = value.as_str().unwrap_or_else(|| panic!("expected a time, got {value}"));
    let time: DateTime<Utc> = DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc);
    time.timestamp_micros() as f64 / 1e6
}

#[test]
fn task_runs_on_ray_are_reported_with_the_times_they_ran_on_the_worker() {
    let own =
        std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().expect("a Prefect test server"));
    let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
    let reporting = prefect::reporting::connect(&api_url, None).unwrap();
    let client = Client::new(&api_url);

    #[flow(task_runner = ray())]
    fn on_ray() -> (Uuid, Vec<Nap>, Uuid) {
        let naps: Vec<_> = [300, 600].into_iter().map(|millis| nap.submit(millis)).collect();
        let total = span.submit(&naps[..]);
        total.wait(None);
        let times = naps.iter().map(|f| (f.task_run_id(), f.result().unwrap())).collect();
        (prefect::runtime::flow_run().unwrap().id, times, total.task_run_id())
    }
    let (local, naps, total) = on_ray().unwrap();
    let flow_run = reporting.server_flow_run_id(local).expect("the flow run was created on the server");
    assert_eq!(client.get(&format!("/flow_runs/{flow_run}")).unwrap()["state_name"], "Completed");

    let deadline = Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let body = json!({"flow_runs": {"id": {"any_": [flow_run]}}});
        let runs = client.post("/task_runs/filter", &body).unwrap().as_array().cloned().unwrap_or_default();
        if runs.len() == 3 && runs.iter().all(|run| run["state_type"] == "COMPLETED") {
            break runs;
        }
        assert!(Instant::now() < deadline, "the server has: {runs:#?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let find = |id: Uuid| runs.iter().find(|run| run["id"] == id.to_string()).unwrap();
    for (id, (started, ended)) in &naps {
        let run = find(*id);
        assert_eq!(run["tags"], json!(["ray"]));
        // The task took its own times inside the run; the run's times bracket them closely.
        let (start, end) = (seconds(&run["start_time"]), seconds(&run["end_time"]));
        assert!(start <= *started && started - start < 0.5, "start {start} vs the task's own {started}");
        assert!(end >= *ended && end - ended < 0.5, "end {end} vs the task's own {ended}");
        let ran = run["total_run_time"].as_f64().unwrap();
        assert!((ran - (end - start)).abs() < 0.01, "{run}");
    }
    let total_run = find(total);
    let inputs: Vec<&str> =
        total_run["task_inputs"]["times"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(inputs, naps.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>());

    // Output printed on the worker is a log line of its task run, at the worker's time.
    let body = json!({"logs": {"flow_run_id": {"any_": [flow_run]}}, "limit": 200});
    let logs = client.post("/logs/filter", &body).unwrap();
    let (nap_id, (started, _)) = naps[0];
    let printed = logs
        .as_array()
        .unwrap()
        .iter()
        .find(|log| log["message"] == "napping 300 ms")
        .unwrap_or_else(|| panic!("{logs:#}"));
    assert_eq!(printed["task_run_id"], nap_id.to_string());
    assert!((seconds(&printed["timestamp"]) - started).abs() < 0.5, "{printed}");
}

#[task]
fn long_nap(seconds: u64) {
    std::thread::sleep(Duration::from_secs(seconds));
}

/// A program started by hand with a server, whose run is cancelled from the UI or the CLI:
/// unlike Prefect's own client, the run stops, its tasks on Ray with it.
#[test]
fn an_ad_hoc_run_cancelled_on_the_server_stops_and_ends_cancelled() {
    let own =
        std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().expect("a Prefect test server"));
    let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
    prefect::reporting::connect(&api_url, None).unwrap();
    let client = Client::new(&api_url);

    #[flow(task_runner = RayTaskRunner::new())]
    fn napping(ids: std::sync::mpsc::Sender<Uuid>) -> Vec<String> {
        ids.send(prefect::runtime::flow_run().unwrap().id).unwrap();
        let naps: Vec<_> = (0..2).map(|_| long_nap.submit(60)).collect();
        naps.iter().map(|future| future.state().name.into_owned()).collect()
    }
    let (ids, id) = std::sync::mpsc::channel();
    let flow = std::thread::spawn(move || napping(ids));
    let flow_run = id.recv().unwrap();
    assert!(
        support::eventually(Duration::from_secs(120), || support::executors_below(std::process::id()).len() == 2),
        "the naps did not start"
    );

    let cancelled_at = Instant::now();
    let cancelling = json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": false});
    client.post(&format!("/flow_runs/{flow_run}/set_state"), &cancelling).unwrap();
    let error = flow.join().unwrap().unwrap_err();
    let took = cancelled_at.elapsed();
    assert!(matches!(error, prefect::FlowError::Cancelled { .. }), "{error}");
    assert!(took < Duration::from_secs(10), "cancelling took {took:?}");
    assert_eq!(client.read_flow_run(flow_run).unwrap().state_type(), "CANCELLED");
    assert!(
        support::eventually(Duration::from_secs(30), || {
            let body = json!({"flow_runs": {"id": {"any_": [flow_run]}}});
            let runs = client.post("/task_runs/filter", &body).unwrap();
            let runs = runs.as_array().unwrap().clone();
            runs.len() == 2 && runs.iter().all(|run| run["state_type"] == "CANCELLED")
        }),
        "the naps end Cancelled on the server"
    );
    assert!(support::executors_below(std::process::id()).is_empty(), "the naps' executors are gone");
}

/// Publishes one artifact of each kind from the worker.
#[task]
fn publish(rows: u32) -> u32 {
    use prefect::artifacts::{create_link_artifact, create_markdown_artifact, create_table_artifact};
    create_markdown_artifact("# From a Ray worker", Some("ray-worker-report"), None).unwrap();
    create_table_artifact(&json!({"worker": [std::process::id()], "rows": [rows]}), None, None).unwrap();
    create_link_artifact("https://docs.ray.io", Some("Ray"), None, Some("Where it ran")).unwrap();
    rows
}

/// Artifacts made by a task on a Ray worker reach the server through the program, as the
/// task run's, with the flow run's id: the worker needs no route to the server.
#[test]
fn artifacts_made_on_a_ray_worker_reach_the_server_as_the_task_runs() {
    let own =
        std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().expect("a Prefect test server"));
    let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
    let reporting = prefect::reporting::connect(&api_url, None).unwrap();
    let client = Client::new(&api_url);

    #[flow(task_runner = ray())]
    fn publishing() -> (Uuid, Uuid, u32) {
        let future = publish.submit(3);
        let rows = future.result().unwrap();
        (prefect::runtime::flow_run().unwrap().id, future.task_run_id(), rows)
    }
    let (local, task_run, rows) = publishing().unwrap();
    assert_eq!(rows, 3);
    let flow_run = reporting.server_flow_run_id(local).unwrap();
    let body = json!({"artifacts": {"task_run_id": {"any_": [task_run]}}});
    let artifacts = client.post("/artifacts/filter", &body).unwrap().as_array().cloned().unwrap_or_default();
    assert_eq!(artifacts.len(), 3, "{artifacts:#?}");
    assert!(artifacts.iter().all(|a| a["flow_run_id"] == flow_run.to_string()), "{artifacts:#?}");
    let markdown = artifacts.iter().find(|a| a["key"] == "ray-worker-report").expect("the keyed artifact");
    assert_eq!(markdown["data"], "# From a Ray worker");
    let table = artifacts.iter().find(|a| a["type"] == "table").expect("the table");
    let columns: serde_json::Value = serde_json::from_str(table["data"].as_str().unwrap()).unwrap();
    assert_eq!(columns["rows"], json!([3]));
    assert_ne!(columns["worker"][0], json!(std::process::id()), "made in the executor, not the program");
    let link = artifacts.iter().find(|a| a["description"] == "Where it ran").expect("the link");
    assert_eq!(link["data"], "[Ray](https://docs.ray.io)");
}
