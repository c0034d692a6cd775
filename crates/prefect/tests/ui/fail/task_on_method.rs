struct Counter;

impl Counter {
    #[prefect::task]
    fn count(&self, number: u32) -> u32 {
        number
    }
}

fn main() {}
