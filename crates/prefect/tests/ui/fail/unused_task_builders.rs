#![deny(unused_must_use)]

#[prefect::task]
fn shout(number: u32) -> u32 {
    number
}

#[prefect::flow]
fn count() {
    let first = shout.submit(1);
    shout.wait_for(&first);
    shout.with_options(|options| options.retries = 3);
}

fn main() {}
