//! Concurrency limits on Ray, kept by a real Prefect server: a run that waits for a slot of
//! its tag's limit waits in the program, holding no Ray worker or CPU; `prefect::concurrency`
//! inside a task reaches the server from the worker.

mod support;

use std::time::Duration;

use prefect::reporting::api::Client;
use prefect::reporting::api::testing::TestServer;
use prefect::{PrefectFuture, flow, task};
use support::{Cluster, cluster, max_overlap, now};
use uuid::Uuid;

/// Half a CPU each: if waiting runs were handed to Ray, ten of them would take every CPU.
#[task(remote_options = {"num_cpus": 0.5})]
fn gated_nap(millis: u64) -> (f64, f64) {
    let start = now();
    std::thread::sleep(Duration::from_millis(millis));
    (start, now())
}

/// Needs a whole CPU: it starts at once only if CPUs are free.
#[task]
fn probe() -> f64 {
    now()
}

#[task]
fn guarded(limit: String) -> (f64, f64) {
    let _slot = prefect::concurrency(limit.as_str(), 1).unwrap();
    let start = now();
    std::thread::sleep(Duration::from_millis(300));
    (start, now())
}

type Times = Vec<(f64, f64)>;

#[test]
fn a_tag_limit_of_two_over_ten_runs_on_ray_lets_two_run_and_the_rest_hold_no_cpu() {
    let own = std::env::var("PREFECT_TEST_API_URL").is_err().then(|| TestServer::start().unwrap());
    let api_url = std::env::var("PREFECT_TEST_API_URL").unwrap_or_else(|_| own.as_ref().unwrap().api_url());
    prefect::reporting::connect(&api_url, None).unwrap();
    let client = Client::new(&api_url);
    let suffix = &Uuid::new_v4().simple().to_string()[..8];
    let (tag, gcl) = (format!("ray-db-{suffix}"), format!("ray-warehouse-{suffix}"));
    client.create_concurrency_limit(&format!("tag:{tag}"), 2, 0.0).unwrap();
    client.create_concurrency_limit(&gcl, 1, 0.0).unwrap();
    let cluster = cluster();

    #[flow(task_runner = cluster.runner())]
    fn limited(cluster: &Cluster, tag: String, gcl: String) -> (Times, f64, Times) {
        let tagged = gated_nap.with_options(|options| options.tags.push(tag.clone()));
        let naps: Vec<PrefectFuture<(f64, f64)>> = (0..10).map(|_| tagged.submit(1000)).collect();
        let probed = probe.submit();
        let guards: Vec<_> = (0..3).map(|_| guarded.submit(gcl.clone())).collect();
        let naps = naps.into_iter().map(|f| f.result().unwrap()).collect();
        let guards = guards.into_iter().map(|f| f.result().unwrap()).collect();
        (naps, probed.result().unwrap(), guards)
    }
    let (naps, probed, guards) = limited(&cluster, tag.clone(), gcl.clone()).unwrap();
    assert_eq!(max_overlap(&naps), 2, "tagged runs: {naps:?}");
    let mut starts: Vec<f64> = naps.iter().map(|nap| nap.0).collect();
    starts.sort_by(f64::total_cmp);
    assert!(probed < starts[4], "the probe ran at {probed}, after the tagged runs that waited: {starts:?}");
    assert_eq!(max_overlap(&guards), 1, "sections guarded on the workers: {guards:?}");
    for name in [format!("tag:{tag}"), gcl] {
        assert_eq!(client.get(&format!("/v2/concurrency_limits/{name}")).unwrap()["active_slots"], 0, "{name}");
        client.delete_concurrency_limit(&name).unwrap();
    }
}
