//! The chaos suite: faults injected in the middle of flows on a cluster of our own, a head
//! and three worker nodes on loopback, after Ray's own test_failure_4.py, test_chaos.py and
//! test_reconstruction.py. Each fault is tried with Ray's retries off (the run ends Crashed,
//! saying why) and on (Ray runs it again and the value is right), and nothing of the cluster
//! is left afterwards.
//!
//! Faults: an executor killed, a Ray worker killed, a whole worker node killed (its raylet,
//! workers and executors), and a value lost with its node, which Ray's lineage rebuilds.
//! The bridge killed mid-submit, the Prefect server killed and restarted, and tasks that exit
//! or abort are in ray_runner.rs and reporting_outage.rs.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use prefect::{TaskError, flow, task};
use prefect_ray::testing::LocalCluster;
use prefect_ray::{RayTaskRunner, RemoteOptions, remote_options};
use serde_bytes::ByteBuf;
use support::{eventually, processes_mentioning};

/// The worker nodes, in the order they were added: node `n<i>` is extra node `i`.
const WORKER_NODES: usize = 3;

/// Where a run of `hold` is, once it runs: its executor's pid, its worker's pid, its node.
struct Running {
    executor: i32,
    worker: i32,
    node: usize,
}

/// Runs on a worker node. Its first attempt says where it runs and waits to be killed; any
/// later attempt returns at once.
#[task(resources = {"worker_node": 1})]
fn hold(dir: PathBuf, name: String, value: u64) -> u64 {
    let attempted = dir.join(format!("{name}.attempted"));
    if attempted.exists() {
        return value;
    }
    std::fs::write(&attempted, b"").unwrap();
    let node = std::env::var("NODE_NAME").unwrap();
    let me = format!("{} {} {node}", std::process::id(), std::os::unix::process::parent_id());
    // Written whole, then renamed: the test never reads half a line.
    std::fs::write(dir.join(format!("{name}.tmp")), me).unwrap();
    std::fs::rename(dir.join(format!("{name}.tmp")), dir.join(format!("{name}.running"))).unwrap();
    std::thread::sleep(Duration::from_secs(120));
    value
}

/// A 1 MiB value made on a worker node (too large to travel inside the run's report, so it
/// lives in that node's object store only); each attempt notes its node.
#[task(resources = {"worker_node": 1})]
fn produce(dir: PathBuf) -> ByteBuf {
    use std::io::Write;
    let mut attempts =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join("produce.attempts")).unwrap();
    writeln!(attempts, "{}", std::env::var("NODE_NAME").unwrap()).unwrap();
    ByteBuf::from(vec![7u8; 1 << 20])
}

#[task]
fn sum_of(data: ByteBuf) -> u64 {
    data.iter().map(|&b| u64::from(b)).sum()
}

fn running(dir: &Path, name: &str) -> Running {
    let path = dir.join(format!("{name}.running"));
    assert!(eventually(Duration::from_secs(60), || path.exists()), "{name} started");
    let text = std::fs::read_to_string(path).unwrap();
    let mut parts = text.split_whitespace();
    let mut next = || parts.next().unwrap().to_owned();
    let (executor, worker, node) = (next().parse().unwrap(), next().parse().unwrap(), next());
    Running { executor, worker, node: node.trim_start_matches('n').parse().unwrap() }
}

/// What a fault is done to.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Executor,
    Worker,
    Node,
}

/// Starts `hold` with `retries`, kills its `victim` once it runs, and returns how it ended,
/// and the node it ran on.
fn strike(cluster: &Mutex<LocalCluster>, dir: &Path, victim: Victim, retries: u32) -> (Result<u64, TaskError>, usize) {
    let name = format!("{victim:?}-{retries}");
    #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
    fn struck(
        address: &str,
        token: &str,
        cluster: &Mutex<LocalCluster>,
        dir: &Path,
        name: &str,
        victim: Victim,
        retries: u32,
    ) -> (Result<u64, TaskError>, usize) {
        let run = remote_options(RemoteOptions::new().max_retries(i64::from(retries)), || {
            hold.submit(dir.to_path_buf(), name.to_owned(), 42)
        });
        let at = running(dir, name);
        // SAFETY: kill(2) on processes of our own cluster; no memory is involved.
        match victim {
            Victim::Executor => unsafe { libc::kill(at.executor, libc::SIGKILL) },
            Victim::Worker => unsafe { libc::kill(at.worker, libc::SIGKILL) },
            Victim::Node => {
                cluster.lock().unwrap().kill_node(at.node);
                0
            }
        };
        (run.result(), at.node)
    }
    let (address, token) = {
        let cluster = cluster.lock().unwrap();
        (cluster.gcs_address().to_owned(), cluster.auth_token().to_owned())
    };
    struck(&address, &token, cluster, dir, &name, victim, retries).unwrap()
}

fn assert_crashed(outcome: Result<u64, TaskError>, says: &str, case: &str) {
    match outcome {
        Err(error @ TaskError::Crashed { .. }) => assert!(error.message().contains(says), "{case}: {error}"),
        other => panic!("{case}: expected Crashed, got {other:?}"),
    }
}

#[test]
fn faults_mid_flow_end_runs_crashed_or_ray_retries_them_and_nothing_is_left() {
    let mut builder = LocalCluster::builder()
        .num_cpus(1)
        .head_env("NODE_NAME", "head")
        // A dead node is noticed in about 3 s instead of 30.
        .head_env("RAY_health_check_period_ms", "1000")
        .head_env("RAY_health_check_timeout_ms", "1000")
        .head_env("RAY_health_check_failure_threshold", "3");
    let names: Vec<String> = (1..=WORKER_NODES).map(|i| format!("n{i}")).collect();
    for name in &names {
        builder = builder.node(1, [("worker_node", 1.0)], [("NODE_NAME", name.as_str())]);
    }
    let cluster = Mutex::new(builder.start().expect("a four-node cluster starts"));
    let cluster_dir = cluster.lock().unwrap().dir().display().to_string();
    let dir = tempfile::tempdir().unwrap();

    // An executor or a worker killed mid-run: Crashed without retries, the value with them.
    let (outcome, _) = strike(&cluster, dir.path(), Victim::Executor, 0);
    assert_crashed(outcome, "killed by signal SIGKILL", "executor, no retries");
    let (outcome, _) = strike(&cluster, dir.path(), Victim::Executor, 1);
    assert_eq!(outcome.unwrap(), 42, "executor, one retry");
    let (outcome, _) = strike(&cluster, dir.path(), Victim::Worker, 0);
    assert_crashed(outcome, "", "worker, no retries");
    let (outcome, _) = strike(&cluster, dir.path(), Victim::Worker, 1);
    assert_eq!(outcome.unwrap(), 42, "worker, one retry");

    // A value lost with its node: Ray runs the task that made it again, on another node.
    {
        #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
        fn rebuilt(address: &str, token: &str, cluster: &Mutex<LocalCluster>, dir: &Path) -> Result<u64, TaskError> {
            let value = remote_options(RemoteOptions::new().max_retries(2), || produce.submit(dir.to_path_buf()));
            value.wait(None);
            let made_on = std::fs::read_to_string(dir.join("produce.attempts")).unwrap();
            let node: usize = made_on.trim().trim_start_matches('n').parse().unwrap();
            cluster.lock().unwrap().kill_node(node);
            sum_of.submit(&value).result()
        }
        let (address, token) = {
            let cluster = cluster.lock().unwrap();
            (cluster.gcs_address().to_owned(), cluster.auth_token().to_owned())
        };
        let sum = rebuilt(&address, &token, &cluster, dir.path()).unwrap();
        assert_eq!(sum, 7 << 20, "the lost value was rebuilt whole");
        let attempts = std::fs::read_to_string(dir.path().join("produce.attempts")).unwrap();
        let nodes: Vec<_> = attempts.lines().collect();
        assert_eq!(nodes.len(), 2, "made twice: {nodes:?}");
        assert_ne!(nodes[0], nodes[1], "the second time on another node");
    }

    // A whole node killed mid-run: with a retry, the run moves to the last node left;
    // without, it ends Crashed.
    let (outcome, first) = strike(&cluster, dir.path(), Victim::Node, 1);
    assert_eq!(outcome.unwrap(), 42, "node, one retry");
    let (outcome, last) = strike(&cluster, dir.path(), Victim::Node, 0);
    assert_ne!(first, last);
    assert_crashed(outcome, "", "node, no retries");

    // Nothing of the cluster outlives it: no raylet, worker or executor.
    drop(cluster);
    let gone = eventually(Duration::from_secs(30), || processes_mentioning(&cluster_dir).is_empty());
    assert!(gone, "processes survived the cluster: {:?}", processes_mentioning(&cluster_dir));
}

/// Takes memory, 64 MiB at a time, up to 8 GiB; each attempt notes itself.
#[task]
fn hoard(dir: PathBuf) -> usize {
    use std::io::Write;
    let mut attempts = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("hoard.attempts")).unwrap();
    writeln!(attempts, "{}", std::process::id()).unwrap();
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..128 {
        held.push(vec![1u8; 64 << 20]);
        std::thread::sleep(Duration::from_millis(20));
    }
    held.len()
}

/// Bytes of memory in use on this machine now, and in all.
fn memory_in_use() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        let line = info.lines().find(|line| line.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    let (installed, available) = (field("MemTotal:"), field("MemAvailable:"));
    (installed - available, installed)
}

#[test]
fn a_task_that_runs_out_of_memory_is_tried_a_bounded_number_of_times_then_crashes_saying_so() {
    // Ray's memory monitor kills workers once the machine's memory use passes a threshold:
    // here 1.5 GiB above what is in use now, so the test never pushes the machine far.
    let (in_use, installed) = memory_in_use();
    let threshold = (in_use + (3 << 29)) as f64 / installed as f64;
    let cluster = LocalCluster::builder()
        .num_cpus(1)
        .head_env("RAY_memory_usage_threshold", &format!("{threshold:.3}"))
        .head_env("RAY_memory_monitor_refresh_ms", "100")
        .start()
        .expect("a one-node cluster starts");
    let dir = tempfile::tempdir().unwrap();
    #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
    fn greedy(address: &str, token: &str, dir: &Path) -> TaskError {
        hoard.submit(dir.to_path_buf()).result().unwrap_err()
    }
    let error = greedy(cluster.gcs_address(), cluster.auth_token(), dir.path()).unwrap();
    assert!(matches!(error, TaskError::Crashed { .. }), "{error:?}");
    assert!(error.message().starts_with("out of memory: Ray's memory monitor killed the task's worker"), "{error}");
    // At most the first attempt and two retries. (A worker may be killed before its task
    // starts, while an earlier attempt's memory is still being freed: it leaves no line.)
    let attempts = std::fs::read_to_string(dir.path().join("hoard.attempts")).unwrap_or_default();
    let count = attempts.lines().count();
    assert!(count <= 3, "a bounded number of attempts, not {count}: {attempts}");
    // Each attempt's executor went with its worker: none holds its memory on.
    for pid in attempts.lines() {
        let gone = eventually(Duration::from_secs(10), || !Path::new(&format!("/proc/{pid}")).exists());
        assert!(gone, "the executor {pid} of a killed worker is gone");
    }
}
