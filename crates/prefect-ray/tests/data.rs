//! Values pass between tasks through Ray's object store, never through the driver: a
//! 200 MB intermediate value does not raise the driver's memory, until `.result()` asks
//! for it.

mod support;

use prefect::{flow, task};
use support::{Cluster, cluster};

const MEGABYTE: usize = 1 << 20;

#[task]
fn produce(megabytes: usize) -> Vec<u8> {
    vec![7u8; megabytes * MEGABYTE]
}

#[task]
fn consume(data: Vec<u8>) -> (usize, u64) {
    (data.len(), data.iter().map(|&b| u64::from(b)).sum())
}

/// This process's peak resident memory.
fn peak_rss() -> u64 {
    // SAFETY: getrusage fills the struct we hand it.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn a_large_value_goes_from_task_to_task_without_passing_through_the_driver() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn pipeline(cluster: &Cluster) -> ((usize, u64), u64, u64, u64, usize) {
        let data = produce.submit(200);
        let summary = consume.submit(&data).result().unwrap();
        let driver_before = peak_rss();
        let bridge_before = prefect_ray::diagnostics::bridge_stats().unwrap().peak_rss_bytes;
        let fetched = data.result().unwrap();
        (summary, driver_before, bridge_before, peak_rss(), fetched.len())
    }
    let (summary, driver_before, bridge_before, driver_after, fetched) = pipeline(&cluster).unwrap();
    let value = 200 * MEGABYTE as u64;
    assert_eq!(summary, (value as usize, 7 * value), "the consumer got the whole value");
    eprintln!(
        "driver peak before .result(): {} MB; bridge peak: {} MB; driver peak after: {} MB",
        driver_before >> 20,
        bridge_before >> 20,
        driver_after >> 20
    );
    assert!(driver_before < value / 2, "the driver never held the value: peak {} MB", driver_before >> 20);
    assert!(bridge_before < value, "nor did its Ray bridge: peak {} MB", bridge_before >> 20);
    assert_eq!(fetched, value as usize);
    assert!(driver_after >= value, "`.result()` brought it here: peak {} MB", driver_after >> 20);
}
