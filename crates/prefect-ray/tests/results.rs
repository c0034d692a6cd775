//! Persisted results and caching on Ray: the executor reads and writes result storage from
//! the worker, and a second run of a pipeline, through another kind of connection, runs
//! nothing.

mod support;

use prefect::{TaskRun, flow, task};
use prefect_ray::RayTaskRunner;

#[task(cache_policy = INPUTS + TASK_SOURCE)]
fn step(index: u32) -> (u32, u32) {
    // The value carries the process that made it: a cached run's is the first run's.
    (index * index, std::process::id())
}

#[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
fn pipeline(address: &str, token: &str, storage: String, steps: u32) -> Vec<(String, (u32, u32), TaskRun)> {
    let stepping = step.with_options(|o| o.result_storage = Some(storage.clone()));
    let futures = stepping.map((0..steps).collect::<Vec<_>>());
    futures
        .into_iter()
        .map(|future| {
            let value = future.result().unwrap();
            (future.state().name, value, future.task_run().clone())
        })
        .collect()
}

#[test]
fn a_second_run_through_ray_client_finds_every_value_the_first_stored_from_its_workers() {
    let cluster = support::cluster();
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().display().to_string();
    let first = pipeline(&cluster.gcs_address, &cluster.auth_token, storage.clone(), 50).unwrap();
    assert!(first.iter().all(|(name, ..)| name == "Completed"), "{:?}", first.iter().map(|r| &r.0).collect::<Vec<_>>());
    let program = std::process::id();
    assert!(first.iter().all(|(_, (_, pid), _)| *pid != program), "values were made on Ray workers");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 50);

    let second = pipeline(&cluster.client_address, &cluster.auth_token, storage, 50).unwrap();
    for ((_, made, _), (name, cached, run)) in first.iter().zip(&second) {
        assert_eq!(name, "Cached");
        assert_eq!(made, cached, "the stored value, with the process that made it the first time");
        assert!(run.times().0.is_none(), "a cached run never started");
        assert!(run.state().persisted.is_some());
    }
}
