//! A small fan-out flow to watch in the Prefect UI: one run loads the work, one run per
//! item processes it, one run gathers the results, and a last one waits for it.
//!
//! ```text
//! PREFECT_API_URL=http://127.0.0.1:4200/api cargo run -p prefect --example prefect_ui
//! ```
//!
//! Without `PREFECT_API_URL` it runs the same and reports nothing.

use std::time::Duration;

use prefect::{PrefectFuture, flow, task};

#[task(tags = ["source"])]
fn list_cities(count: usize) -> Vec<String> {
    let cities = ["Lisbon", "Osaka", "Quito", "Tallinn", "Windhoek", "Hobart", "Reykjavik", "Montreal"];
    cities.iter().cycle().take(count).map(|city| city.to_string()).collect()
}

#[task(retries = 1, task_run_name = "measure-{city}")]
fn measure(city: String) -> usize {
    std::thread::sleep(Duration::from_millis(200 + 50 * city.len() as u64));
    tracing::info!("{city} has {} letters", city.len());
    city.len()
}

#[task(tags = ["report"])]
fn longest(lengths: Vec<usize>) -> usize {
    lengths.into_iter().max().unwrap_or(0)
}

#[task]
fn announce(message: String) {
    println!("{message}");
}

#[flow]
fn city_lengths(count: usize) -> Result<usize, prefect::TaskError> {
    let cities = list_cities(count)?;
    let lengths: Vec<PrefectFuture<usize>> = measure.map(cities);
    let best = longest.submit(&lengths[..]);
    announce.wait_for(&best).submit("all cities measured".to_owned()).result()?;
    best.result()
}

fn main() {
    match city_lengths(6) {
        Ok(letters) => println!("the longest name has {letters} letters"),
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    }
}
