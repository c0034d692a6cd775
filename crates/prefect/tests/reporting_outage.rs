//! When the Prefect server goes away in the middle of a flow, the flow still finishes, soon,
//! and reporting says so once; when the server comes back, what the flow reported while it
//! was away arrives. A test binary of its own: it counts every warning the process logs,
//! and stops and restarts its own server.

mod prefect_server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefect::{flow, task};
use prefect_server::{Server, own_server};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Keeps the message of every warning.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: Subscriber> Layer<S> for Warnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == Level::WARN {
            let line = format!("{}: {}", event.metadata().target(), prefect::logging::event_message(event));
            self.0.lock().unwrap().push(line);
        }
    }
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

#[task]
fn step(index: u32) -> u32 {
    tracing::info!("step {index}");
    index
}

#[flow]
fn interrupted() -> Result<(uuid::Uuid, u32), prefect::TaskError> {
    let before: Vec<_> = (0..20).map(|i| step.submit(i)).collect();
    let mut sum = 0;
    for future in &before {
        sum += future.result()?;
    }
    // The server goes away mid-flow.
    SERVER.lock().unwrap().as_mut().and_then(Server::own).expect("the test's own server").stop();
    let after: Vec<_> = (20..40).map(|i| step.submit(i)).collect();
    for future in &after {
        sum += future.result()?;
    }
    Ok((prefect::runtime::flow_run().unwrap().id, sum))
}

#[flow]
fn later() -> Result<u32, prefect::TaskError> {
    step.submit(3).result()
}

#[test]
fn a_flow_finishes_when_its_server_stops_and_one_warning_says_so() {
    let warnings = Warnings::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(prefect::logging::layer()).with(warnings.clone()),
    )
    .unwrap();
    let server = own_server();
    let (reporting, client) = (server.reporting.clone(), server.client.clone());
    *SERVER.lock().unwrap() = Some(server);

    let started = Instant::now();
    let (local, sum) = interrupted().unwrap();
    assert_eq!(sum, (0..40).sum::<u32>());
    let took = started.elapsed();
    assert!(client.health().is_err(), "the server is really down");
    assert!(!reporting.is_reachable(), "the reporter noticed");
    assert!(took < Duration::from_secs(10), "the flow was not held up for long: {took:?}");
    let logged = warnings.0.lock().unwrap().clone();
    assert_eq!(logged.len(), 1, "{logged:#?}");
    assert!(logged[0].starts_with("prefect_api: could not reach the Prefect server"), "{logged:#?}");

    // A flow while the server is known to be down is not held up at all, and adds no warning.
    let started = Instant::now();
    assert_eq!(later().unwrap(), 3);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(warnings.0.lock().unwrap().len(), 1);
    eprintln!("the interrupted flow took {took:?}; the flow after it {:?}", started.elapsed());

    // The server comes back: the task runs and the flow run's end, reported while it was
    // away, arrive, and nothing stays Pending.
    let mut server = SERVER.lock().unwrap().take().unwrap();
    server.own().unwrap().restart().expect("the server starts again");
    let id = server.flow_run_id(local);
    let runs = server.task_runs(id, 40);
    let states: Vec<_> = runs.iter().map(|run| run["state_type"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(states, vec!["COMPLETED"; 40], "every task run ended on the server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.flow_run(id)["state_type"] != "COMPLETED" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.flow_run(id)["state_type"], "COMPLETED", "the flow run's end arrived");
    assert_eq!(warnings.0.lock().unwrap().len(), 1, "{:#?}", warnings.0.lock().unwrap());
}
