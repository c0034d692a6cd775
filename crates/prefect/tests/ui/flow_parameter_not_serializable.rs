struct Config;

#[prefect::flow]
fn configured(config: Config) {
    let _ = config;
}

fn main() {}
