// A state hook takes the run and its final state; a function of another shape is refused
// at its own name.
fn notify(message: &str) {
    let _ = message;
}

#[prefect::task(on_failure = [notify])]
fn fragile() {}

fn main() {}
