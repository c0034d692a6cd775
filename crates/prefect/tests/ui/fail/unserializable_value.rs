struct Handle;

#[prefect::task]
fn open() -> Handle {
    Handle
}

fn main() {}
