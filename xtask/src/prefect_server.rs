//! The Prefect server that `cargo xtask test` shares between tests, and the end-to-end check
//! of the Prefect UI in headless Chromium.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prefect_api::Client;
use prefect_api::testing::TestServer;
use serde_json::{Value, json};

use crate::{Result, cargo, run};

/// The variable through which tests find the shared server (its API address).
pub const SHARED_SERVER_ENV: &str = "PREFECT_TEST_API_URL";

/// Where the end-to-end check saves its screenshot, relative to the workspace root.
pub const SCREENSHOT: &str = "docs/prefect-ui-flow-run.png";

/// Where the serving check saves its screenshot of the deployment page.
pub const DEPLOYMENT_SCREENSHOT: &str = "docs/prefect-ui-deployment.png";

/// Where the UI check saves its screenshot of a flow run's Artifacts tab.
pub const ARTIFACTS_SCREENSHOT: &str = "docs/prefect-ui-artifacts.png";

/// Starts the shared test server with the `prefect` next to `prefect_python` (the Python of
/// `.venv-prefect`): loopback only, SQLite, analytics off. Dropping it stops the server.
pub fn start(prefect_python: &Path) -> Result<TestServer> {
    TestServer::start_with(&prefect_python.with_file_name("prefect")).map_err(|e| e.to_string())
}

/// Runs the `prefect_ui` example with `PREFECT_API_URL` set to `server`, opens the flow
/// run's page in headless Chromium, checks that every task run of the flow run is listed,
/// and saves a screenshot to [`SCREENSHOT`]. Installs Debian's `chromium` (as root, with
/// apt-get) and playwright-core (with npm, into `e2e/`) when they are missing.
pub fn ui_check(root: &Path, server: &TestServer) -> Result {
    let chromium = chromium()?;
    let e2e = root.join("e2e");
    if !e2e.join("node_modules/playwright-core").exists() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&e2e))
            .map_err(|e| format!("{e}; the UI check needs Node.js and npm"))?;
    }

    eprintln!("xtask: running the prefect_ui example against the Prefect server at {}", server.api_url());
    // The example caches a run's value: in a directory of this check's own, so the cached
    // run is made here and nothing is left behind.
    let results = std::env::temp_dir().join(format!("prefect-ui-results-{}", std::process::id()));
    let output = cargo()
        .args(["run", "--quiet", "-p", "prefect", "--example", "prefect_ui"])
        .env("PREFECT_API_URL", server.api_url())
        .env("PREFECT_LOCAL_STORAGE_PATH", &results)
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&results);
    let output = output.map_err(|e| format!("could not run the prefect_ui example: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("the prefect_ui example failed with {}:\n{stderr}", output.status));
    }
    let page = stderr
        .lines()
        .find_map(|line| line.split_once("View at ").map(|(_, url)| url.trim().to_owned()))
        .ok_or_else(|| format!("the example printed no flow run address:\n{stderr}"))?;
    let flow_run = page.rsplit('/').next().unwrap_or_default().to_owned();
    let task_runs = final_task_run_names(&server.client(), &flow_run)?;

    let screenshot = root.join(SCREENSHOT);
    if let Some(dir) = screenshot.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    }
    eprintln!("xtask: checking {page} in headless Chromium");
    run(Command::new("node")
        .arg(e2e.join("prefect-ui.mjs"))
        .arg(&page)
        .arg(&screenshot)
        .args(&task_runs)
        .env("CHROMIUM", chromium)
        // The example loads its work twice: the second run is Cached. Its `longest` run
        // publishes the artifact keyed `city-lengths`.
        .env("EXPECT_CACHED", "1")
        .env("ARTIFACT_KEY", "city-lengths")
        .env("ARTIFACTS_SCREENSHOT", root.join(ARTIFACTS_SCREENSHOT))
        .current_dir(&e2e))
}

/// Serves the `serve_count_to` example to `server`, then, in headless Chromium, starts a
/// custom run (the parameters form) and a quick run from the deployment's page and cancels a
/// long run from its own page (`e2e/prefect-ui-serve.mjs` checks their final states), and
/// saves a screenshot of the deployment page to [`DEPLOYMENT_SCREENSHOT`]. Then checks that
/// nothing of the runs is left, and that Ctrl-C stops serving cleanly.
pub fn serve_ui_check(root: &Path, server: &TestServer) -> Result {
    run(cargo().args(["build", "--quiet", "-p", "prefect-ray", "--example", "serve_count_to"]))?;
    let program = root.join("target/debug/examples/serve_count_to");
    eprintln!("xtask: serving the serve_count_to example to the Prefect server at {}", server.api_url());
    let child = Command::new(&program)
        .env("PREFECT_API_URL", server.api_url())
        .env("PREFECT_RUNNER_POLL_FREQUENCY", "1")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", program.display()))?;
    let mut serving = Serving(child);
    let client = server.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let deployment = loop {
        if let Some(id) =
            client.get("/deployments/name/count-to/count-to").ok().and_then(|d| d["id"].as_str().map(str::to_owned))
        {
            break id;
        }
        if Instant::now() > deadline {
            return Err("the serve_count_to example did not register its deployment within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("xtask: running, cancelling and checking runs from the deployment's page in headless Chromium");
    run(Command::new("node")
        .arg(root.join("e2e/prefect-ui-serve.mjs"))
        .arg(client.ui_url())
        .arg(server.api_url())
        .arg(&deployment)
        .arg(root.join(DEPLOYMENT_SCREENSHOT))
        .env("CHROMIUM", chromium()?)
        .current_dir(root.join("e2e")))?;
    let pid = serving.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !descendants(pid).is_empty() {
        if Instant::now() > deadline {
            return Err(format!("processes of the served runs are left: {:?}", descendants(pid)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    serving.interrupt()
}

/// The serving example, interrupted if the check fails half-way.
struct Serving(std::process::Child);

impl Serving {
    /// Ctrl-C, as a user would: serving must stop cleanly within 30 s.
    fn interrupt(&mut self) -> Result {
        send_signal(self.0.id(), signal_hook::consts::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("serving ended with {status} on Ctrl-C")),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                _ => return Err("serving did not stop within 30 s of Ctrl-C".into()),
            }
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            send_signal(self.0.id(), signal_hook::consts::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends `signal` to a child this check started (with `kill`: xtask has no libc).
fn send_signal(pid: u32, signal: i32) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

/// Every process below `pid`, from `/proc`.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| {
                    let child = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                    let parent = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
                    Some((child, parent))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(next) = frontier.pop() {
        for (child, parent) in &parents {
            if *parent == next && !found.contains(child) {
                found.push(*child);
                frontier.push(*child);
            }
        }
    }
    found
}

/// The names of the flow run's task runs, once the server has recorded them all in a final
/// state (it records task runs from events, a moment after they arrive).
fn final_task_run_names(client: &Client, flow_run: &str) -> Result<Vec<String>> {
    let body = json!({"flow_runs": {"id": {"any_": [flow_run]}}});
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = client.post("/task_runs/filter", &body).map_err(|e| e.to_string())?;
        let runs = runs.as_array().cloned().unwrap_or_default();
        let done = |run: &Value| {
            ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"].contains(&run["state_type"].as_str().unwrap_or(""))
        };
        if !runs.is_empty() && runs.iter().all(done) {
            return Ok(runs.iter().filter_map(|run| run["name"].as_str().map(str::to_owned)).collect());
        }
        if Instant::now() > deadline {
            return Err(format!("the task runs of flow run {flow_run} did not all end on the server: {runs:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Debian's Chromium (or `CHROMIUM`), installed with apt-get when missing.
fn chromium() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let path = PathBuf::from("/usr/bin/chromium");
    if path.exists() {
        return Ok(path);
    }
    eprintln!("xtask: installing Debian's chromium for the UI check");
    let apt = |args: &[&str]| {
        run(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null()))
    };
    apt(&["update", "-qq"])
        .and_then(|()| apt(&["install", "-y", "-qq", "chromium"]))
        .map_err(|e| format!("{e}. The UI check needs Chromium: run `apt-get install chromium` as root, or set CHROMIUM to a Chromium binary"))?;
    Ok(path)
}
