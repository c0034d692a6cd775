#[prefect::task(timeout_seconds = -1)]
fn stuck() {}

#[prefect::flow(timeout_seconds = 0)]
fn instant() {}

fn main() {}
