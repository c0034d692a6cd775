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
    let output = cargo()
        .args(["run", "--quiet", "-p", "prefect", "--example", "prefect_ui"])
        .env("PREFECT_API_URL", server.api_url())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run the prefect_ui example: {e}"))?;
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
        .current_dir(&e2e))
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
