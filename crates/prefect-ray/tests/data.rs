//! Values pass between tasks through Ray's object store, never through the driver: a
//! 200 MB intermediate value does not raise the driver's memory, until `.result()` asks
//! for it.

mod support;

use prefect::{flow, task};
use prefect_ray::diagnostics::peak_rss_bytes;
use serde_bytes::ByteBuf;
use support::{Cluster, cluster};

const MEGABYTE: usize = 1 << 20;

/// Bytes as MessagePack binary (serde_bytes), not as a list of numbers: the way to pass
/// large byte buffers between tasks.
#[task]
fn produce(megabytes: usize) -> ByteBuf {
    ByteBuf::from(vec![7u8; megabytes * MEGABYTE])
}

#[task]
fn consume(data: ByteBuf) -> (usize, u64) {
    (data.len(), data.iter().map(|&b| u64::from(b)).sum())
}

/// What the pipeline measured: the consumer's summary, peak memory (this process, bridge)
/// before and after the value passed and after `.result()`, the value's size.
type Measured = ((usize, u64), (u64, u64), (u64, u64), (u64, u64), usize);

/// Peak memory of this process and of its Ray driver (the bridge), in bytes.
fn peaks() -> (u64, u64) {
    (peak_rss_bytes(), prefect_ray::diagnostics::bridge_stats().unwrap().peak_rss_bytes)
}

#[test]
fn a_large_value_goes_from_task_to_task_without_passing_through_the_driver() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn pipeline(cluster: &Cluster) -> Measured {
        let before = peaks();
        let data = produce.submit(200);
        let summary = consume.submit(&data).result().unwrap();
        let after_pipeline = peaks();
        let fetched = data.result().unwrap();
        (summary, before, after_pipeline, peaks(), fetched.len())
    }
    let (summary, before, after, after_result, fetched) = pipeline(&cluster).unwrap();
    let value = 200 * MEGABYTE as u64;
    assert_eq!(summary, (value as usize, 7 * value), "the consumer got the whole value");
    let grew = |from: u64, to: u64| to.saturating_sub(from) >> 20;
    eprintln!(
        "while the value passed: driver +{} MB, bridge +{} MB (peaks {} MB, {} MB); .result(): driver +{} MB, bridge +{} MB",
        grew(before.0, after.0),
        grew(before.1, after.1),
        after.0 >> 20,
        after.1 >> 20,
        grew(after.0, after_result.0),
        grew(after.1, after_result.1),
    );
    assert!(after.0 - before.0 < value / 4, "the driver never held the value: +{} MB", grew(before.0, after.0));
    assert!(after.1 - before.1 < value / 4, "nor did its Ray bridge: +{} MB", grew(before.1, after.1));
    assert_eq!(fetched, value as usize);
    assert!(after_result.0 >= value, "`.result()` brought it here: peak {} MB", after_result.0 >> 20);
    // On its way here, no process holds more than the value and one copy: the bridge hands
    // it over in shared memory, straight from Ray's object store; this process maps it and
    // decodes it once.
    let (driver, bridge) = (after_result.0 - after.0, after_result.1.saturating_sub(after.1));
    assert!(driver <= value * 9 / 4, "this process: +{} MB for a {} MB value", driver >> 20, value >> 20);
    assert!(bridge <= value * 5 / 4, "the bridge: +{} MB for a {} MB value", bridge >> 20, value >> 20);
}

#[test]
fn a_large_argument_from_the_program_reaches_its_task_whole_through_shared_memory() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn handed(cluster: &Cluster) -> ((usize, u64), (u64, u64), (u64, u64)) {
        let before = peaks();
        let summary = consume.submit(ByteBuf::from(vec![3u8; 200 * MEGABYTE])).result().unwrap();
        (summary, before, peaks())
    }
    let (summary, before, after) = handed(&cluster).unwrap();
    let value = 200 * MEGABYTE as u64;
    assert_eq!(summary, (value as usize, 3 * value), "the task got the whole value");
    let grew = |from: u64, to: u64| to.saturating_sub(from);
    let (driver, bridge) = (grew(before.0, after.0), grew(before.1, after.1));
    eprintln!("a {} MB argument: driver +{} MB, bridge +{} MB", value >> 20, driver >> 20, bridge >> 20);
    // The bridge maps the call from shared memory and Ray copies it from there into its
    // object store: its resident memory counts the pages of both mappings (shared memory,
    // 2x at most), but it decodes or copies nothing into memory of its own. Through the pipe
    // it grew by 2.7x (its reader's buffer, the bytes, Ray's copy), and this process by 3x.
    assert!(bridge <= value * 5 / 2, "the bridge: +{} MB for a {} MB argument", bridge >> 20, value >> 20);
    assert!(driver <= value * 5 / 2, "this process: +{} MB for a {} MB argument", driver >> 20, value >> 20);
}

/// Four gigabytes each way (4,000 MiB, about as much as one MessagePack value can hold):
/// from the program to a task, from task to task, and back with `.result()`. The program
/// holds the value and one copy at most: the encoded argument, then the shared memory it
/// goes through, then the value read back. The whole test needs about 18 GB (Ray's object
/// store and the shared-memory files hold copies too), so a machine with less memory than
/// that says so and skips it.
#[test]
fn values_of_four_gigabytes_pass_both_ways() {
    const SIZE: usize = 4_000 * MEGABYTE;
    const NEEDED_GIB: u64 = 20;
    let total_gib = total_memory_bytes() >> 30;
    if total_gib < NEEDED_GIB {
        eprintln!("skipped: this machine has {total_gib} GiB of memory, and the test needs {NEEDED_GIB} GiB");
        return;
    }
    let cluster = cluster();
    #[task]
    fn grow(data: ByteBuf) -> ByteBuf {
        let mut data = data.into_vec();
        data.push(9);
        ByteBuf::from(data)
    }
    #[flow(task_runner = cluster.runner())]
    fn both_ways(cluster: &Cluster) -> (usize, u64, usize) {
        let there = grow.submit(ByteBuf::from(vec![1u8; SIZE]));
        let summary = consume.submit(&there).result().unwrap();
        let back = there.result().unwrap();
        (summary.0, summary.1, back.len())
    }
    let (length, sum, back) = both_ways(&cluster).unwrap();
    assert_eq!((length, sum, back), (SIZE + 1, SIZE as u64 + 9, SIZE + 1));
    let peak = peak_rss_bytes();
    assert!(
        peak <= 2 * SIZE as u64 + 512 * MEGABYTE as u64,
        "the program peaked at {} MB for a {} MB value: more than the value and one copy",
        peak >> 20,
        SIZE >> 20
    );
}

fn total_memory_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

/// Values larger than the object store's memory (80 MB here) still pass, made by a task and
/// sent by the program: Ray spills them or falls back to memory outside the store.
#[test]
fn values_larger_than_the_object_store_pass() {
    use prefect_ray::RayTaskRunner;
    let store = serde_json::json!({"object_store_memory": 80 * MEGABYTE, "num_cpus": 1});
    #[flow(task_runner = RayTaskRunner::new().init_kwargs(store.clone()))]
    fn larger_than_the_store(store: serde_json::Value) -> (usize, (usize, u64)) {
        let made = produce.submit(150).result().unwrap().len();
        let sent = consume.submit(ByteBuf::from(vec![1u8; 150 * MEGABYTE])).result().unwrap();
        (made, sent)
    }
    let size = 150 * MEGABYTE;
    assert_eq!(larger_than_the_store(store).unwrap(), (size, (size, size as u64)));
}

#[task]
fn square(x: u64) -> u64 {
    x * x
}

#[task]
fn add_up(values: Vec<u64>) -> u64 {
    values.iter().sum()
}

/// A small value comes with its run's report, so the bridge lets its Ray objects go as soon
/// as the run ends, though the futures live on (a map of millions would otherwise keep
/// millions of objects in the bridge), while a large one stays in Ray's object store for as
/// long as its future does; runs submitted later still get both values.
#[test]
fn the_bridge_keeps_ray_objects_only_for_values_that_did_not_come_with_the_report() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn kept(cluster: &Cluster) -> (u64, u64, u64, (usize, u64)) {
        let squares = square.map(0..2_000u64);
        let large = produce.submit(2);
        squares.iter().for_each(|future| {
            future.wait(None);
        });
        large.wait(None);
        let held = prefect_ray::diagnostics::bridge_stats().unwrap().objects;
        // Submitted after the values came: the small ones go with the call, the large one
        // by its Ray object.
        let total = add_up.submit(&squares).result().unwrap();
        let summary = consume.submit(&large).result().unwrap();
        (held, total, squares.len() as u64, summary)
    }
    let (held, total, runs, summary) = kept(&cluster).unwrap();
    assert!(held <= 1, "the bridge still held {held} objects of {} finished runs", runs + 1);
    assert_eq!(total, (0..2_000u64).map(|x| x * x).sum::<u64>());
    assert_eq!(summary, (2 * MEGABYTE, 7 * 2 * MEGABYTE as u64));
}
