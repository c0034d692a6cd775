//! Helpers for tests that run flows on real Ray.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prefect_ray::RayTaskRunner;
use prefect_ray::testing::LocalCluster;
use serde::{Deserialize, Serialize};

/// The variable through which `cargo xtask test` hands the tests its shared cluster.
pub const SHARED_CLUSTER_ENV: &str = "PREFECT_RAY_TEST_CLUSTER";

/// A cluster to run on: the shared one, or one of this test's own.
pub struct Cluster {
    pub gcs_address: String,
    pub client_address: String,
    pub auth_token: String,
    pub dir: PathBuf,
    _owned: Option<LocalCluster>,
}

/// What the shared cluster looks like; `cargo xtask test` starts it the same way.
#[derive(Serialize, Deserialize)]
pub struct SharedCluster {
    pub gcs_address: String,
    pub client_address: String,
    pub auth_token: String,
    pub dir: PathBuf,
}

/// The shared test cluster: a head with 2 CPUs (`NODE_NAME=head`) and a node with 1 CPU and
/// 1 of resource `special` (`NODE_NAME=special`). Started here when no shared one is given.
pub fn cluster() -> Cluster {
    if let Ok(json) = std::env::var(SHARED_CLUSTER_ENV) {
        let shared: SharedCluster = serde_json::from_str(&json).expect("a valid shared cluster description");
        return Cluster {
            gcs_address: shared.gcs_address,
            client_address: shared.client_address,
            auth_token: shared.auth_token,
            dir: shared.dir,
            _owned: None,
        };
    }
    let owned = LocalCluster::builder()
        .num_cpus(2)
        .head_env("NODE_NAME", "head")
        .node(1, [("special", 1.0)], [("NODE_NAME", "special")])
        .start()
        .expect("a local test cluster starts");
    Cluster {
        gcs_address: owned.gcs_address().to_owned(),
        client_address: owned.client_address().to_owned(),
        auth_token: owned.auth_token().to_owned(),
        dir: owned.dir().to_owned(),
        _owned: Some(owned),
    }
}

impl Cluster {
    /// A runner connected through the GCS address.
    pub fn runner(&self) -> RayTaskRunner {
        RayTaskRunner::new().address(&self.gcs_address).auth_token(&self.auth_token)
    }

    /// A runner connected through Ray Client.
    pub fn client_runner(&self) -> RayTaskRunner {
        RayTaskRunner::new().address(&self.client_address).auth_token(&self.auth_token)
    }
}

/// Seconds since the epoch, for comparing when runs on different processes ran.
pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// The most intervals that overlap at any moment.
pub fn max_overlap(intervals: &[(f64, f64)]) -> usize {
    let mut events: Vec<(f64, i32)> = intervals.iter().flat_map(|&(start, end)| [(start, 1), (end, -1)]).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut running, mut peak) = (0i32, 0i32);
    for (_, change) in events {
        running += change;
        peak = peak.max(running);
    }
    peak as usize
}

/// Waits for every one of `count` runs to arrive at a meeting point in `dir`: succeeds only
/// if they run at the same time.
pub fn rendezvous(dir: &Path, name: &str, count: usize) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), b"here").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or(0) >= count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs one test of this binary in a child process, with `env` set.
pub fn run_test_in_child(test: &str, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", test, "--ignored", "--nocapture"]);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// Process ids whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(needle)
        {
            found.push(pid);
        }
    }
    found
}

/// Waits up to `limit` for `condition`, checking every 100 ms.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every process and its parent, from `/proc`.
fn parents() -> Vec<(u32, u32)> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The parent is the second field after the parenthesised command name.
        if let Some(parent) = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok()) {
            parents.push((child, parent));
        }
    }
    parents
}

/// Every process below `pid`.
pub fn descendants(pid: u32) -> BTreeSet<u32> {
    below(pid, &parents())
}

fn below(pid: u32, parents: &[(u32, u32)]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let mut frontier = vec![pid];
    while let Some(next) = frontier.pop() {
        for (child, parent) in parents {
            if *parent == next && found.insert(*child) {
                frontier.push(*child);
            }
        }
    }
    found
}

/// The task executors below `pid`: processes of this binary that are not its direct children
/// (a served run's own process is one).
pub fn executors_below(pid: u32) -> Vec<u32> {
    let exe = std::env::current_exe().unwrap();
    let parents = parents();
    below(pid, &parents)
        .into_iter()
        .filter(|process| !parents.contains(&(*process, pid)))
        .filter(|process| std::fs::read_link(format!("/proc/{process}/exe")).is_ok_and(|path| path == exe))
        .collect()
}
