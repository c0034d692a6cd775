//! RayTaskRunner on a real Ray cluster (the shared one from `cargo xtask test`, or one of
//! the test's own): placement, options, data flow, failures.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use prefect::{PrefectFuture, State, TaskError, flow, task};
use prefect_ray::{RemoteOptions, remote_options};
use serde::{Deserialize, Serialize};
use support::{Cluster, cluster, max_overlap, now, rendezvous};

/// The title of the process that started this executor: Ray names a worker after the task
/// it runs (`ray::identify`).
#[task]
fn identify(step: u32) -> (u32, String, String) {
    let parent = std::os::unix::process::parent_id();
    let title = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap_or_default();
    let title = String::from_utf8_lossy(&title).replace('\0', " ").trim().to_owned();
    (step, title, std::env::var("NODE_NAME").unwrap_or_default())
}

#[task]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
fn total(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

#[task]
fn nap(millis: u64) -> (f64, f64) {
    let start = now();
    std::thread::sleep(Duration::from_millis(millis));
    (start, now())
}

#[task(num_cpus = 2)]
fn nap_on_two_cpus(millis: u64) -> (f64, f64) {
    let start = now();
    std::thread::sleep(Duration::from_millis(millis));
    (start, now())
}

#[task(resources = {"special": 1})]
fn on_special(step: u32) -> String {
    let _ = step;
    std::env::var("NODE_NAME").unwrap_or_default()
}

#[task(num_cpus = 64)]
fn too_big() -> u8 {
    1
}

#[task(remote_options = {"runtime_env": {"env_vars": {"PASSED_THROUGH": "yes"}}})]
fn read_passed_env() -> String {
    std::env::var("PASSED_THROUGH").unwrap_or_default()
}

#[task]
fn meet(dir: PathBuf, name: String, count: usize) -> bool {
    rendezvous(&dir, &name, count)
}

#[test]
fn runs_are_ray_tasks_named_after_their_task() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn identified(cluster: &Cluster) -> Vec<(u32, String, String)> {
        identify.map(0..3).iter().map(|f| f.result().unwrap()).collect()
    }
    let results = identified(&cluster).unwrap();
    assert_eq!(results.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 2]);
    for (_, title, node) in &results {
        assert!(title.starts_with("ray::identify"), "the Ray worker runs a task named identify: {title}");
        assert!(node == "head" || node == "special", "ran on a node of the cluster: {node:?}");
    }
}

#[test]
fn futures_lists_and_wait_for_become_ray_dependencies() {
    let cluster = cluster();
    #[flow(task_runner = cluster.client_runner())]
    fn arithmetic(cluster: &Cluster) -> (i64, i64) {
        let one = add.submit(0, 1);
        let two = add.submit(&one, &one);
        let parts: Vec<PrefectFuture<i64>> = add.map(vec![1, 2, 3], [two.clone(), two.clone(), one.clone()]);
        let sum = total.submit(&parts);
        let after = add.wait_for((&sum, &parts)).submit(100, 1);
        (sum.result().unwrap(), after.result().unwrap())
    }
    assert_eq!(arithmetic(&cluster).unwrap(), (3 + 4 + 4, 101));
}

#[test]
fn a_task_that_needs_two_cpus_runs_alone_on_a_two_cpu_node() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn wide(cluster: &Cluster) -> Vec<(f64, f64)> {
        nap_on_two_cpus.map(vec![400, 400]).iter().map(|f| f.result().unwrap()).collect()
    }
    let intervals = wide(&cluster).unwrap();
    assert_eq!(max_overlap(&intervals), 1, "only the head has 2 CPUs, so they ran one after the other: {intervals:?}");
}

#[test]
fn a_task_that_needs_a_custom_resource_runs_only_where_it_is() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn placed(cluster: &Cluster) -> Vec<String> {
        on_special.map(0..4).iter().map(|f| f.result().unwrap()).collect()
    }
    assert_eq!(placed(&cluster).unwrap(), vec!["special"; 4]);
}

#[test]
fn a_request_no_node_can_meet_fails_at_once_with_a_clear_error() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn impossible(cluster: &Cluster) -> TaskError {
        too_big.submit().result().unwrap_err()
    }
    let error = impossible(&cluster).unwrap();
    assert!(matches!(error, TaskError::Failed { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("no node of the Ray cluster can ever meet this request (CPU: 64)"), "{message}");
}

#[test]
fn scoped_remote_options_nest_and_the_inner_scope_wins() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn scoped(cluster: &Cluster) -> (Vec<(f64, f64)>, bool) {
        let dir = std::env::temp_dir().join(format!("meet-{}", uuid::Uuid::new_v4()));
        remote_options(RemoteOptions::new().num_cpus(2.0), || {
            let serial: Vec<_> = nap.map(vec![300, 300]).iter().map(|f| f.result().unwrap()).collect();
            let met = remote_options(RemoteOptions::new().num_cpus(1.0), || {
                let a = meet.submit(dir.clone(), "a".to_owned(), 2);
                let b = meet.submit(dir.clone(), "b".to_owned(), 2);
                a.result().unwrap() && b.result().unwrap()
            });
            let _ = std::fs::remove_dir_all(&dir);
            (serial, met)
        })
    }
    let (serial, met) = scoped(&cluster).unwrap();
    assert_eq!(max_overlap(&serial), 1, "the outer scope's 2 CPUs per run kept them apart: {serial:?}");
    assert!(met, "the inner scope's 1 CPU per run let two runs meet");
}

#[test]
fn other_ray_options_pass_through() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn passed(cluster: &Cluster) -> String {
        read_passed_env.submit().result().unwrap()
    }
    assert_eq!(passed(&cluster).unwrap(), "yes");
}

#[task]
fn fail_with(message: String) -> Result<u8, String> {
    Err(message)
}

#[task]
fn panic_with(message: String) -> u8 {
    panic!("{message}")
}

#[task]
fn plus_one(value: u8) -> u8 {
    value + 1
}

/// A number that refuses to be odd when it is read back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(try_from = "u32")]
struct Even(u32);

impl TryFrom<u32> for Even {
    type Error = String;
    fn try_from(value: u32) -> Result<Self, String> {
        if value.is_multiple_of(2) { Ok(Even(value)) } else { Err(format!("{value} is odd")) }
    }
}

#[task]
fn half(number: Even) -> u32 {
    number.0 / 2
}

#[test]
fn errors_panics_and_undecodable_arguments_fail_with_their_message() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn failing(cluster: &Cluster) -> (TaskError, TaskError, State, TaskError) {
        let error = fail_with.submit("bad input".to_owned());
        let panic = panic_with.submit("kaboom".to_owned());
        let downstream = plus_one.submit(&error);
        // An argument that serializes but does not decode again as the parameter's type.
        let undecodable = half.submit(Even(3));
        (
            error.result().unwrap_err(),
            panic.result().unwrap_err(),
            downstream.wait(None).unwrap(),
            undecodable.result().unwrap_err(),
        )
    }
    let (error, panic, downstream, undecodable) = failing(&cluster).unwrap();
    assert!(matches!(error, TaskError::Failed { .. }) && error.message().contains("bad input"), "{error}");
    assert!(
        matches!(panic, TaskError::Failed { .. }) && panic.message().contains("Task run panicked: kaboom"),
        "{panic}"
    );
    assert_eq!(downstream.name, "NotReady");
    assert!(downstream.message.as_deref().unwrap().contains(error.task_run()), "{downstream}");
    assert!(
        undecodable.message().contains("could not deserialize parameter 'number' of task 'half'")
            && undecodable.message().contains("3 is odd"),
        "{undecodable}"
    );
}

#[task]
fn abort_once(marker: PathBuf) -> String {
    if !marker.exists() {
        std::fs::write(&marker, b"aborted once").unwrap();
        std::process::abort();
    }
    "survived".to_owned()
}

#[task(max_retries = 0)]
fn abort_always() -> u8 {
    std::process::abort()
}

#[task(max_retries = 0)]
fn exit_quietly() -> u8 {
    std::process::exit(0)
}

#[task(max_retries = 0)]
fn kill_my_worker() -> u8 {
    let worker = std::os::unix::process::parent_id() as i32;
    // SAFETY: sends a signal; no memory is involved.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    std::thread::sleep(Duration::from_secs(30));
    1
}

#[test]
fn a_dying_executor_or_worker_crashes_the_run_and_ray_can_retry_it() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn crashing(cluster: &Cluster, marker: PathBuf) -> (TaskError, TaskError, TaskError, String, State) {
        let aborted = abort_always.submit();
        let exited = exit_quietly.submit();
        let killed = kill_my_worker.submit();
        let downstream = plus_one.submit(&aborted);
        let retried = remote_options(RemoteOptions::new().max_retries(1), || abort_once.submit(marker));
        (
            aborted.result().unwrap_err(),
            exited.result().unwrap_err(),
            killed.result().unwrap_err(),
            retried.result().unwrap(),
            downstream.wait(None).unwrap(),
        )
    }
    let marker = std::env::temp_dir().join(format!("abort-once-{}", uuid::Uuid::new_v4()));
    let (aborted, exited, killed, retried, downstream) = crashing(&cluster, marker.clone()).unwrap();
    let _ = std::fs::remove_file(marker);
    assert!(matches!(exited, TaskError::Crashed { .. }), "{exited:?}");
    assert!(exited.message().contains("died while running it: it exited with code 0"), "{exited}");
    assert!(matches!(aborted, TaskError::Crashed { .. }), "{aborted:?}");
    assert!(aborted.message().contains("killed by signal SIGABRT"), "{aborted}");
    assert!(matches!(killed, TaskError::Crashed { .. }), "{killed:?}");
    assert_eq!(retried, "survived", "Ray ran the crashed task again, as max_retries allows");
    assert_eq!(downstream.name, "NotReady", "{downstream}");
}

/// Starts a large value's shared-memory file as the executor names it, then dies before
/// handing it over, as an executor killed while writing a value does.
#[task]
fn die_while_writing() -> String {
    let path = format!("/dev/shm/prefect-ray-{}-half-written", std::process::id());
    std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
    println!("{path}");
    std::process::abort();
}

#[test]
fn a_dead_executors_half_written_shared_memory_file_is_removed() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn dying(cluster: &Cluster) -> TaskError {
        die_while_writing.submit().result().unwrap_err()
    }
    let before: std::collections::HashSet<_> = shm_files();
    let error = dying(&cluster).unwrap();
    assert!(matches!(error, TaskError::Crashed { .. }), "{error:?}");
    // Aborted, so the file was written (a failed write would have panicked: Failed).
    assert!(error.message().contains("killed by signal SIGABRT"), "{error}");
    let left: Vec<_> =
        shm_files().difference(&before).filter(|name| name.ends_with("-half-written")).cloned().collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

fn shm_files() -> std::collections::HashSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|entries| entries.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[task(timeout_seconds = 0.5)]
fn hang(pid_file: PathBuf) -> u8 {
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(60));
    1
}

#[test]
fn a_timeout_stops_the_task_on_ray() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn timing_out(cluster: &Cluster, pid_file: PathBuf) -> (TaskError, State) {
        let future = hang.submit(pid_file);
        (future.result().unwrap_err(), future.state())
    }
    let pid_file = std::env::temp_dir().join(format!("hang-{}", uuid::Uuid::new_v4()));
    let (error, state) = timing_out(&cluster, pid_file.clone()).unwrap();
    assert_eq!(state.name, "TimedOut");
    assert!(error.message().contains("Task run exceeded timeout of 0.5 second(s)"), "{error}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let _ = std::fs::remove_file(&pid_file);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the executor running the hung attempt (pid {pid}) was ended"
    );
}

#[test]
fn init_kwargs_reach_ray_init_and_the_namespace_defaults_to_prefect() {
    let cluster = cluster();
    #[task]
    fn read_env() -> String {
        std::env::var("FROM_INIT_KWARGS").unwrap_or_default()
    }
    #[flow(task_runner = cluster.runner().init_kwargs(serde_json::json!({
        "runtime_env": {"env_vars": {"FROM_INIT_KWARGS": "hello"}}
    })))]
    fn configured(cluster: &Cluster) -> (String, String) {
        let stats = prefect_ray::diagnostics::bridge_stats().unwrap();
        (read_env.submit().result().unwrap(), stats.namespace)
    }
    #[flow(task_runner = cluster.runner().init_kwargs(serde_json::json!({"namespace": "elsewhere"})))]
    fn namespaced(cluster: &Cluster) -> String {
        prefect_ray::diagnostics::bridge_stats().unwrap().namespace
    }
    assert_eq!(configured(&cluster).unwrap(), ("hello".to_owned(), "prefect".to_owned()));
    assert_eq!(namespaced(&cluster).unwrap(), "elsewhere");
}

#[test]
fn a_subflow_on_ray_reuses_its_parents_connection_and_leaves_it_running() {
    let cluster = cluster();
    #[flow(task_runner = prefect_ray::RayTaskRunner::new())]
    fn child() -> (u32, i64) {
        (prefect_ray::diagnostics::bridge_stats().unwrap().bridge_pid, add.submit(1, 1).result().unwrap())
    }
    #[flow(task_runner = cluster.runner())]
    fn parent(cluster: &Cluster) -> (u32, u32, i64, i64) {
        let mine = prefect_ray::diagnostics::bridge_stats().unwrap().bridge_pid;
        let (theirs, value) = child().unwrap();
        let after = add.submit(value, 1).result().unwrap();
        (mine, theirs, value, after)
    }
    let (mine, theirs, value, after) = parent(&cluster).unwrap();
    assert_eq!(mine, theirs, "the subflow used the parent's Ray connection");
    assert_eq!((value, after), (2, 3), "and the parent's connection still works after it");
}

#[test]
fn two_flows_at_once_each_get_the_cluster_their_runner_asked_for() {
    let cluster = cluster();
    /// Holds both flows until both are connected (at most a minute), so each runner meets
    /// the other's bridge.
    fn both_connected() {
        static ARRIVED: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
        static ALL_HERE: std::sync::Condvar = std::sync::Condvar::new();
        let mut arrived = ARRIVED.lock().unwrap();
        *arrived += 1;
        ALL_HERE.notify_all();
        let (arrived, _) = ALL_HERE.wait_timeout_while(arrived, Duration::from_secs(60), |n| *n < 2).unwrap();
        assert_eq!(*arrived, 2, "both flows connected");
    }
    #[task]
    fn executable() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }
    #[flow(task_runner = cluster.runner())]
    fn on_the_cluster(cluster: &Cluster) -> String {
        both_connected();
        executable.submit().result().unwrap()
    }
    #[flow(task_runner = prefect_ray::RayTaskRunner::new())]
    fn on_a_temporary_instance() -> String {
        both_connected();
        executable.submit().result().unwrap()
    }
    let (elsewhere, here) = std::thread::scope(|scope| {
        let elsewhere = scope.spawn(|| on_the_cluster(&cluster).unwrap());
        let here = on_a_temporary_instance().unwrap();
        (elsewhere.join().unwrap(), here)
    });
    let resources = cluster.dir.display().to_string();
    assert!(elsewhere.starts_with(&resources), "{elsewhere} ran on the cluster (shipped, under {resources})");
    assert_eq!(here, std::env::current_exe().unwrap().display().to_string(), "ran on the temporary instance");
}

#[test]
fn the_executor_is_shipped_to_the_cluster_through_ray_client_and_gcs() {
    let cluster = cluster();
    #[task]
    fn executable() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }
    #[flow(task_runner = if through_client { cluster.client_runner() } else { cluster.runner() })]
    fn located(cluster: &Cluster, through_client: bool) -> String {
        executable.submit().result().unwrap()
    }
    let resources = cluster.dir.display().to_string();
    for through_client in [true, false] {
        let path = located(&cluster, through_client).unwrap();
        assert!(path.starts_with(&resources), "{path} is under the cluster's directory {resources}");
        assert!(path.contains("/runtime_resources/py_modules_files/"), "{path} came with the runtime_env");
    }
}

#[test]
fn the_cluster_outlives_the_flows_that_used_it() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn once(cluster: &Cluster, value: i64) -> i64 {
        add.submit(value, 1).result().unwrap()
    }
    assert_eq!(once(&cluster, 1).unwrap(), 2);
    assert_eq!(once(&cluster, 2).unwrap(), 3, "a second flow still finds the cluster up");
}

#[test]
fn a_wrong_or_missing_token_fails_within_seconds_with_a_clear_error_through_gcs_and_ray_client() {
    let cluster = cluster();
    #[flow(task_runner = match token {
        Some(token) => prefect_ray::RayTaskRunner::new().address(address).auth_token(token),
        None => prefect_ray::RayTaskRunner::new().address(address),
    })]
    fn refused(address: &str, token: Option<&str>) {}
    let cases = [
        (&cluster.gcs_address, Some("not-the-token")),
        (&cluster.client_address, Some("not-the-token")),
        (&cluster.gcs_address, None),
        (&cluster.client_address, None),
    ];
    for (address, token) in cases {
        let started = std::time::Instant::now();
        let error = refused(address, token).unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(error.runner_error::<prefect_ray::RayError>(), Some(prefect_ray::RayError::TokenRefused { .. })),
            "{address} with {token:?}: {error:?}"
        );
        let error = error.to_string();
        assert!(error.contains("refused this driver's authentication token"), "{error}");
        // Ray alone takes 20 s (GCS) or 90 s (Ray Client) and, through Ray Client, never
        // names the token.
        assert!(took < Duration::from_secs(10), "{address}: refused after {took:?}");
    }
}

#[test]
fn a_cluster_of_another_ray_version_is_refused_within_seconds_naming_both_versions() {
    // A throwaway cluster that says, where Ray keeps it, that it runs another Ray.
    let cluster = prefect_ray::testing::LocalCluster::builder().num_cpus(1).start().expect("a cluster starts");
    let python = std::env::var("PREFECT_RAY_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").to_owned());
    let rewrite = r#"
import json, sys
from ray._private.grpc_utils import init_grpc_channel
from ray.core.generated import gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc
stub = rpc.InternalKVGcsServiceStub(init_grpc_channel(sys.argv[1]))
value = json.dumps({"ray_version": "2.59.0", "python_version": "3.9.18"}).encode()
stub.InternalKVPut(pb.InternalKVPutRequest(namespace=b"cluster", key=b"CLUSTER_METADATA", value=value, overwrite=True), timeout=10)
"#;
    let status = std::process::Command::new(python)
        .args(["-c", rewrite, cluster.gcs_address()])
        .env("RAY_AUTH_MODE", "token")
        .env("RAY_AUTH_TOKEN", cluster.auth_token())
        .status()
        .unwrap();
    assert!(status.success(), "the cluster's metadata was rewritten");
    #[flow(task_runner = prefect_ray::RayTaskRunner::new().address(address).auth_token(token))]
    fn elsewhere(address: &str, token: &str) {}
    let started = std::time::Instant::now();
    let error = elsewhere(cluster.gcs_address(), cluster.auth_token()).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(error.runner_error::<prefect_ray::RayError>(), Some(prefect_ray::RayError::VersionMismatch { .. })),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("the cluster runs Ray 2.59.0 on Python 3.9.18"), "{message}");
    assert!(message.contains("this program's Python has Ray 2.60.0"), "{message}");
    assert!(took < Duration::from_secs(10), "refused after {took:?}");
}

#[test]
fn bad_or_dead_addresses_fail_within_seconds_and_say_why() {
    #[flow(task_runner = prefect_ray::RayTaskRunner::new().address(address))]
    fn connect(address: &str) {}
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cases = [
        (String::new(), "the address is empty"),
        ("ray://".to_owned(), "the address names no host"),
        ("head".to_owned(), "the address names no port"),
        (closed.to_string(), "nothing answers at 127.0.0.1"),
        (format!("ray://{closed}"), "nothing answers at 127.0.0.1"),
    ];
    for (address, says) in cases {
        let started = std::time::Instant::now();
        let error = connect(&address).unwrap_err();
        let took = started.elapsed();
        let ray_error = error.runner_error::<prefect_ray::RayError>();
        assert!(
            matches!(
                ray_error,
                Some(prefect_ray::RayError::InvalidAddress { .. } | prefect_ray::RayError::Unreachable { .. })
            ),
            "{address:?}: {error:?}"
        );
        assert!(error.to_string().contains(says), "{address:?}: {error}");
        assert!(took < Duration::from_secs(5), "{address:?}: failed after {took:?}");
    }
}

#[test]
#[ignore = "runs in a child process with RAY_ADDRESS set"]
fn child_on_auto() {
    #[flow(task_runner = prefect_ray::RayTaskRunner::new().address("auto").auth_token(std::env::var("TOKEN").unwrap()))]
    fn automatic() -> i64 {
        add.submit(20, 22).result().unwrap()
    }
    println!("RESULT={}", automatic().unwrap());
}

#[test]
fn address_auto_finds_the_cluster_in_ray_address() {
    let cluster = cluster();
    let output = support::run_test_in_child(
        "child_on_auto",
        &[("RAY_ADDRESS", cluster.gcs_address.as_str()), ("TOKEN", cluster.auth_token.as_str())],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("RESULT=42"), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
}

#[task]
fn square_unless_unlucky(number: u32) -> Result<u32, String> {
    match number {
        13 => Err("unlucky 13".to_owned()),
        27 => panic!("27 is right out"),
        number => Ok(number * number),
    }
}

#[task]
fn add_up(values: Vec<u32>) -> u32 {
    values.iter().sum()
}

/// What a big map left behind: each run's id, state and value, and how many Ray tasks ran them.
type Mapped = (Vec<(uuid::Uuid, State, Option<u32>)>, u32, State, u64);

#[test]
fn a_big_map_goes_in_batches_and_every_run_keeps_its_own_state_and_value() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn mapped(cluster: &Cluster) -> Mapped {
        let futures = square_unless_unlucky.map(0..200u32);
        let first_ten = add_up.submit(&futures[..10]);
        let after_unlucky = plus_one.wait_for(&futures[13]).submit(1);
        let runs = futures.iter().map(|f| (f.task_run_id(), f.wait(None).unwrap(), f.result().ok())).collect();
        let ray_tasks = prefect_ray::diagnostics::bridge_stats().unwrap().ray_tasks;
        (runs, first_ten.result().unwrap(), after_unlucky.wait(None).unwrap(), ray_tasks)
    }
    let (runs, first_ten, after_unlucky, ray_tasks) = mapped(&cluster).unwrap();
    assert!(ray_tasks < 100, "200 runs went to Ray in batches: {ray_tasks} Ray tasks");
    let ids: std::collections::HashSet<_> = runs.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids.len(), 200, "every run is a task run of its own");
    for (number, (_, state, value)) in runs.iter().enumerate() {
        match number {
            13 => assert!(state.is_failed() && state.message.as_deref().unwrap().contains("unlucky 13"), "{state}"),
            27 => {
                assert!(state.is_failed() && state.message.as_deref().unwrap().contains("27 is right out"), "{state}")
            }
            n => assert_eq!((state.is_completed(), *value), (true, Some((n * n) as u32)), "run {n}: {state}"),
        }
    }
    assert_eq!(first_ten, (0..10).map(|n| n * n).sum::<u32>(), "values of batched runs reach other tasks");
    assert_eq!(after_unlucky.name, "NotReady", "{after_unlucky}");
}

/// What a loop of submissions left behind: each run's id, state and value, how many Ray
/// tasks ran them, and how many ran a lone submission before them.
type Submitted = (Vec<(uuid::Uuid, State, Option<u32>)>, u64, u64);

#[test]
fn submissions_that_pile_up_go_in_batches_and_every_run_keeps_its_own_state_and_value() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn submitted(cluster: &Cluster) -> Submitted {
        let ray_tasks = || prefect_ray::diagnostics::bridge_stats().unwrap().ray_tasks;
        let before = ray_tasks();
        assert_eq!(square_unless_unlucky.submit(3).result().unwrap(), 9);
        let lone = ray_tasks() - before;
        // Submitted far faster than Ray takes tasks: they pile up in the bridge's input.
        let futures: Vec<_> = (0..400u32).map(|n| square_unless_unlucky.submit(n)).collect();
        let runs = futures.iter().map(|f| (f.task_run_id(), f.wait(None).unwrap(), f.result().ok())).collect();
        (runs, ray_tasks() - before - lone, lone)
    }
    let (runs, ray_tasks, lone) = submitted(&cluster).unwrap();
    assert_eq!(lone, 1, "a lone submission is a Ray task of its own");
    assert!(ray_tasks < 400, "400 submissions went to Ray in batches: {ray_tasks} Ray tasks");
    let ids: std::collections::HashSet<_> = runs.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids.len(), 400, "every run is a task run of its own");
    for (number, (_, state, value)) in runs.iter().enumerate() {
        match number {
            13 | 27 => assert!(state.is_failed(), "run {number}: {state}"),
            n => assert_eq!((state.is_completed(), *value), (true, Some((n * n) as u32)), "run {n}: {state}"),
        }
    }
}

#[test]
fn max_batch_one_sends_every_run_of_a_map_and_of_a_loop_alone() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner().max_batch(1))]
    fn unbatched(cluster: &Cluster) -> u64 {
        let before = prefect_ray::diagnostics::bridge_stats().unwrap().ray_tasks;
        square_unless_unlucky.map(100..160u32).iter().for_each(|f| {
            f.wait(None);
        });
        let submitted: Vec<_> = (100..300u32).map(|n| square_unless_unlucky.submit(n)).collect();
        submitted.iter().for_each(|f| {
            f.wait(None);
        });
        prefect_ray::diagnostics::bridge_stats().unwrap().ray_tasks - before
    }
    assert_eq!(unbatched(&cluster).unwrap(), 260);
}

#[test]
#[ignore = "runs in a child process, whose log is the default one on stderr"]
fn child_on_a_cluster_with_a_dashboard() {
    let cluster = prefect_ray::testing::LocalCluster::builder()
        .dashboard(true)
        .node(1, [], [])
        .start()
        .expect("a cluster with a dashboard starts");
    #[flow(task_runner = prefect_ray::RayTaskRunner::new().address(address).auth_token(token))]
    fn observed(address: &str, token: &str) -> i64 {
        add.submit(1, 2).result().unwrap()
    }
    println!(
        "RESULT={} DASHBOARD={}",
        observed(cluster.gcs_address(), cluster.auth_token()).unwrap(),
        cluster.dashboard_url().unwrap()
    );
}

#[test]
fn the_runner_logs_the_live_nodes_and_the_dashboard() {
    let output = support::run_test_in_child("child_on_a_cluster_with_a_dashboard", &[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let dashboard = stdout
        .split("DASHBOARD=")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("{stdout}\n{stderr}"));
    assert!(stdout.contains("RESULT=3"), "{stdout}");
    assert!(
        stderr.contains(&format!("(Ray 2.60.0): 2 live node(s); dashboard at {dashboard}")),
        "the start names the nodes and the dashboard:\n{stderr}"
    );
}

#[task]
fn sleep_long(pid_file: PathBuf) -> u8 {
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(60));
    1
}

#[test]
fn a_flow_timeout_cancels_its_runs_on_ray() {
    let cluster = cluster();
    #[flow(task_runner = prefect_ray::RayTaskRunner::new().address(&address).auth_token(&token), timeout_seconds = 5)]
    fn impatient(address: String, token: String, pid_file: PathBuf) -> u8 {
        sleep_long.submit(pid_file).result().unwrap_or(0)
    }
    let pid_file = std::env::temp_dir().join(format!("sleep-long-{}", uuid::Uuid::new_v4()));
    let started = std::time::Instant::now();
    let error = impatient(cluster.gcs_address.clone(), cluster.auth_token.clone(), pid_file.clone()).unwrap_err();
    assert!(error.message().contains("Flow run exceeded timeout of 5.0 second(s)"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(50), "the flow did not wait for the 60 s task");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let _ = std::fs::remove_file(&pid_file);
    assert!(
        support::eventually(Duration::from_secs(20), || !std::path::Path::new(&format!("/proc/{pid}")).exists()),
        "the executor running the cancelled task (pid {pid}) was ended"
    );
}

/// Whether the process is gone: exited, or a zombie its parent has not reaped yet.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn runs_in_flight_or_submitted_after_the_bridge_dies_end_crashed_at_once() {
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn orphaned(cluster: &Cluster) -> (Vec<TaskError>, Duration) {
        add.submit(1, 2).wait(None);
        let in_flight: Vec<_> = (0..2).map(|_| nap.submit(60_000)).collect();
        let bridge = prefect_ray::diagnostics::bridge_stats().expect("the bridge is up").bridge_pid;
        // The bridge runs a script in the directory of its own: .../prefect-ray-XXXXXX/bridge/.
        let command = std::fs::read(format!("/proc/{bridge}/cmdline")).unwrap();
        let script = String::from_utf8_lossy(&command).split('\0').find(|arg| arg.ends_with(".py")).unwrap().to_owned();
        let own_dir = PathBuf::from(script).parent().unwrap().parent().unwrap().to_path_buf();
        assert!(own_dir.exists(), "{own_dir:?}");
        // SAFETY: kill(2) on the bridge, a child of this process; no memory is involved.
        unsafe { libc::kill(bridge as libc::pid_t, libc::SIGKILL) };
        assert!(support::eventually(Duration::from_secs(10), || is_dead(bridge)), "the bridge died");
        let started = std::time::Instant::now();
        let after: Vec<_> = (0..50).map(|i| add.submit(i, 1)).collect();
        let no_value = "no run completes without a bridge";
        let mut errors: Vec<TaskError> = after.iter().map(|f| f.result().expect_err(no_value)).collect();
        errors.extend(in_flight.iter().map(|f| f.result().expect_err(no_value)));
        let took = started.elapsed();
        // Its files go with it, before the flow ends (a Ctrl-C now would leave nothing).
        assert!(support::eventually(Duration::from_secs(5), || !own_dir.exists()), "{own_dir:?} is gone");
        (errors, took)
    }
    let (errors, took) = orphaned(&cluster).unwrap();
    assert!(took < Duration::from_secs(2), "every run ended at once: {took:?}");
    assert_eq!(errors.len(), 52);
    for error in errors {
        assert!(matches!(error, TaskError::Crashed { .. }), "{error:?}");
        assert!(error.message().contains("the Ray bridge process exited unexpectedly (killed by signal 9)"), "{error}");
    }
}

/// A task's state hooks run in the program, once per final state, for runs on Ray too: a
/// run that Ray retried after a crash is one run with one final state.
#[test]
fn state_hooks_of_tasks_on_ray_run_once_in_the_program() {
    use std::sync::Mutex;
    static CALLS: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
    fn record(run: &prefect::TaskRun, state: &prefect::State) {
        CALLS.lock().unwrap().push((std::process::id(), format!("{} {}", run.name(), state.name)));
    }
    #[prefect::task(task_run_name = "hooked-{value}", on_completion = [record], on_failure = [record])]
    fn hooked(value: u32) -> Result<u32, String> {
        if value == 0 { Err("zero".into()) } else { Ok(value) }
    }
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn with_hooks(cluster: &Cluster) {
        let futures = hooked.map(0..3u32);
        prefect::wait(&futures, None);
    }
    with_hooks(&cluster).unwrap();
    let mut calls = CALLS.lock().unwrap().clone();
    calls.sort();
    let program = std::process::id();
    assert_eq!(
        calls,
        vec![
            (program, "hooked-0 Failed".to_owned()),
            (program, "hooked-1 Completed".to_owned()),
            (program, "hooked-2 Completed".to_owned())
        ]
    );
}

/// A task's retry condition runs in the executor, where the attempts run: a failure it
/// declines is not retried on Ray either.
#[test]
fn a_retry_condition_applies_on_ray() {
    fn transient_only(state: &State) -> bool {
        state.message.as_deref().is_some_and(|message| message.contains("transient"))
    }
    #[task(retries = 2, retry_condition_fn = transient_only)]
    fn failing(error: String) -> Result<u32, String> {
        Err(error)
    }
    let cluster = cluster();
    #[flow(task_runner = cluster.runner())]
    fn conditional(cluster: &Cluster) -> (u32, u32) {
        let permanent = failing.submit("a permanent error".to_owned());
        let transient = failing.submit("a transient error".to_owned());
        prefect::wait(&[permanent.clone(), transient.clone()], None);
        (permanent.task_run().run_count(), transient.task_run().run_count())
    }
    assert_eq!(conditional(&cluster).unwrap(), (1, 3));
}
