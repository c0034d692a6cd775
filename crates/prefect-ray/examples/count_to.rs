//! The seed's example on Ray: ten shouts, each half a second, in parallel on a temporary
//! local Ray instance that lives as long as the flow run.
//!
//! `cargo xtask demo` (or `cargo run -p prefect-ray --example count_to`)

use std::time::Duration;

use prefect::{flow, task};
use prefect_ray::RayTaskRunner;

#[task]
fn shout(number: u32) {
    std::thread::sleep(Duration::from_millis(500));
    println!("#{number}");
}

#[flow(task_runner = RayTaskRunner::new())]
fn count_to(highest_number: u32) {
    for number in 0..highest_number {
        shout.submit(number);
    }
}

fn main() -> Result<(), prefect::FlowError> {
    count_to(10)
}
