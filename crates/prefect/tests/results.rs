//! Persisted results and caching on threads: records in Prefect's layout, readable by
//! Python Prefect; cache policies, key functions, expiration and refresh; the states a real
//! Prefect server shows.

mod prefect_server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use prefect::results::{CacheKeyContext, CachePolicy};
use prefect::{State, TaskOptions, TaskRun, flow, task};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A value with a shape, to see it as Python sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Reading {
    city: String,
    degrees: f64,
}

static MEASURED: AtomicUsize = AtomicUsize::new(0);

#[task(cache_policy = INPUTS + TASK_SOURCE)]
fn measure(city: String, step: u32) -> Reading {
    MEASURED.fetch_add(1, Ordering::SeqCst);
    Reading { city, degrees: f64::from(step) + 0.5 }
}

/// Runs of `measure` in `storage`, one per step: their names, values and runs.
#[flow]
fn pipeline(storage: String, steps: u32, options: TaskOptions) -> Vec<(String, Reading, TaskRun)> {
    let measuring = measure.with_options(|o| {
        *o = TaskOptions { result_storage: Some(storage.clone()), ..options.clone() };
    });
    let futures: Vec<_> = (0..steps).map(|step| measuring.submit("Lyon".to_owned(), step)).collect();
    futures
        .into_iter()
        .map(|future| {
            let value = future.result().unwrap();
            (future.state().name.into_owned(), value, future.task_run().clone())
        })
        .collect()
}

fn storage() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    (dir, path)
}

fn records(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn names(runs: &[(String, Reading, TaskRun)]) -> Vec<&str> {
    runs.iter().map(|(name, ..)| name.as_str()).collect()
}

fn cached_options() -> TaskOptions {
    measure.options()
}

#[test]
fn a_second_run_of_a_fifty_step_pipeline_runs_nothing_and_gives_the_same_values() {
    let (dir, storage) = storage();
    let before = MEASURED.load(Ordering::SeqCst);
    let first = pipeline(storage.clone(), 50, cached_options()).unwrap();
    assert!(names(&first).iter().all(|name| *name == "Completed"), "{:?}", names(&first));
    assert_eq!(records(dir.path()).len(), 50, "one record per distinct key");
    let second = pipeline(storage.clone(), 50, cached_options()).unwrap();
    assert!(names(&second).iter().all(|name| *name == "Cached"), "{:?}", names(&second));
    assert_eq!(MEASURED.load(Ordering::SeqCst) - before, 50, "the second pipeline measured nothing");
    let values = |runs: &[(String, Reading, TaskRun)]| runs.iter().map(|(_, v, _)| v.clone()).collect::<Vec<_>>();
    assert_eq!(values(&first), values(&second));
    // A cached run says where its value is, and never ran.
    let (_, _, run) = &second[7];
    let state = run.state();
    assert!(state.is_completed());
    let persisted = state.persisted.expect("a cached state points at its record");
    assert!(Path::new(&persisted.storage_key).starts_with(dir.path()), "{}", persisted.storage_key);
    assert_eq!(persisted.serializer, "json");
    assert!(run.times().0.is_none(), "a cached run has no start time: it never ran");
}

#[test]
fn records_follow_prefects_layout_and_python_prefect_reads_them() {
    let (dir, storage) = storage();
    let runs = pipeline(storage, 1, cached_options().cache_expiration_seconds(3600.0)).unwrap();
    let persisted = runs[0].2.state().persisted.unwrap();
    let record: Value = serde_json::from_slice(&std::fs::read(&persisted.storage_key).unwrap()).unwrap();
    assert_eq!(record["metadata"]["serializer"]["type"], "json");
    assert_eq!(record["metadata"]["storage_key"], persisted.storage_key.as_str());
    assert!(record["metadata"]["expiration"].is_string(), "{record}");

    let python = prefect::reporting::api::testing::prefect_bin().with_file_name("python");
    let read = r#"
import sys
from prefect._internal.result_records import ResultRecord
record = ResultRecord.deserialize(open(sys.argv[1], "rb").read())
print(record.result["city"], record.result["degrees"], record.metadata.expiration is not None)
"#;
    let output = Command::new(&python).args(["-c", read, &persisted.storage_key]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "Lyon 0.5 True");
    drop(dir);
}

#[test]
fn the_default_policy_shares_values_within_a_flow_run_only() {
    let (_dir, storage) = storage();
    // Persisted, with no policy of its own: Prefect's INPUTS + TASK_SOURCE + RUN_ID.
    let options = TaskOptions::default().persist_result(true);
    let first = pipeline(storage.clone(), 2, options.clone()).unwrap();
    let second = pipeline(storage, 2, options).unwrap();
    assert_eq!(names(&first), ["Completed", "Completed"]);
    assert_eq!(names(&second), ["Completed", "Completed"], "another flow run, another key");
}

#[test]
fn no_cache_persists_every_run_and_caches_none() {
    let (dir, storage) = storage();
    let options = TaskOptions::default().persist_result(true).cache_policy(CachePolicy::NO_CACHE);
    pipeline(storage.clone(), 3, options.clone()).unwrap();
    let again = pipeline(storage, 3, options).unwrap();
    assert_eq!(names(&again), ["Completed"; 3]);
    assert_eq!(records(dir.path()).len(), 6, "each run's value under a key of its own");
}

#[test]
fn refresh_runs_again_and_expired_values_do_not_serve() {
    let (_dir, storage) = storage();
    let first = pipeline(storage.clone(), 1, cached_options()).unwrap();
    let refreshed = pipeline(storage.clone(), 1, cached_options().refresh_cache(true)).unwrap();
    assert_eq!(names(&refreshed), ["Completed"]);
    assert_eq!(
        first[0].2.state().persisted.unwrap().storage_key,
        refreshed[0].2.state().persisted.unwrap().storage_key
    );

    // The record says when it expires; one whose time has passed is a miss.
    let expiring =
        pipeline(storage.clone(), 1, cached_options().refresh_cache(true).cache_expiration_seconds(60.0)).unwrap();
    let path = expiring[0].2.state().persisted.unwrap().storage_key;
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(names(&pipeline(storage.clone(), 1, cached_options()).unwrap()), ["Cached"], "not expired yet");
    record["metadata"]["expiration"] = "2020-01-01T00:00:00Z".into();
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(names(&pipeline(storage.clone(), 1, cached_options()).unwrap()), ["Completed"], "expired");
    assert_eq!(names(&pipeline(storage, 1, cached_options()).unwrap()), ["Cached"], "stored again");
}

#[test]
fn a_damaged_record_is_a_miss_and_is_replaced() {
    let (_dir, storage) = storage();
    let first = pipeline(storage.clone(), 1, cached_options()).unwrap();
    let path = first[0].2.state().persisted.unwrap().storage_key;
    std::fs::write(&path, b"not a record").unwrap();
    assert_eq!(names(&pipeline(storage.clone(), 1, cached_options()).unwrap()), ["Completed"]);
    assert_eq!(names(&pipeline(storage, 1, cached_options()).unwrap()), ["Cached"]);
}

/// One value per city, whatever the step.
fn per_city(context: &CacheKeyContext<'_>) -> Option<String> {
    let city: String = context.argument("city").ok()?;
    (city != "nowhere").then(|| format!("{}-{city}", context.task_name()))
}

static LOOKED_UP: AtomicUsize = AtomicUsize::new(0);

#[task(cache_key_fn = per_city)]
fn look_up(city: String, step: u32) -> u32 {
    LOOKED_UP.fetch_add(1, Ordering::SeqCst);
    let _ = city;
    step
}

#[test]
fn a_cache_key_fn_makes_the_key() {
    let (_dir, storage) = storage();
    #[flow]
    fn lookups(storage: String) -> Vec<(String, u32)> {
        let looking = look_up.with_options(|o| o.result_storage = Some(storage.clone()));
        [("Lyon", 1), ("Lyon", 2), ("Oslo", 3), ("nowhere", 4), ("nowhere", 5)]
            .into_iter()
            .map(|(city, step)| {
                let future = looking.submit(city.to_owned(), step);
                let value = future.result().unwrap();
                (future.state().name.into_owned(), value)
            })
            .collect()
    }
    let before = LOOKED_UP.load(Ordering::SeqCst);
    let seen = lookups(storage).unwrap();
    let expected = [("Completed", 1), ("Cached", 1), ("Completed", 3), ("Completed", 4), ("Completed", 5)];
    assert_eq!(seen, expected.map(|(name, value)| (name.to_owned(), value)));
    assert_eq!(LOOKED_UP.load(Ordering::SeqCst) - before, 4, "None from the key function means: do not cache");
}

#[test]
fn storage_that_cannot_be_used_fails_the_run_at_once_and_says_why() {
    #[flow]
    fn misplaced() -> Vec<State> {
        ["nowhere://bucket/results", "relative/but/resolved/elsewhere\0"]
            .into_iter()
            .map(|location| {
                let future =
                    measure.with_options(|o| o.result_storage = Some(location.to_owned())).submit("x".to_owned(), 1);
                future.wait(None);
                future.state()
            })
            .collect()
    }
    let states = misplaced().unwrap();
    for state in states {
        assert!(state.is_failed(), "{state}");
        let message = state.message.unwrap_or_default();
        assert!(message.contains("result storage") && message.contains("cannot be used"), "{message}");
    }
}

#[test]
fn a_bad_cache_expiration_is_refused() {
    assert!(TaskOptions::default().cache_expiration_seconds(-1.0).validate().is_err());
    assert!(TaskOptions::default().cache_expiration_seconds(f64::NAN).validate().is_err());
}

#[test]
fn the_server_shows_cached_runs_with_their_records() {
    let server = prefect_server::server();
    let (_dir, storage) = storage();
    pipeline(storage.clone(), 2, cached_options()).unwrap();
    let second = pipeline(storage, 2, cached_options()).unwrap();
    let flow_run = server.flow_run_id(second[0].2.info().flow_run_id.unwrap());
    let runs = server.task_runs(flow_run, 2);
    for (_, _, run) in &second {
        let on_server = runs.iter().find(|r| r["id"] == run.id().to_string()).expect("reported");
        assert_eq!(on_server["state"]["name"], "Cached", "{on_server}");
        assert_eq!(on_server["state"]["type"], "COMPLETED");
        let persisted = run.state().persisted.unwrap();
        assert_eq!(on_server["state"]["data"]["storage_key"], persisted.storage_key.as_str(), "{on_server}");
        assert_eq!(on_server["state"]["state_details"]["cache_key"], persisted.cache_key.unwrap().as_str());
        let states = prefect_server::names(&server.task_run_states(run.id()));
        assert_eq!(states, ["Pending", "Cached"]);
    }
}

#[task(cache_policy = INPUTS)]
async fn fetch(page: u32) -> u32 {
    MEASURED.fetch_add(1, Ordering::SeqCst);
    page * 10
}

#[test]
fn async_tasks_are_cached_too() {
    let (_dir, storage) = storage();
    #[flow]
    async fn crawl(storage: String) -> Vec<(String, u32)> {
        let fetching = fetch.with_options(|o| o.result_storage = Some(storage.clone()));
        let mut seen = Vec::new();
        for page in [1, 2, 1] {
            let future = fetching.submit(page);
            let run = future.task_run().clone();
            let value = future.await.unwrap();
            seen.push((run.state().name.into_owned(), value));
        }
        seen
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let seen = runtime.block_on(crawl(storage)).unwrap();
    let expected = [("Completed", 10), ("Completed", 20), ("Cached", 10)];
    assert_eq!(seen, expected.map(|(name, value)| (name.to_owned(), value)));
}

#[task]
fn plain(number: u32) -> u32 {
    number * 2
}

#[task(persist_result = false)]
fn never_kept(number: u32) -> u32 {
    number
}

#[flow]
fn child_of_persisting(storage: String) -> Option<prefect::results::PersistedResult> {
    let future = plain.with_options(|o| o.result_storage = Some(storage.clone())).submit(5);
    future.wait(None);
    future.state().persisted.map(|persisted| *persisted)
}

/// A flow's `persist_result` is the default of the task runs in it and in its subflows; a
/// task that says otherwise keeps its say.
#[test]
fn a_flows_persist_result_is_its_task_runs_default() {
    let (dir, path) = storage();

    #[flow(persist_result = true)]
    fn persisting(storage: String) -> (State, State, Option<prefect::results::PersistedResult>) {
        let kept = plain.with_options(|o| o.result_storage = Some(storage.clone())).submit(2);
        let not = never_kept.with_options(|o| o.result_storage = Some(storage.clone())).submit(3);
        let inner = child_of_persisting(storage.clone()).unwrap();
        (kept.wait(None).unwrap(), not.wait(None).unwrap(), inner)
    }
    let (kept, not, inner) = persisting(path.clone()).unwrap();
    assert!(kept.persisted.is_some(), "{kept:?}");
    assert!(not.persisted.is_none(), "{not:?}");
    assert!(inner.is_some(), "a subflow's task runs follow the parent flow");
    assert_eq!(records(dir.path()).len(), 2, "one record each for the two persisted runs");

    // Without the flow's say, a plain task is not persisted.
    assert!(child_of_persisting(path).unwrap().is_none());
    assert_eq!(records(dir.path()).len(), 2);
}
