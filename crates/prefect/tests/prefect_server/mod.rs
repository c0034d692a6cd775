//! A Prefect server to report to, and reading back what it recorded.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use prefect::reporting::api::Client;
use prefect::reporting::api::testing::TestServer;
use prefect::reporting::{self, Reporting};
use serde_json::{Value, json};
use uuid::Uuid;

/// The variable through which `cargo xtask test` hands the tests its shared server.
pub const SHARED_SERVER_ENV: &str = "PREFECT_TEST_API_URL";

/// A server that runs are reported to: the shared one, or one of this test's own.
pub struct Server {
    pub reporting: Reporting,
    pub client: Client,
    own: Option<TestServer>,
}

/// The shared test server if `cargo xtask test` started one, else a server of this test's own.
pub fn server() -> Server {
    match std::env::var(SHARED_SERVER_ENV) {
        Ok(url) => connect(&url),
        Err(_) => own_server(),
    }
}

/// A server of this test's own, stopped when the returned `Server` is dropped.
pub fn own_server() -> Server {
    let own = TestServer::start().expect("a Prefect test server starts");
    let mut server = connect(&own.api_url());
    server.own = Some(own);
    server
}

pub fn connect(url: &str) -> Server {
    let reporting = reporting::connect(url, None).expect("a valid API address");
    let client = Client::new(url);
    Server { reporting, client, own: None }
}

impl Server {
    /// This test's own server process, if it has one.
    pub fn own(&mut self) -> Option<&mut TestServer> {
        self.own.as_mut()
    }

    /// The server's id of a flow run of this process.
    pub fn flow_run_id(&self, local: Uuid) -> Uuid {
        self.reporting.server_flow_run_id(local).expect("the flow run was created on the server")
    }

    pub fn flow_run(&self, id: Uuid) -> Value {
        self.client.get(&format!("/flow_runs/{id}")).unwrap()
    }

    /// The flow run's states, oldest first.
    pub fn flow_run_states(&self, id: Uuid) -> Vec<Value> {
        sorted_by_time(self.client.get(&format!("/flow_run_states/?flow_run_id={id}")).unwrap())
    }

    /// The task run's states, oldest first, once the history has its current state (the
    /// server writes a run and its states apart).
    pub fn task_run_states(&self, id: Uuid) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let current = self.client.get(&format!("/task_runs/{id}")).unwrap()["state_id"].clone();
            let states = sorted_by_time(self.client.get(&format!("/task_run_states/?task_run_id={id}")).unwrap());
            if states.last().is_some_and(|state| state["id"] == current) || Instant::now() > deadline {
                return states;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The flow run's task runs, once `count` of them are recorded and all are final (the
    /// server records task runs from events, a moment after they arrive).
    pub fn task_runs(&self, flow_run: Uuid, count: usize) -> Vec<Value> {
        let mut last = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            last = self.all_task_runs(flow_run);
            let final_ = |run: &Value| {
                ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"].contains(&run["state_type"].as_str().unwrap_or(""))
                    || run["state_name"] == "NotReady"
            };
            // The server writes a run and its state apart: wait for both.
            let whole = |run: &Value| run["state"]["id"] == run["state_id"];
            if last.len() >= count && last.iter().all(|run| final_(run) && whole(run)) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("expected {count} final task runs of flow run {flow_run}, the server has: {last:#?}");
    }

    /// The flow run's task runs, as many as there are now, a page of 200 at a time.
    pub fn all_task_runs(&self, flow_run: Uuid) -> Vec<Value> {
        let mut runs = Vec::new();
        loop {
            let body = json!({
                "flow_runs": {"id": {"any_": [flow_run]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200, "offset": runs.len()
            });
            let page = self.client.post("/task_runs/filter", &body).unwrap().as_array().cloned().unwrap_or_default();
            let full = page.len() == 200;
            runs.extend(page);
            if !full {
                return runs;
            }
        }
    }

    /// The flow run's logs, oldest first.
    pub fn logs(&self, flow_run: Uuid) -> Vec<Value> {
        let body = json!({"logs": {"flow_run_id": {"any_": [flow_run]}}, "sort": "TIMESTAMP_ASC", "limit": 200});
        self.client.post("/logs/filter", &body).unwrap().as_array().cloned().unwrap_or_default()
    }

    /// Forces a flow run into `state` on the server, as a person in the UI would.
    pub fn force_state(&self, flow_run: Uuid, state: Value) {
        let answer = self
            .client
            .post(&format!("/flow_runs/{flow_run}/set_state"), &json!({"state": state, "force": true}))
            .unwrap();
        assert_eq!(answer["status"], "ACCEPT", "{answer}");
    }
}

fn sorted_by_time(value: Value) -> Vec<Value> {
    let mut states = value.as_array().cloned().unwrap_or_default();
    states.sort_by(|a, b| a["timestamp"].as_str().cmp(&b["timestamp"].as_str()));
    states
}

/// A time as the server writes it, parsed.
pub fn time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    let text = value.as_str().unwrap_or_else(|| panic!("expected a time, got {value}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&chrono::Utc)
}

/// The names of `runs`' `key` values, for readable assertions.
pub fn names(states: &[Value]) -> Vec<String> {
    states.iter().map(|state| state["name"].as_str().unwrap_or_default().to_owned()).collect()
}
