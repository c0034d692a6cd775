//! A throwaway Prefect server on loopback, for tests and demos.
//!
//! [`TestServer::start`] runs `prefect server start` on `127.0.0.1` and a free port, with a
//! temporary `PREFECT_HOME`, SQLite, analytics off, and only the services that reporting
//! needs (the task-run recorder among them: it turns task-run events into task runs).
//! Dropping the server stops it with SIGTERM and removes its home. The server also dies
//! with the thread that started it (`PR_SET_PDEATHSIG`), so a killed test leaves no server.
//!
//! A fresh database takes about 10 s to migrate on two cores; a migrated copy, kept next to
//! the test binary (under `target/`), brings that down to about 4 s for later servers.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;

/// Why a test server could not be started.
#[derive(Debug, thiserror::Error)]
#[error("could not start a Prefect server for tests: {0}")]
pub struct TestServerError(String);

/// The variable naming the `prefect` executable to start; by default the one that
/// `cargo xtask setup --prefect` installs in the workspace's `.venv-prefect`.
pub const PREFECT_BIN_ENV: &str = "PREFECT_TEST_SERVER_BIN";

/// How long a server may take to answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The environment of a test server: loopback, analytics off, services that reporting does
/// not need off, and a task-run recorder that writes events in batches.
pub fn server_env(home: &Path, port: u16) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PREFECT_HOME".into(), home.display().to_string()),
        (
            "PREFECT_SERVER_DATABASE_CONNECTION_URL".into(),
            format!("sqlite+aiosqlite:///{}", home.join("prefect.db").display()),
        ),
        ("PREFECT_SERVER_API_HOST".into(), "127.0.0.1".into()),
        ("PREFECT_SERVER_API_PORT".into(), port.to_string()),
        ("PREFECT_API_URL".into(), format!("http://127.0.0.1:{port}/api")),
        ("PREFECT_SERVER_ANALYTICS_ENABLED".into(), "false".into()),
        ("DO_NOT_TRACK".into(), "1".into()),
        ("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE".into(), "500".into()),
        ("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE".into(), "100".into()),
        ("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL".into(), "1".into()),
        // A run held by a deployment's concurrency limit is due again this much later (30 s
        // by default): tests of the limit need not idle.
        ("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS".into(), "2".into()),
    ];
    for service in [
        "SCHEDULER",
        "LATE_RUNS",
        "FOREMAN",
        "CANCELLATION_CLEANUP",
        "PAUSE_EXPIRATIONS",
        "REPOSSESSOR",
        "TRIGGERS",
        "EVENT_LOGGER",
        "CLEANUP_RECONCILER",
    ] {
        env.push((format!("PREFECT_SERVER_SERVICES_{service}_ENABLED"), "false".into()));
    }
    env
}

/// A Prefect server of this test's own, stopped when dropped.
///
/// # Examples
///
/// ```no_run
/// let server = prefect_api::testing::TestServer::start().unwrap();
/// server.client().health().unwrap();
/// ```
#[derive(Debug)]
pub struct TestServer {
    child: Option<Child>,
    home: Option<tempfile::TempDir>,
    port: u16,
    prefect: PathBuf,
}

impl TestServer {
    /// Starts a server and waits until it answers.
    ///
    /// # Errors
    ///
    /// If `prefect` is missing (run `cargo xtask setup --prefect`), or the server does not
    /// answer within two minutes; the error ends with its output.
    pub fn start() -> Result<Self, TestServerError> {
        Self::start_with(&prefect_bin())
    }

    /// [`start`](Self::start) with the `prefect` executable at `prefect`.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    pub fn start_with(prefect: &Path) -> Result<Self, TestServerError> {
        if !prefect.exists() {
            return Err(TestServerError(format!(
                "{} does not exist: run `cargo xtask setup --prefect`, or set {PREFECT_BIN_ENV}",
                prefect.display()
            )));
        }
        let template = template_path();
        if !template.as_ref().is_some_and(|t| t.exists()) {
            let server = Self::spawn(prefect, None)?;
            if let Some(template) = &template {
                server.save_template(prefect, template);
            }
            return Ok(server);
        }
        Self::spawn(prefect, template.as_deref())
    }

    fn spawn(prefect: &Path, template: Option<&Path>) -> Result<Self, TestServerError> {
        let fail = |message: String| TestServerError(message);
        let home =
            tempfile::Builder::new().prefix("prefect-test-server-").tempdir().map_err(|e| fail(e.to_string()))?;
        if let Some(template) = template {
            fs::copy(template, home.path().join("prefect.db"))
                .map_err(|e| fail(format!("copying {}: {e}", template.display())))?;
        }
        let port = free_port().map_err(|e| fail(format!("no free port on 127.0.0.1: {e}")))?;
        let mut server = Self { child: None, home: Some(home), port, prefect: prefect.to_path_buf() };
        server.launch()?;
        Ok(server)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port and database, and
    /// waits until it answers: a server that went away and came back.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    pub fn restart(&mut self) -> Result<(), TestServerError> {
        self.stop();
        self.launch()
    }

    /// Runs `prefect server start` in this server's home and waits until it answers.
    fn launch(&mut self) -> Result<(), TestServerError> {
        let fail = |message: String| TestServerError(message);
        let (prefect, port) = (self.prefect.clone(), self.port);
        let home = self.home.as_ref().ok_or_else(|| fail("the server's home is gone".into()))?.path().to_path_buf();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(home.join("server.log"))
            .map_err(|e| fail(e.to_string()))?;
        let mut command = Command::new(&prefect);
        command
            .args(["server", "start", "--host", "127.0.0.1", "--port", &port.to_string()])
            .envs(server_env(&home, port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| fail(e.to_string()))?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only asks for SIGTERM when the parent dies.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| fail(format!("could not run {}: {e}", prefect.display())))?;
        self.child = Some(child);
        let client = self.client().timeout(Duration::from_secs(2));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if client.health().is_ok() {
                return Ok(());
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let output = self.output_tail();
                let why = match exited {
                    Some(status) => format!("it exited with {status}"),
                    None => format!("it did not answer within {} s", START_TIMEOUT.as_secs()),
                };
                return Err(fail(format!("{why}; its output ends with:\n{output}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Copies the migrated database of this fresh server (SQLite's online backup, through the
    /// venv's Python) to be the template of later servers. Failing that, nothing is kept.
    fn save_template(&self, prefect: &Path, template: &Path) {
        let (Some(home), Some(dir)) = (self.home.as_ref(), template.parent()) else { return };
        let db = home.path().join("prefect.db");
        let python = prefect.with_file_name("python");
        let snapshot = dir.join(format!(".prefect-template-{}.db", std::process::id()));
        let copied = fs::create_dir_all(dir).is_ok()
            && Command::new(&python)
                .args(["-c", "import sqlite3, sys; s = sqlite3.connect(sys.argv[1]); d = sqlite3.connect(sys.argv[2]); s.backup(d); d.close()"])
                .arg(&db)
                .arg(&snapshot)
                .status()
                .is_ok_and(|s| s.success());
        if copied {
            let _ = fs::rename(&snapshot, template);
        } else {
            let _ = fs::remove_file(&snapshot);
        }
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its API address: `http://127.0.0.1:<port>/api`.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.port)
    }

    /// Its UI address: `http://127.0.0.1:<port>`.
    pub fn ui_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client for its API.
    pub fn client(&self) -> Client {
        Client::new(self.api_url())
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines the server wrote.
    pub fn output_tail(&self) -> String {
        let Some(home) = &self.home else { return String::new() };
        let Ok(mut file) = fs::File::open(home.path().join("server.log")) else { return String::new() };
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(4000)));
        let mut tail = String::new();
        let _ = file.read_to_string(&mut tail);
        tail
    }

    /// Stops the server (SIGTERM, then SIGKILL after 15 s) and waits for it to exit; its
    /// home stays until the server is dropped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(home) = self.home.take() {
            let _ = home.close();
        }
    }
}

/// The `prefect` command the test servers run: `PREFECT_TEST_SERVER_BIN`, or the one that
/// `cargo xtask setup --prefect` installs. Tests also run its CLI (`prefect deployment run`).
pub fn prefect_bin() -> PathBuf {
    match std::env::var_os(PREFECT_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-prefect/bin/prefect"),
    }
}

/// Where the migrated database is kept: beside the running binary's build directory
/// (`target/debug/`), so `cargo clean` removes it.
fn template_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") || dir.ends_with("examples") { dir.parent()? } else { dir };
    Some(dir.join("prefect-test-server").join("prefect-3.db"))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
