//! Concurrency limits kept by a real Prefect server (3.9.1): a tag's limit bounds the task
//! runs with the tag, `prefect::concurrency` bounds the code it guards, and `rate_limit`
//! spaces calls out, on threads. (On Ray: prefect-ray's tests/concurrency.rs.)

mod prefect_server;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prefect::concurrency::ConcurrencyError;
use prefect::{ThreadPoolTaskRunner, flow, task};
use prefect_server::server;
use uuid::Uuid;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The most intervals that overlap at any moment.
fn max_overlap(intervals: &[(f64, f64)]) -> usize {
    let mut events: Vec<(f64, i32)> = intervals.iter().flat_map(|&(start, end)| [(start, 1), (end, -1)]).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut running, mut peak) = (0i32, 0i32);
    for (_, change) in events {
        running += change;
        peak = peak.max(running);
    }
    peak as usize
}

/// A name no other test (or earlier run against the shared server) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

type Times = Vec<(f64, f64)>;

#[task]
fn busy(millis: u64) -> (f64, f64) {
    let start = now();
    std::thread::sleep(Duration::from_millis(millis));
    (start, now())
}

#[test]
fn a_tag_limit_of_two_lets_at_most_two_tagged_runs_run_at_once() {
    let server = server();
    let tag = unique("db");
    server.client.create_concurrency_limit(&format!("tag:{tag}"), 2, 0.0).unwrap();

    #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(8))]
    fn tagged(tag: String) -> (Times, Times) {
        let gated = busy.with_options(|options| options.tags.push(tag.clone()));
        let limited: Vec<_> = (0..6).map(|_| gated.submit(400)).collect();
        // Untagged runs are not held back.
        let free: Vec<_> = (0..4).map(|_| busy.submit(400)).collect();
        let times = |futures: Vec<prefect::PrefectFuture<(f64, f64)>>| {
            futures.into_iter().map(|f| f.result().unwrap()).collect::<Vec<_>>()
        };
        (times(limited), times(free))
    }
    let (limited, free) = tagged(tag.clone()).unwrap();
    assert_eq!(max_overlap(&limited), 2, "tagged runs: {limited:?}");
    assert!(max_overlap(&free) >= 3, "untagged runs ran side by side: {free:?}");

    // Every slot was given back.
    let limit = server.client.get(&format!("/v2/concurrency_limits/tag:{tag}")).unwrap();
    assert_eq!(limit["active_slots"], 0, "{limit}");
    server.client.delete_concurrency_limit(&format!("tag:{tag}")).unwrap();
}

#[task]
fn guarded(limit: String, millis: u64) -> (f64, f64) {
    let slot = prefect::concurrency(limit.as_str(), 1).unwrap();
    assert_eq!(slot.names(), [limit.as_str()]);
    let start = now();
    std::thread::sleep(Duration::from_millis(millis));
    (start, now())
}

#[task]
fn limited_call(limit: String) -> f64 {
    prefect::rate_limit(limit.as_str(), 1).unwrap();
    now()
}

#[test]
fn concurrency_guards_and_rate_limits_inside_tasks_follow_the_server() {
    let server = server();
    let (gcl, rate) = (unique("warehouse"), unique("api"));
    server.client.create_concurrency_limit(&gcl, 1, 0.0).unwrap();
    // One slot, freed at 4 per second: calls come at most every 250 ms.
    server.client.create_concurrency_limit(&rate, 1, 4.0).unwrap();

    #[flow(task_runner = ThreadPoolTaskRunner::new().max_workers(4))]
    fn guarding(gcl: String, rate: String) -> (Times, Vec<f64>) {
        let held: Vec<_> = (0..4).map(|_| guarded.submit(gcl.clone(), 200)).collect();
        let held = held.into_iter().map(|f| f.result().unwrap()).collect();
        let calls: Vec<_> = (0..4).map(|_| limited_call.submit(rate.clone())).collect();
        let mut calls: Vec<f64> = calls.into_iter().map(|f| f.result().unwrap()).collect();
        calls.sort_by(f64::total_cmp);
        (held, calls)
    }
    let (held, calls) = guarding(gcl.clone(), rate.clone()).unwrap();
    assert_eq!(max_overlap(&held), 1, "guarded sections: {held:?}");
    let spread = calls[3] - calls[0];
    assert!(spread >= 0.5, "4 calls through a rate limit of 4/s with 1 slot took {spread:.2} s: {calls:?}");
    assert_eq!(server.client.get(&format!("/v2/concurrency_limits/{gcl}")).unwrap()["active_slots"], 0);

    // More slots than the limit has: a clear error at once, not a wait.
    let refused = prefect::concurrency(gcl.as_str(), 5).unwrap_err();
    assert!(matches!(refused, ConcurrencyError::Refused { .. }), "{refused:?}");
    assert!(refused.to_string().contains("prefect gcl ls"), "{refused}");
    // A rate limit needs a decay.
    assert!(matches!(prefect::rate_limit(gcl.as_str(), 1), Err(ConcurrencyError::Refused { .. })));
    // A limit that does not exist limits nothing.
    let none = prefect::concurrency(unique("nothing").as_str(), 1).unwrap();
    assert!(none.names().is_empty());
    for name in [gcl, rate] {
        server.client.delete_concurrency_limit(&name).unwrap();
    }
}

#[task(tags = ["inline-limited-test"])]
fn tagged_inline() -> f64 {
    now()
}

/// A direct call of a tagged task runs on the flow's thread, and waits there for its slot.
#[test]
fn a_direct_call_of_a_tagged_task_waits_for_a_slot() {
    let server = server();
    let name = "tag:inline-limited-test";
    server.client.create_concurrency_limit(name, 1, 0.0).unwrap();
    // The only slot, held by this test for a moment.
    let slot = prefect::concurrency(name, 1).unwrap();
    assert_eq!(slot.names(), [name]);

    #[flow]
    fn calling() -> f64 {
        tagged_inline.call().unwrap()
    }
    let flow = std::thread::spawn(|| calling().unwrap());
    std::thread::sleep(Duration::from_millis(800));
    let released = now();
    drop(slot);
    let started = flow.join().unwrap();
    assert!(started >= released, "the call ran at {started}, before the slot was given back at {released}");
    server.client.delete_concurrency_limit(name).unwrap();
}

/// Runs waiting for a slot when their flow run is cancelled end `Cancelled`, without running.
#[test]
fn runs_waiting_for_a_slot_end_cancelled_with_their_flow_run() {
    static SEEN: std::sync::Mutex<Vec<Option<prefect::State>>> = std::sync::Mutex::new(Vec::new());
    let server = server();
    let tag = unique("held");
    let name = format!("tag:{tag}");
    server.client.create_concurrency_limit(&name, 1, 0.0).unwrap();
    let _only_slot = prefect::concurrency(name.as_str(), 1).unwrap();

    #[flow]
    fn cancelling(tag: String) {
        let gated = busy.with_options(|options| options.tags.push(tag.clone()));
        let waiting: Vec<_> = (0..2).map(|_| gated.submit(10)).collect();
        prefect::observe::cancel_flow_run(prefect::runtime::flow_run().unwrap().id, "enough");
        *SEEN.lock().unwrap() = waiting.iter().map(|future| future.wait(Duration::from_secs(30))).collect();
    }
    let outcome = cancelling(tag);
    assert!(matches!(outcome, Err(prefect::FlowError::Cancelled { .. })), "{outcome:?}");
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for state in seen {
        let state = state.expect("the run ended at once");
        assert!(state.is_cancelled(), "{state:?}");
        assert_eq!(state.message.as_deref(), Some("enough"), "{state:?}");
    }
    server.client.delete_concurrency_limit(&name).unwrap();
}
