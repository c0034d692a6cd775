#[prefect::task(retries = -1)]
fn never_retried() {}

#[prefect::task(retries = 2, retry_delay_seconds = [1, -5])]
fn wait_backwards() {}

#[prefect::task(retry_jitter_factor = -0.5)]
fn jitter() {}

#[prefect::flow(retry_delay_seconds = -2.5)]
fn flow_backwards() {}

fn main() {}
