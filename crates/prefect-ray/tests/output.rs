//! What tasks print and log on Ray workers reaches the driver's console, attributed to the
//! task run, and nothing they write can corrupt the executor's protocol.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use prefect::{flow, task};
use support::{Cluster, cluster};
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
fn talk(number: u32) -> u32 {
    println!("hello from println {number}");
    eprintln!("warning from eprintln {number}");
    tracing::info!(answer = 42, "hello from tracing {number}");
    print!("no newline at the end {number}");
    number
}

#[task]
fn scribble() -> u32 {
    let mut stdout = std::io::stdout();
    stdout.write_all(&[0, 159, 146, 150, 0xff, b'\n']).unwrap();
    stdout.write_all(b"\x00\x00\x00\x10not a frame\n").unwrap();
    for line in 0..12_000 {
        println!("line {line}");
    }
    7
}

#[test]
fn prints_and_events_of_tasks_reach_the_driver_under_their_run() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::registry().with(prefect::logging::layer()).with(
        tracing_subscriber::fmt::layer()
            .event_format(prefect::logging::PrefectFormat)
            .with_writer(move || writer.clone()),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn chatty(cluster: &Cluster) -> (String, u32, u32) {
        let talked = talk.submit(1);
        let scribbled = scribble.submit();
        (talked.task_run_name().to_owned(), talked.result().unwrap(), scribbled.result().unwrap())
    }
    let (run, talked, scribbled) = chatty(&cluster).unwrap();
    assert_eq!((talked, scribbled), (1, 7), "values came back intact whatever the tasks wrote");

    let output = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
    for line in [
        format!("| INFO    | Task run '{run}' - hello from println 1\n"),
        format!("| WARNING | Task run '{run}' - warning from eprintln 1\n"),
        format!("| INFO    | Task run '{run}' - hello from tracing 1 answer=42\n"),
        format!("| INFO    | Task run '{run}' - no newline at the end 1\n"),
        format!("| INFO    | Task run '{run}' - Finished in state Completed()\n"),
    ] {
        assert!(output.contains(&line), "missing: {line}");
    }
    assert!(output.contains("line 9990\n"), "a noisy task's output arrives in full up to the limit");
    assert!(output.contains("more line(s) of output were dropped"), "and the rest is counted, not lost silently");
}
