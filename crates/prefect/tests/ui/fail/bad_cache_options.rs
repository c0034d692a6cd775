#[prefect::task(cache_expiration = 0)]
fn never_kept() {}

#[prefect::task(cache_policy = "inputs")]
fn policy_as_text() {}

fn wrong_key(_: &str) -> String {
    String::new()
}

#[prefect::task(cache_key_fn = wrong_key)]
fn wrong_key_fn() {}

fn main() {}
