//! Artifacts that tasks and flows publish reach a real Prefect server (3.9.1), attributed to
//! their run: markdown, tables, links, and the progress a task says.

mod prefect_server;

use prefect::artifacts::{create_link_artifact, create_markdown_artifact, create_table_artifact};
use prefect::{flow, task};
use prefect_server::server;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Serialize)]
struct Row {
    table: &'static str,
    rows: u32,
}

#[task]
fn load(rows: u32) {
    create_markdown_artifact("# Loaded\nAll rows are in.", Some("load-report"), Some("What *load* did")).unwrap();
    create_table_artifact(&[Row { table: "users", rows }, Row { table: "orders", rows: rows * 2 }], None, None)
        .unwrap();
    create_link_artifact("https://example.com/users", Some("Users"), None, None).unwrap();
    prefect::progress(1.0);
}

#[flow]
fn nightly(rows: u32) -> (Uuid, Uuid) {
    create_markdown_artifact("Flow-level summary", None, None).unwrap();
    let loaded = load.submit(rows);
    loaded.result().unwrap();
    (loaded.task_run_id(), prefect::runtime::flow_run().unwrap().id)
}

fn artifacts(client: &prefect::reporting::api::Client, filter: Value) -> Vec<Value> {
    let mut found = client.post("/artifacts/filter", &json!({"artifacts": filter, "sort": "CREATED_DESC"})).unwrap();
    found.as_array_mut().map(std::mem::take).unwrap_or_default()
}

#[test]
fn a_tasks_and_a_flows_artifacts_reach_the_server_attributed_to_their_runs() {
    let server = server();
    let (task_run, flow_run) = nightly(7).unwrap();

    let of_task = artifacts(&server.client, json!({"task_run_id": {"any_": [task_run]}}));
    let kinds: Vec<&str> = of_task.iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|kind| **kind == "markdown").count(), 2, "{of_task:#?}");
    assert_eq!(kinds.iter().filter(|kind| **kind == "table").count(), 1, "{of_task:#?}");
    assert_eq!(kinds.iter().filter(|kind| **kind == "progress").count(), 1, "{of_task:#?}");
    for artifact in &of_task {
        assert_eq!(artifact["flow_run_id"], flow_run.to_string(), "{artifact}");
    }
    let report = of_task.iter().find(|a| a["key"] == "load-report").expect("the keyed markdown artifact");
    assert_eq!(report["data"], "# Loaded\nAll rows are in.");
    assert_eq!(report["description"], "What *load* did");
    let table = of_task.iter().find(|a| a["type"] == "table").unwrap();
    let rows: Value = serde_json::from_str(table["data"].as_str().unwrap()).unwrap();
    assert_eq!(rows, json!([{"table": "users", "rows": 7}, {"table": "orders", "rows": 14}]));
    assert!(of_task.iter().any(|a| a["data"] == "[Users](https://example.com/users)"), "{of_task:#?}");

    // The flow's own artifact belongs to the flow run and no task run.
    let of_flow = artifacts(&server.client, json!({"flow_run_id": {"any_": [flow_run]}}));
    let summary = of_flow.iter().find(|a| a["data"] == "Flow-level summary").expect("the flow's artifact");
    assert_eq!(summary["task_run_id"], Value::Null);

    // The key keeps the latest under it, as the UI's Artifacts page shows.
    let latest = server.client.get("/artifacts/load-report/latest").unwrap();
    assert_eq!(latest["task_run_id"], task_run.to_string());
}
