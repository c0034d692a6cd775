//! Log lines are attributed to their flow run and task run, in Prefect's format.

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};

use prefect::{flow, task};
use tracing_subscriber::prelude::*;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[task]
fn say(word: String) -> usize {
    tracing::info!("saying {word}");
    word.len()
}

#[flow]
fn chatter() -> (String, String) {
    let future = say.submit("hello".to_owned());
    future.wait(None);
    (prefect::runtime::flow_run().unwrap().name, future.task_run_name().to_owned())
}

#[test]
fn events_carry_their_run_and_runs_log_start_and_final_state() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::registry().with(prefect::logging::layer()).with(
        tracing_subscriber::fmt::layer()
            .event_format(prefect::logging::PrefectFormat)
            .with_writer(move || writer.clone()),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let (flow_run, task_run) = chatter().unwrap();

    let output = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let expected = [
        format!("| INFO    | Flow run '{flow_run}' - Beginning flow run '{flow_run}' for flow 'chatter'"),
        format!("| INFO    | Task run '{task_run}' - saying hello"),
        format!("| INFO    | Task run '{task_run}' - Finished in state Completed()"),
        format!("| INFO    | Flow run '{flow_run}' - Finished in state Completed()"),
    ];
    let mut rest = output.as_str();
    for line in &expected {
        let at = rest.find(line.as_str()).unwrap_or_else(|| panic!("missing or out of order: {line}\n{output}"));
        rest = &rest[at + line.len()..];
    }
}

/// Runs `chatter` in a child process that installs no subscriber of its own.
#[test]
#[ignore = "run by default_subscriber_is_readable, in a process of its own"]
fn child_runs_a_flow_without_a_subscriber() {
    chatter().unwrap();
}

#[test]
fn default_subscriber_is_readable() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_runs_a_flow_without_a_subscriber", "--ignored", "--nocapture"])
        .env_remove("RUST_LOG")
        .env_remove("PREFECT_LOGGING_LEVEL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("| INFO    | Flow run '") && stderr.contains("' - Beginning flow run '"), "{stderr}");
    assert!(stderr.contains("- saying hello"), "{stderr}");
    assert!(stderr.contains("| INFO    | Task run 'say-"), "{stderr}");
}
