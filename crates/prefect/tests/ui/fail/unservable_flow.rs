// A flow whose parameter cannot come from JSON has no deployment: asking says why.
use std::sync::{Arc, Mutex};

#[prefect::flow]
fn shared_state(counter: Arc<Mutex<u32>>) {
    let _ = counter;
}

fn main() {
    let _ = shared_state::to_deployment("shared");
}
