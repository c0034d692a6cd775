#[prefect::task(retires = 3)]
fn shout(number: u32) -> u32 {
    number
}

fn main() {}
