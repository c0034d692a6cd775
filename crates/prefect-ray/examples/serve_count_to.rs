//! The seed's example as a Prefect deployment: `count_to` served to the Prefect server at
//! `PREFECT_API_URL`. Each run started from the UI, the CLI, the REST API or the schedule
//! executes in a process of its own, on a temporary local Ray instance of its own.
//!
//! ```sh
//! PREFECT_API_URL=http://127.0.0.1:4200/api cargo run -p prefect-ray --example serve_count_to
//! PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'count-to/count-to' -p highest_number=5
//! ```
//!
//! Ctrl-C stops serving.

use std::time::Duration;

use prefect::{flow, task};
use prefect_ray::RayTaskRunner;

#[task]
fn shout(number: u32) {
    std::thread::sleep(Duration::from_millis(500));
    println!("#{number}");
}

/// Shouts every number up to `highest_number`, half a second each, in parallel on Ray.
#[flow(task_runner = RayTaskRunner::new())]
fn count_to(highest_number: u32) {
    for number in 0..highest_number {
        shout.submit(number);
    }
}

fn main() -> Result<(), prefect::serve::ServeError> {
    count_to::to_deployment("count-to").parameter("highest_number", 10).tags(["ray", "example"]).serve()
}
