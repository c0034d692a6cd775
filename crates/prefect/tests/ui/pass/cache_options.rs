use prefect::results::{CacheKeyContext, CachePolicy};

fn by_city(context: &CacheKeyContext<'_>) -> Option<String> {
    context.argument::<String>("city").ok()
}

#[prefect::task(cache_policy = INPUTS + TASK_SOURCE + FLOW_PARAMETERS, cache_expiration = 3600, refresh_cache = false)]
fn forecast(city: String) -> String {
    city
}

#[prefect::task(cache_policy = INPUTS.excluding(["verbose"]), result_storage = "file:///tmp/results")]
fn quietly(city: String, verbose: bool) -> String {
    let _ = verbose;
    city
}

#[prefect::task(cache_key_fn = by_city, persist_result = true)]
fn keyed(city: String) -> String {
    city
}

#[prefect::task(persist_result = false, cache_policy = NO_CACHE)]
fn fresh() -> u32 {
    1
}

fn main() {
    let _ = (forecast, quietly, keyed, fresh);
    let _ = forecast.with_options(|o| o.cache_policy = Some(CachePolicy::RUN_ID));
}
