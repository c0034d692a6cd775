//! Fan-out / fan-in on Ray: one run per shard, each shard's value passed on as a Ray object
//! (never through this program), and one run that gathers them.
//!
//! `cargo run -p prefect-ray --example fan_out`

use prefect::{PrefectFuture, flow, task, unmapped};
use prefect_ray::RayTaskRunner;

#[task]
fn shard(index: u64, size: u64) -> Vec<u64> {
    (index * size..(index + 1) * size).collect()
}

#[task]
fn sum_of_squares(values: Vec<u64>) -> u64 {
    values.iter().map(|v| v * v).sum()
}

#[task]
fn total(parts: Vec<u64>) -> u64 {
    parts.iter().sum()
}

#[flow(task_runner = RayTaskRunner::new())]
fn squares(shards: u64, size: u64) -> Result<u64, prefect::TaskError> {
    // Fan out: one run per shard; each run's value stays in Ray's object store...
    let shards: Vec<PrefectFuture<Vec<u64>>> = shard.map(0..shards, unmapped(size));
    // ...and goes straight to the run that takes it.
    let partial_sums = sum_of_squares.map(&shards);
    // Fan in: a Vec of futures for a Vec<u64> parameter.
    total.submit(partial_sums).result()
}

fn main() {
    let (shards, size) = (8, 100_000);
    match squares(shards, size) {
        Ok(sum) => {
            let n = shards * size;
            let expected = (n - 1) * n * (2 * n - 1) / 6;
            println!("sum of squares below {n}: {sum} (expected {expected})");
        }
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    }
}
