#[prefect::flow(runner = prefect::ThreadPoolTaskRunner::new())]
fn count_to(highest_number: u32) {
    let _ = highest_number;
}

fn main() {}
