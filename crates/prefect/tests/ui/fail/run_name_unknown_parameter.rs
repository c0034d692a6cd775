#[prefect::task(task_run_name = "shout-{numbr}")]
fn shout(number: u32) -> u32 {
    number
}

fn main() {}
