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
            (future.state().name.into_owned(), value, future.task_run().clone())
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

/// An S3-compatible server (s3s-fs, which `cargo xtask setup` installs) on a free port of
/// 127.0.0.1, serving the buckets under a directory of its own; stopped when dropped.
struct S3Server {
    process: std::process::Child,
    endpoint: String,
    root: tempfile::TempDir,
}

impl S3Server {
    const ACCESS_KEY: &str = "prefect-test";
    const SECRET_KEY: &str = "prefect-test-secret";

    fn start(bucket: &str) -> Self {
        let binary = std::env::var_os("PREFECT_TEST_S3_SERVER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/s3s-fs"));
        assert!(binary.exists(), "{} is missing: run `cargo xtask setup`", binary.display());
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = std::process::Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", Self::ACCESS_KEY, "--secret-key", Self::SECRET_KEY])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let up = support::eventually(std::time::Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "the S3 server did not open port {port}");
        Self { process, endpoint: format!("http://127.0.0.1:{port}"), root }
    }

    /// What a process needs to reach the server: object_store reads these, as AWS tools do.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.to_owned()),
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }

    /// The objects stored under `prefix` of `bucket`, as files of the server's directory.
    fn objects(&self, bucket: &str, prefix: &str) -> usize {
        std::fs::read_dir(self.root.path().join(bucket).join(prefix)).map(|entries| entries.count()).unwrap_or(0)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[test]
fn values_go_to_s3_compatible_storage_from_the_workers_and_serve_the_next_run() {
    let cluster = support::cluster();
    let s3 = S3Server::start("results");
    let env = s3.env();
    // The workers get the credentials as a Ray user gives them any setting: runtime_env.
    let worker_env: serde_json::Map<String, serde_json::Value> =
        env.iter().map(|(name, value)| ((*name).to_owned(), value.clone().into())).collect();
    let mut child_env: Vec<(&str, &str)> = env.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let worker_env = serde_json::Value::Object(worker_env).to_string();
    child_env.extend([
        ("PREFECT_RESULTS_STORAGE", "s3://results/pipeline"),
        ("ADDRESS", cluster.gcs_address.as_str()),
        ("TOKEN", cluster.auth_token.as_str()),
        ("WORKER_ENV", worker_env.as_str()),
    ]);
    let output = support::run_test_in_child("child_with_s3_storage", &child_env);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("FIRST=Completed*20 SECOND=Cached*20"), "{stdout}\n{stderr}");
    assert_eq!(s3.objects("results", "pipeline"), 20, "one object per step, in the bucket");
}

#[test]
#[ignore = "runs in a child process with S3 credentials set"]
fn child_with_s3_storage() {
    #[flow(task_runner = RayTaskRunner::new()
        .address(std::env::var("ADDRESS").unwrap())
        .auth_token(std::env::var("TOKEN").unwrap())
        .init_kwargs(serde_json::json!({"runtime_env": {"env_vars": serde_json::from_str::<serde_json::Value>(&std::env::var("WORKER_ENV").unwrap()).unwrap()}})))]
    fn on_s3() -> Vec<String> {
        step.map((0..20).collect::<Vec<_>>())
            .into_iter()
            .map(|future| {
                future.wait(None);
                let state = future.state();
                state.message.clone().filter(|_| !state.is_completed()).unwrap_or(state.name.into_owned())
            })
            .collect()
    }
    let summary = |names: Vec<String>| {
        let first = names[0].clone();
        if names.iter().all(|name| *name == first) { format!("{first}*{}", names.len()) } else { format!("{names:?}") }
    };
    let first = summary(on_s3().unwrap());
    let second = summary(on_s3().unwrap());
    println!("FIRST={first} SECOND={second}");
}
