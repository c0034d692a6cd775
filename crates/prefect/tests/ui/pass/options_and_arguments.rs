//! Every option of the attributes, literal and computed, and every kind of argument.

use prefect::{flow, task, unmapped, PrefectFuture, TaskError};

const TIMEOUT: f64 = 30.0;

#[task(
    name = "fetcher",
    retries = 2,
    retry_delay_seconds = [0, 1.5],
    retry_jitter_factor = 0.5,
    timeout_seconds = TIMEOUT,
    tags = ["io"],
    task_run_name = "fetch-{page}",
    num_cpus = 1,
    resources = {"special": 1},
    remote_options = {"scheduling_strategy": "SPREAD"}
)]
fn fetch(page: u32) -> Result<Vec<u64>, std::io::Error> {
    Ok(vec![u64::from(page)])
}

#[task]
fn total(parts: Vec<Vec<u64>>, offset: u64) -> u64 {
    parts.iter().flatten().sum::<u64>() + offset
}

#[task]
async fn later(value: u64) -> u64 {
    value
}

#[flow(name = "report", retries = 1, retry_delay_seconds = 0, timeout_seconds = 60, persist_result = true)]
fn report(pages: u32) -> Result<u64, TaskError> {
    let first = fetch(0)?;
    let rest: Vec<PrefectFuture<Vec<u64>>> = fetch.map(1..pages);
    let sum = total.wait_for((&rest, &rest[0])).submit(&rest, 1);
    let more = total.map(vec![rest.clone()], unmapped(2));
    let faster = fetch.with_options(|options| options.retries = 0).submit(7);
    Ok(sum.result()? + more[0].result()? + first.len() as u64 + faster.result()?.len() as u64)
}

#[flow]
async fn asynchronous(value: u64) -> u64 {
    later.submit(value).await.unwrap_or_default()
}

fn main() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    let future = asynchronous(1);
    fn send<T: Send>(_: &T) {}
    send(&future);
    send_sync(&prefect::ThreadPoolTaskRunner::new());
    let _ = report;
}
