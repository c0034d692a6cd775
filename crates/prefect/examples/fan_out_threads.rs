//! Fan-out / fan-in: many runs from one, their futures passed on as arguments, and one run
//! that gathers them all.
//!
//! `cargo run -p prefect --example fan_out_threads`

use prefect::{PrefectFuture, flow, task, unmapped};

#[task]
fn load(count: u64) -> Vec<u64> {
    (1..=count).collect()
}

#[task]
fn square_plus(value: u64, offset: u64) -> u64 {
    value * value + offset
}

#[task]
fn total(values: Vec<u64>) -> u64 {
    values.iter().sum()
}

#[flow]
fn sum_of_squares(count: u64) -> Result<u64, prefect::TaskError> {
    let numbers = load(count)?;
    // Fan out: one run per number.
    let squares: Vec<PrefectFuture<u64>> = square_plus.map(numbers, unmapped(0));
    // Fan in: a Vec of futures for a Vec<u64> parameter.
    total.submit(squares).result()
}

fn main() {
    match sum_of_squares(10) {
        Ok(sum) => println!("sum of squares: {sum}"),
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    }
}
