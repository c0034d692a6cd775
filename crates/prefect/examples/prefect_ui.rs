//! A small fan-out flow to watch in the Prefect UI: one run loads the work, one run per
//! item processes it, one run gathers the results (and publishes them as artifacts), and a
//! last one waits for it. The work is loaded twice: the second run is `Cached`.
//!
//! ```text
//! PREFECT_API_URL=http://127.0.0.1:4200/api cargo run -p prefect --example prefect_ui
//! ```
//!
//! Without `PREFECT_API_URL` it runs the same and reports nothing.

use std::time::Duration;

use prefect::artifacts::{create_markdown_artifact, create_table_artifact};
use prefect::{PrefectFuture, flow, task};

#[task(tags = ["source"], cache_policy = INPUTS + TASK_SOURCE, cache_expiration = 3600)]
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
    let rows: Vec<_> = lengths.iter().enumerate().map(|(city, letters)| (city, *letters)).collect();
    create_table_artifact(&rows, None, Some("Letters per city")).expect("a table of pairs");
    let best = lengths.into_iter().max().unwrap_or(0);
    let summary = format!("# City lengths\n\nThe longest name has **{best}** letters.");
    create_markdown_artifact(&summary, Some("city-lengths"), Some("What the flow found")).expect("a valid key");
    best
}

#[task]
fn announce(message: String) {
    println!("{message}");
}

#[flow]
fn city_lengths(count: usize) -> Result<usize, prefect::TaskError> {
    let cities = list_cities(count)?;
    // The same inputs again: served from the record the first run wrote.
    let again = list_cities(count)?;
    assert_eq!(cities, again);
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
