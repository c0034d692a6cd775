// A flow whose parameters come from JSON can be offered as a deployment; one whose
// parameters cannot still compiles, as long as nothing asks for its deployment.
use std::sync::Arc;
use std::time::Duration;

/// Counts to a number.
#[prefect::flow]
fn count_to(highest_number: u32, label: Option<String>) -> u32 {
    let _ = label;
    highest_number
}

#[prefect::flow]
async fn count_async(numbers: Vec<u64>) -> u64 {
    numbers.iter().sum()
}

#[prefect::flow]
fn shared_state(counter: Arc<std::sync::Mutex<u32>>, name: &str) {
    let _ = (counter, name);
}

fn main() {
    let deployment = count_to::to_deployment("count-to")
        .cron("0 * * * *")
        .interval(Duration::from_secs(60))
        .parameter("highest_number", 10)
        .tags(["demo"])
        .version("1")
        .concurrency_limit(2);
    assert_eq!(deployment.full_name(), "count-to/count-to");
    assert_eq!(deployment.parameter_schema()["required"][0], "highest_number");
    let _ = count_async::to_deployment("sum");
    let _ = shared_state(Arc::default(), "x");
}
