//! `cargo xtask <command>`: the project's set-up, demo, tests and benchmarks.
//!
//! Every command installs what it needs first (Python virtual environments with the pinned
//! Ray and Prefect), so each works on a fresh clone.

mod bench;
mod downstream;
mod prefect_server;
mod python;
mod s3_server;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use prefect_ray::testing::LocalCluster;

#[derive(Parser)]
#[command(about = "Tasks of prefect-ray for Rust")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Creates .venv with the pinned Ray (and, with --prefect, .venv-prefect with Prefect).
    Setup {
        /// Also set up the Prefect server environment used by tests and benchmarks.
        #[arg(long)]
        prefect: bool,
    },
    /// Runs the count_to flow on a temporary Ray instance.
    Demo,
    /// Runs the benchmarks side by side with raw Ray and prefect-ray; writes bench/results/.
    Bench {
        /// Smaller sizes and fewer rounds: under five minutes.
        #[arg(long)]
        quick: bool,
    },
    /// Starts the shared test cluster and Prefect server, prints the variables that point
    /// tests at them, and keeps them up until Ctrl-C (for running single tests quickly).
    Services,
    /// Starts the shared services and runs only the end-to-end checks in the Prefect UI
    /// (headless Chromium): a flow run's page, and a served deployment run from its page.
    Ui,
    /// Packages the crates and builds the README's first project from them, outside the
    /// workspace: its first run installs Ray into an empty cache directory (the last step of
    /// `test`).
    Downstream,
    /// Checks formatting and lints, then runs every test against real Ray and Prefect.
    Test {
        /// Extra arguments for the test runner (a test name filter, say).
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Task::Setup { prefect } => setup(prefect),
        Task::Demo => demo(),
        Task::Test { args } => test(&args),
        Task::Services => services(),
        Task::Downstream => downstream::check(&root()),
        Task::Ui => ui(),
        Task::Bench { quick } => bench::bench(&root(), quick),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn setup(prefect: bool) -> Result {
    python::ray_venv(&root())?;
    if prefect {
        python::prefect_venv(&root())?;
        s3_server::ensure(&root())?;
    }
    Ok(())
}

fn demo() -> Result {
    python::ray_venv(&root())?;
    run(cargo().args(["run", "--quiet", "-p", "prefect-ray", "--example", "count_to"]))
}

/// The Ray cluster and Prefect server that tests share, and the variables that point
/// tests at them. Dropping it stops both.
struct Services {
    _cluster: LocalCluster,
    prefect: prefect_api::testing::TestServer,
    env: Vec<(&'static str, String)>,
}

impl Services {
    fn start(ray_python: &Path, prefect_python: &Path) -> Result<Self> {
        let s3_server = s3_server::ensure(&root())?;
        // One Ray cluster for every test that only needs a cluster; tests of the temporary
        // instance start their own.
        eprintln!("xtask: starting the shared Ray test cluster");
        let cluster = LocalCluster::builder()
            .python(ray_python)
            .num_cpus(2)
            .head_env("NODE_NAME", "head")
            .node(1, [("special", 1.0)], [("NODE_NAME", "special")])
            .start()
            .map_err(|e| format!("could not start the shared Ray cluster: {e}"))?;
        eprintln!("xtask: starting the shared Prefect test server");
        let prefect = prefect_server::start(prefect_python)?;
        let shared = serde_json::json!({
            "gcs_address": cluster.gcs_address(),
            "client_address": cluster.client_address(),
            "auth_token": cluster.auth_token(),
            "dir": cluster.dir(),
        });
        let env = vec![
            ("PREFECT_RAY_TEST_CLUSTER", shared.to_string()),
            ("PREFECT_RAY_PYTHON", ray_python.display().to_string()),
            (prefect_server::SHARED_SERVER_ENV, prefect.api_url()),
            (s3_server::BIN_ENV, s3_server.display().to_string()),
        ];
        Ok(Self { _cluster: cluster, prefect, env })
    }

    fn apply(&self, command: &mut Command) {
        for (name, value) in &self.env {
            command.env(name, value);
        }
    }
}

fn services() -> Result {
    let ray_python = python::ray_venv(&root())?;
    let prefect_python = python::prefect_venv(&root())?;
    let services = Services::start(&ray_python, &prefect_python)?;
    for (name, value) in &services.env {
        println!("export {name}='{value}'");
    }
    eprintln!("xtask: up; Ctrl-C stops them");
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(|e| format!("could not watch for Ctrl-C: {e}"))?;
    signals.forever().next();
    drop(services);
    Ok(())
}

fn ui() -> Result {
    let ray_python = python::ray_venv(&root())?;
    let prefect_python = python::prefect_venv(&root())?;
    let services = Services::start(&ray_python, &prefect_python)?;
    prefect_server::ui_check(&root(), &services.prefect)
        .and_then(|()| prefect_server::serve_ui_check(&root(), &services.prefect))
}

fn test(args: &[String]) -> Result {
    let ray_python = python::ray_venv(&root())?;
    let prefect_python = python::prefect_venv(&root())?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"]))?;
    python_checks(&ray_python)?;

    // Dropped (stopped) however the tests end.
    let services = Services::start(&ray_python, &prefect_python)?;
    let with_cluster = |command: &mut Command| services.apply(command);
    let mut tests = if has_nextest() {
        let mut command = cargo();
        command.args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(args);
        command
    } else {
        let mut command = cargo();
        command.args(["test", "--workspace", "--no-fail-fast"]).args(args).args(["--", "--test-threads=1"]);
        command
    };
    with_cluster(&mut tests);
    let mut doc_tests = cargo();
    doc_tests.args(["test", "--workspace", "--doc", "--quiet"]);
    with_cluster(&mut doc_tests);
    let outcome = run(&mut tests)
        .and_then(|()| run(&mut doc_tests))
        .and_then(|()| prefect_server::ui_check(&root(), &services.prefect))
        .and_then(|()| prefect_server::serve_ui_check(&root(), &services.prefect));
    drop(services);
    outcome.and_then(|()| downstream::check(&root()))
}

/// Lints, type checks and unit tests of the Python side (the bridge and the worker
/// package), which need no cluster.
fn python_checks(python: &Path) -> Result {
    python::install(python, python::PYTHON_TOOLS)?;
    let dir = root().join("crates/prefect-ray/python");
    let tool = |args: &[&str]| {
        let mut command = Command::new(python);
        command.args(["-m"]).args(args).current_dir(&dir).env("RAY_USAGE_STATS_ENABLED", "0");
        command
    };
    eprintln!("xtask: checking the Python side (ruff, mypy, pytest)");
    run(&mut tool(&["ruff", "check", "--quiet", "."]))?;
    run(&mut tool(&["ruff", "format", "--check", "--quiet", "."]))?;
    run(&mut tool(&["mypy"]))?;
    run(&mut tool(&["pytest", "--quiet", "-p", "no:cacheprovider"]))
}

fn has_nextest() -> bool {
    Command::new("cargo").args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

/// Runs a command, failing with its command line if it fails.
fn run(command: &mut Command) -> Result {
    let status = command.status().map_err(|e| format!("could not run {command:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{command:?} failed with {status}")) }
}
