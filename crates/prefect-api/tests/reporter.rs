//! How the reporter talks to a server that is busy: it retries, batches, and keeps order.
//! A stand-in server on loopback answers here, so that it can be busy on purpose; the tests
//! of the `prefect` crate run against a real Prefect server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prefect_api::{Client, Event, NewFlowRun, Reporter, StateCreate, task_run_state_event};
use serde_json::{Value, json};
use uuid::Uuid;

/// The requests a stand-in server received: path and JSON body, in order.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// Serves on 127.0.0.1 until the test ends; `answer` gives the status and body of each
/// request, given how many requests to the same path came before it.
fn stand_in(answer: fn(&str, usize) -> (u16, Value)) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let before = {
                let mut seen = log.lock().unwrap();
                let before = seen.iter().filter(|(p, _)| *p == path).count();
                seen.push((path.clone(), body));
                before
            };
            let (status, answer) = answer(&path, before);
            let answer = answer.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (url, seen)
}

fn flow_run(local_id: Uuid) -> NewFlowRun {
    NewFlowRun {
        local_id,
        flow_name: "stand-in".into(),
        name: "busy-bee".into(),
        parameters: json!({"n": 1}),
        retries: 0,
        retry_delay_seconds: 0.0,
        tags: vec![],
        parent: None,
    }
}

fn event(index: usize) -> Event {
    let task_run = json!({"name": format!("t-{index}"), "task_key": "t", "dynamic_key": index.to_string()});
    task_run_state_event(
        Uuid::new_v4(),
        "t",
        chrono::Utc::now(),
        &StateCreate::new("COMPLETED", "Completed"),
        task_run,
        &[],
    )
}

#[test]
fn busy_answers_are_retried_and_events_go_out_in_batches_after_their_flow_run() {
    let server_run = Uuid::new_v4();
    static SERVER_RUN: Mutex<Option<Uuid>> = Mutex::new(None);
    *SERVER_RUN.lock().unwrap() = Some(server_run);
    let (url, seen) = stand_in(|path, before| match path {
        "/api/flows/" => (201, json!({"id": Uuid::new_v4()})),
        "/api/flow_runs/" => (201, json!({"id": SERVER_RUN.lock().unwrap().unwrap()})),
        "/api/events" if before < 2 => (503, json!({"exception_message": "Service Unavailable"})),
        _ => (204, Value::Null),
    });
    let reporter = Reporter::new(Client::new(url));
    let local = Uuid::new_v4();
    // Without waiting for the flow run: what is queued after it waits its turn.
    assert_eq!(reporter.create_flow_run(flow_run(local), Duration::ZERO), None);
    for index in 0..1200 {
        reporter.emit(Some(local), event(index));
    }
    assert!(reporter.flush(Duration::from_secs(20)), "delivered in time");
    assert_eq!(reporter.server_flow_run_id(local), Some(server_run));

    let seen = seen.lock().unwrap();
    let paths: Vec<&str> = seen.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(&paths[..2], ["/api/flows/", "/api/flow_runs/"], "the flow run first: {paths:?}");
    let batches: Vec<&Vec<Value>> =
        seen.iter().filter(|(path, _)| path == "/api/events").map(|(_, body)| body.as_array().unwrap()).collect();
    // The first batch was refused twice and sent again.
    assert_eq!(batches[0], batches[1]);
    assert_eq!(batches[1], batches[2]);
    let delivered: Vec<&Value> = batches[2..].iter().flat_map(|batch| batch.iter()).collect();
    assert_eq!(delivered.len(), 1200, "each event once");
    assert!(batches.iter().all(|batch| batch.len() <= 500), "at most 500 a request");
    let names: Vec<&str> = delivered.iter().map(|e| e["payload"]["task_run"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, (0..1200).map(|i| format!("t-{i}")).collect::<Vec<_>>(), "in order");
    let flow_run_resource = &delivered[0]["related"][0];
    assert_eq!(flow_run_resource["prefect.resource.id"], format!("prefect.flow-run.{server_run}"));
    assert_eq!(flow_run_resource["prefect.resource.role"], "flow-run");
    assert_eq!(reporter.dropped(), 0);
    assert!(reporter.is_reachable());
}

#[test]
fn work_for_a_flow_run_the_server_does_not_know_is_dropped() {
    let (url, seen) = stand_in(|_, _| (500, json!({"exception_message": "Internal Server Error"})));
    let reporter = Reporter::new(Client::new(url));
    let local = Uuid::new_v4();
    assert_eq!(reporter.create_flow_run(flow_run(local), Duration::from_secs(10)), None);
    reporter.emit(Some(local), event(0));
    assert!(reporter.flush(Duration::from_secs(10)));
    assert_eq!(reporter.dropped(), 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "a 500 is not retried, and nothing follows a failed flow run: {seen:?}");
}
