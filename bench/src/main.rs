//! The benchmark cases, on our runners. `cargo xtask bench` runs this binary (built in
//! release mode) beside the same cases on raw Ray and on prefect-ray, and compares them.
//!
//! `bench <case> [args]` runs one case and prints one JSON object on stdout:
//! - `noop <n> ray|submit|threads`: n no-op tasks and their results gathered: a map on
//!   Ray (batched), one `submit` per run on Ray (a loop), or a map on the thread pool;
//! - `tree <leaves>`: a binary-tree reduction, futures passed as arguments;
//! - `montecarlo <tasks> <samples>`: a Monte Carlo estimate of pi, split over tasks, and the
//!   same samples on one thread;
//! - `data <megabytes>`: a value made by one task and consumed by another;
//! - `chain <n>`: n no-op tasks, each taking the previous one's future: the cost of one
//!   dependency hop, which a map cannot hide;
//! - `scale <n>`: a map of n tasks, results gathered;
//! - `startup`: a flow run that starts a temporary Ray instance and ends it.
//!
//! Times exclude starting Ray, except in `startup`, and follow a warm-up.

use std::time::Instant;

use prefect::{ThreadPoolTaskRunner, flow, task};
use prefect_ray::RayTaskRunner;
use prefect_ray::diagnostics::peak_rss_bytes;
use serde_bytes::ByteBuf;
use serde_json::{Value, json};

#[task]
fn noop(_index: u64) {}

#[task]
fn leaf(index: u64) -> u64 {
    index
}

#[task]
fn add(left: u64, right: u64) -> u64 {
    left + right
}

/// Samples points in the unit square with a xorshift generator; returns how many fell in
/// the quarter circle.
#[task]
fn sample(seed: u64, samples: u64) -> u64 {
    inside(seed, samples)
}

fn inside(seed: u64, samples: u64) -> u64 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..samples)
        .filter(|_| {
            let (x, y) = (next(), next());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

#[task]
fn produce(megabytes: u64) -> ByteBuf {
    ByteBuf::from(vec![7u8; (megabytes << 20) as usize])
}

#[task]
fn consume(data: ByteBuf) -> u64 {
    data.len() as u64
}

/// A temporary 2-CPU Ray instance, as the raw Ray cases get.
fn ray() -> RayTaskRunner {
    RayTaskRunner::new().init_kwargs(json!({"num_cpus": 2, "include_dashboard": false}))
}

fn warm_up() {
    let warm: Vec<_> = noop.map(0..20);
    warm.iter().for_each(|f| f.result().unwrap());
}

/// Seconds to map `noop` over n elements and gather the results, after a warm-up.
fn timed_noop_map(n: u64) -> f64 {
    warm_up();
    let started = Instant::now();
    let futures = noop.map(0..n);
    futures.iter().for_each(|f| f.result().unwrap());
    started.elapsed().as_secs_f64()
}

#[flow(task_runner = ray())]
fn noop_on_ray(n: u64) -> f64 {
    timed_noop_map(n)
}

/// One `submit` per run, in a loop: each run a task run of its own; the submissions that pile
/// up while Ray takes tasks go to it in batches (the bridge joins them).
#[flow(task_runner = ray())]
fn noop_submitted_on_ray(n: u64) -> f64 {
    warm_up();
    let started = Instant::now();
    let futures: Vec<_> = (0..n).map(|index| noop.submit(index)).collect();
    futures.iter().for_each(|f| f.result().unwrap());
    started.elapsed().as_secs_f64()
}

#[flow(task_runner = ThreadPoolTaskRunner::new())]
fn noop_on_threads(n: u64) -> f64 {
    timed_noop_map(n)
}

#[flow(task_runner = ray())]
fn tree(leaves: u64) -> (f64, u64) {
    warm_up();
    let started = Instant::now();
    let mut level = leaf.map(0..leaves);
    while level.len() > 1 {
        level = level.chunks(2).map(|pair| add.submit(&pair[0], &pair[1])).collect();
    }
    let total = level[0].result().unwrap();
    (started.elapsed().as_secs_f64(), total)
}

#[task]
fn increment(previous: u64) -> u64 {
    previous + 1
}

#[flow(task_runner = ray())]
fn chain(n: u64) -> (f64, u64) {
    warm_up();
    let started = Instant::now();
    let mut last = increment.submit(0);
    for _ in 1..n {
        last = increment.submit(&last);
    }
    let value = last.result().unwrap();
    (started.elapsed().as_secs_f64(), value)
}

#[flow(task_runner = ray())]
fn montecarlo(tasks: u64, samples: u64) -> (f64, f64) {
    warm_up();
    let started = Instant::now();
    let counts = sample.map(0..tasks, prefect::unmapped(samples));
    let hits: u64 = counts.iter().map(|f| f.result().unwrap()).sum();
    (started.elapsed().as_secs_f64(), 4.0 * hits as f64 / (tasks * samples) as f64)
}

#[flow(task_runner = ray())]
fn data(megabytes: u64) -> (f64, u64, u64, u64) {
    warm_up();
    let bridge_before = prefect_ray::diagnostics::bridge_stats().map_or(0, |s| s.peak_rss_bytes);
    let started = Instant::now();
    let value = produce.submit(megabytes);
    let length = consume.submit(&value).result().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let bridge_peak = prefect_ray::diagnostics::bridge_stats().map_or(0, |s| s.peak_rss_bytes);
    (seconds, length, bridge_before, bridge_peak)
}

/// The map's time, and the bridge's peak memory by its end.
#[flow(task_runner = ray())]
fn scale(n: u64) -> (f64, u64) {
    let seconds = timed_noop_map(n);
    (seconds, prefect_ray::diagnostics::bridge_stats().map_or(0, |stats| stats.peak_rss_bytes))
}

#[flow(task_runner = ray())]
fn startup() {}

fn arg(args: &[String], index: usize, default: u64) -> u64 {
    args.get(index).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let case = args.first().map(String::as_str).unwrap_or("");
    let result: Value = match case {
        "noop" => {
            let n = arg(&args, 1, 2000);
            let seconds = match args.get(2).map(String::as_str) {
                Some("threads") => noop_on_threads(n),
                Some("submit") => noop_submitted_on_ray(n),
                _ => noop_on_ray(n),
            }
            .expect("the flow completes");
            json!({"tasks_per_s": n as f64 / seconds, "seconds": seconds})
        }
        "tree" => {
            let leaves = arg(&args, 1, 1024);
            let (seconds, total) = tree(leaves).expect("the flow completes");
            assert_eq!(total, leaves * (leaves - 1) / 2);
            json!({"seconds": seconds, "tasks": 2 * leaves - 1})
        }
        "chain" => {
            let n = arg(&args, 1, 500);
            let (seconds, value) = chain(n).expect("the flow completes");
            assert_eq!(value, n);
            json!({"seconds": seconds, "tasks": n})
        }
        "montecarlo" => {
            let (tasks, samples) = (arg(&args, 1, 16), arg(&args, 2, 20_000_000));
            let (seconds, pi) = montecarlo(tasks, samples).expect("the flow completes");
            let started = Instant::now();
            let hits: u64 = (0..tasks).map(|seed| inside(seed, samples)).sum();
            let single = started.elapsed().as_secs_f64();
            let single_pi = 4.0 * hits as f64 / (tasks * samples) as f64;
            assert!((pi - single_pi).abs() < 1e-12, "the same samples give the same estimate");
            json!({"seconds": seconds, "single_thread_seconds": single, "pi": pi})
        }
        "data" => {
            let megabytes = arg(&args, 1, 100);
            let (seconds, length, bridge_before, bridge_peak) = data(megabytes).expect("the flow completes");
            assert_eq!(length, megabytes << 20);
            json!({
                "seconds": seconds,
                "driver_peak_mb": (peak_rss_bytes() >> 20) as f64,
                "bridge_growth_mb": (bridge_peak.saturating_sub(bridge_before) >> 20) as f64,
            })
        }
        "scale" => {
            let n = arg(&args, 1, 100_000);
            let (seconds, bridge_peak) = scale(n).expect("the flow completes");
            json!({
                "seconds": seconds,
                "tasks_per_s": n as f64 / seconds,
                "driver_peak_mb": (peak_rss_bytes() >> 20) as f64,
                "bridge_peak_mb": (bridge_peak >> 20) as f64,
            })
        }
        "startup" => {
            let started = Instant::now();
            startup().expect("the flow completes");
            json!({"seconds": started.elapsed().as_secs_f64()})
        }
        other => {
            eprintln!("unknown case {other:?}; cases: noop, tree, chain, montecarlo, data, scale, startup");
            std::process::exit(2);
        }
    };
    println!("{result}");
}
