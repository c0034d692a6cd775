//! A node that shares nothing with the program (a mount namespace of its own, where the
//! program's checkout, build directory, `/tmp` and `/dev/shm` are empty, and where the machine
//! allows it a network namespace of its own, at an address of its own): flows run there,
//! values pass to and from it, the program is shipped once and without its debug info, and a
//! program that is not shipped fails there clearly. Nothing of its network outlives it.

mod support;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefect::observe::{LogRecord, RunObserver};
use prefect::{TaskError, flow, task};
use prefect_ray::RayTaskRunner;
use prefect_ray::testing::LocalCluster;
use serde_bytes::ByteBuf;

/// The warnings the runs' logs carried.
#[derive(Default)]
struct Warnings(Mutex<Vec<String>>);

impl RunObserver for Warnings {
    fn log(&self, record: &LogRecord) {
        if record.level == tracing::Level::WARN {
            self.0.lock().unwrap().push(record.message.clone());
        }
    }
}

/// The files called `name` under `dir`, at any depth.
fn files_named(dir: &Path, name: &std::ffi::OsStr) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .flat_map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => files_named(&entry.path(), name),
            Ok(_) if entry.file_name() == name => vec![entry.path()],
            _ => Vec::new(),
        })
        .collect()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where a run on the isolated node finds itself: its node, its executable, and whether it
/// can see the program's own files.
#[task(resources = {"isolated": 1})]
fn look_around(program: String, checkout: String) -> (String, String, bool, bool) {
    (
        std::env::var("NODE_NAME").unwrap_or_default(),
        std::env::current_exe().unwrap().display().to_string(),
        Path::new(&program).exists(),
        Path::new(&checkout).join("Cargo.lock").exists(),
    )
}

/// The network namespace this process is in, and whether it reaches `port` on 127.0.0.1.
fn network_seen(port: u16) -> (String, bool) {
    let namespace = std::fs::read_link("/proc/self/ns/net").unwrap().display().to_string();
    let reached = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok();
    (namespace, reached)
}

#[task(resources = {"isolated": 1})]
fn network_there(port: u16) -> (String, bool) {
    network_seen(port)
}

#[task(resources = {"head": 1})]
fn network_here(port: u16) -> (String, bool) {
    network_seen(port)
}

/// The veth ends in this namespace that lead to `peer`, from `ip -o addr`.
fn links_to(peer: &str) -> Vec<String> {
    let output = std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&format!(" peer {peer}/32 ")))
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// This machine's network links, by name.
fn link_names() -> Vec<String> {
    let output = std::process::Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1).map(|name| name.split('@').next().unwrap_or(name).to_owned()))
        .collect()
}

/// 2 MiB made on the isolated node: too large for the run's report, so it lives in that
/// node's object store.
#[task(resources = {"isolated": 1})]
fn made_there(byte: u8) -> ByteBuf {
    ByteBuf::from(vec![byte; 2 << 20])
}

/// Made on the head (it has no `isolated` resource).
#[task(resources = {"head": 1})]
fn made_here(byte: u8) -> ByteBuf {
    ByteBuf::from(vec![byte; 2 << 20])
}

#[task(resources = {"head": 1})]
fn sum_here(data: ByteBuf) -> u64 {
    data.iter().map(|&b| u64::from(b)).sum()
}

#[task(resources = {"isolated": 1})]
fn sum_there(data: ByteBuf) -> u64 {
    data.iter().map(|&b| u64::from(b)).sum()
}

#[test]
fn flows_run_and_values_pass_on_a_node_that_shares_no_files_with_the_program() {
    let cluster = LocalCluster::builder()
        .num_cpus(1)
        .head_env("NODE_NAME", "head")
        .head_resources([("head", 1.0)])
        .isolated_node(1, [("isolated", 1.0)], [("NODE_NAME", "isolated")])
        .start()
        .expect("a cluster with an isolated node starts");
    let program = std::env::current_exe().unwrap().display().to_string();
    let checkout = env!("CARGO_MANIFEST_DIR").to_owned();
    // Whether the node has a network of its own here; if not, only its files are its own.
    let own_network = match LocalCluster::network_isolation() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipping the network checks: the node shares the program's network here ({why})");
            false
        }
    };

    #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
    fn everywhere(
        address: &str,
        token: &str,
        program: String,
        checkout: String,
    ) -> ((String, String, bool, bool), [u64; 3]) {
        let seen = look_around.submit(program, checkout).result().unwrap();
        let there = made_there.submit(3);
        let here = made_here.submit(5);
        let sums = [
            sum_here.submit(&there).result().unwrap(),
            sum_there.submit(&here).result().unwrap(),
            there.result().unwrap().iter().map(|&b| u64::from(b)).sum(),
        ];
        (seen, sums)
    }
    let ((node, executable, sees_program, sees_checkout), sums) =
        everywhere(cluster.gcs_address(), cluster.auth_token(), program.clone(), checkout.clone()).unwrap();
    assert_eq!(node, "isolated");
    assert!(!sees_program, "the node does not see {program}");
    assert!(!sees_checkout, "the node does not see the checkout {checkout}");
    assert!(
        executable.contains("/runtime_resources/py_modules_files/"),
        "the program came with runtime_env: {executable}"
    );
    let size = 2u64 << 20;
    assert_eq!(sums, [3 * size, 5 * size, 3 * size], "values passed from the node, to it, and back to the program");

    // Its own network: another namespace, at an address of its own, where a port that the
    // program opened on loopback is out of reach (the head, beside the program, reaches it).
    // Through Ray Client too, values pass.
    let (head, node) = (cluster.node_address(0).to_owned(), cluster.node_address(1).to_owned());
    let links = links_to(&node);
    if own_network {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
        fn networks(address: &str, token: &str, port: u16) -> ((String, bool), (String, bool), u64) {
            let there = made_there.submit(9);
            let sum = sum_here.submit(&there).result().unwrap();
            (network_there.submit(port).result().unwrap(), network_here.submit(port).result().unwrap(), sum)
        }
        let program_namespace = std::fs::read_link("/proc/self/ns/net").unwrap().display().to_string();
        for address in [cluster.gcs_address(), cluster.client_address()] {
            let ((there, reached_there), (here, reached_here), sum) =
                networks(address, cluster.auth_token(), port).unwrap();
            assert_ne!(there, program_namespace, "the node has a network namespace of its own ({address})");
            assert!(!reached_there, "the node does not reach the program's 127.0.0.1:{port} ({address})");
            assert_eq!(here, program_namespace, "the head shares the program's network ({address})");
            assert!(reached_here, "the head reaches 127.0.0.1:{port} ({address})");
            assert_eq!(sum, 9 * size, "values pass through {address}");
        }
        drop(listener);
        assert!(head.starts_with("198.1") && node.starts_with("198.1") && head != node, "{head}, {node}");
        assert!(cluster.gcs_address().starts_with(&format!("{head}:")), "{}", cluster.gcs_address());
        assert!(cluster.client_address().starts_with(&format!("ray://{head}:")), "{}", cluster.client_address());
        assert_eq!(links.len(), 1, "one link to the node: {links:?}");
        assert!(links[0].starts_with("prt"), "{links:?}");
        // The node's traffic stays on that link, on this machine.
        let route = std::process::Command::new("ip").args(["-o", "route", "get", &node]).output().unwrap();
        let route = String::from_utf8_lossy(&route.stdout);
        assert!(route.contains(&format!(" dev {} ", links[0])), "{route}");
    } else {
        assert_eq!((head.as_str(), node.as_str()), ("127.0.0.1", "127.0.0.1"));
    }

    // Results are written from the worker: on the isolated node, in its own /tmp, which the
    // program never sees; the second run finds them there.
    #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token))]
    fn kept_there(address: &str, token: &str, storage: String) -> (String, u64) {
        let made = made_there.with_options(|o| {
            o.result_storage = Some(storage.clone());
            o.cache_policy = Some(prefect::results::CachePolicy::INPUTS);
        });
        let future = made.submit(7);
        let sum = future.result().unwrap().iter().map(|&b| u64::from(b)).sum();
        (future.state().name.into_owned(), sum)
    }
    let storage = std::env::temp_dir().join(format!("prefect-results-{}", uuid::Uuid::new_v4().simple()));
    let location = storage.display().to_string();
    let warnings = Arc::new(Warnings::default());
    prefect::observe::add_observer(warnings.clone());
    let first = kept_there(cluster.gcs_address(), cluster.auth_token(), location.clone()).unwrap();
    let second = kept_there(cluster.gcs_address(), cluster.auth_token(), location).unwrap();
    let seen_here = std::fs::read_dir(&storage).map(|entries| entries.count()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&storage);
    assert_eq!(first, ("Completed".to_owned(), 7 * size));
    assert_eq!(second, ("Cached".to_owned(), 7 * size), "the record the worker wrote on its own node");
    assert_eq!(seen_here, 0, "no value passed through the program to be stored");
    // A local directory is each node's own: the user is told, once, and what to use instead.
    let warned: Vec<String> = warnings.0.lock().unwrap().clone();
    let unshared: Vec<&String> =
        warned.iter().filter(|w| w.contains("a local directory, on a Ray cluster of 2 nodes")).collect();
    assert_eq!(unshared.len(), 1, "{warned:#?}");
    assert!(unshared[0].contains("s3://"), "{}", unshared[0]);

    // The three flows shipped the same bytes, which Ray keeps by their hash: the head unpacked
    // the program once, and without its debug info.
    let name = Path::new(&program).file_name().unwrap().to_owned();
    let shipped = files_named(cluster.dir(), &name);
    assert_eq!(shipped.len(), 1, "one copy of the program on the head: {shipped:#?}");
    let (shipped_size, program_size) = (file_size(&shipped[0]), file_size(Path::new(&program)));
    assert!(shipped_size < program_size, "shipped {shipped_size} bytes of a {program_size}-byte program");

    // Not shipped, the program is not there: the run says so.
    #[flow(task_runner = RayTaskRunner::new().address(address).auth_token(token).ship_executor(false))]
    fn unshipped(address: &str, token: &str, program: String, checkout: String) -> TaskError {
        prefect_ray::remote_options(prefect_ray::RemoteOptions::new().max_retries(0), || {
            look_around.submit(program, checkout).result().unwrap_err()
        })
    }
    let error = unshipped(cluster.gcs_address(), cluster.auth_token(), program.clone(), checkout).unwrap();
    assert!(matches!(error, TaskError::Crashed { .. }), "{error:?}");
    assert!(
        error.message().contains(&format!("the program that runs the task is not on this node at {program}")),
        "{error}"
    );

    // Nothing of the node's network outlives the cluster: its link goes with its namespace
    // (which the kernel tears down a moment after the last process in it).
    drop(cluster);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = link_names().into_iter().filter(|name| links.contains(name)).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "links left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(links_to(&node).is_empty(), "an address left behind");
}
