//! The seed's example: ten shouts, each half a second, run in parallel on the thread pool.
//!
//! `cargo run -p prefect --example count_to_threads`

use std::time::Duration;

use prefect::{flow, task};

#[task]
fn shout(number: u32) {
    std::thread::sleep(Duration::from_millis(500));
    println!("#{number}");
}

#[flow]
fn count_to(highest_number: u32) {
    for number in 0..highest_number {
        shout.submit(number);
    }
}

fn main() -> Result<(), prefect::FlowError> {
    count_to(10)
}
