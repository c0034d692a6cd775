//! Starting the bridge process: its files in a temporary directory of its own, the program
//! to ship to a cluster, its environment, and its output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use super::BridgeConfig;
use super::output::Output;
use crate::error::RayError;
use crate::protocol::SHIPPED_PREFIX;
use crate::python;

const BRIDGE_SOURCE: &str = include_str!("../../python/prefect_ray_bridge.py");

/// The worker package: what every Ray worker imports, shipped to clusters with `py_modules`.
const WORKER_PACKAGE: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../../python/prefect_ray_worker/__init__.py")),
    ("protocol.py", include_str!("../../python/prefect_ray_worker/protocol.py")),
    ("codec.py", include_str!("../../python/prefect_ray_worker/codec.py")),
    ("driver.py", include_str!("../../python/prefect_ray_worker/driver.py")),
    ("ray_internals.py", include_str!("../../python/prefect_ray_worker/ray_internals.py")),
];

/// A bridge process just started, before the handshake.
pub(super) struct Launched {
    pub(super) child: Child,
    pub(super) python: PathBuf,
    /// Everything the runner wrote for this bridge; the bridge removes it when it exits.
    pub(super) temp_dir: tempfile::TempDir,
    /// The worker package's directory.
    pub(super) package: PathBuf,
    /// The executor as the bridge names it to workers.
    pub(super) executor: String,
    pub(super) stderr: StderrLog,
}

/// The bridge's stderr, read by a thread of its own, and what it said.
pub(super) struct StderrLog {
    pub(super) thread: JoinHandle<()>,
    pub(super) output: Output,
}

impl StderrLog {
    /// Waits until the bridge's stderr has closed; returns the best account of its end.
    pub(super) fn finish(self) -> Option<String> {
        let _ = self.thread.join();
        self.output.cause()
    }
}

/// Writes the bridge's files and starts it, in a process group of its own.
pub(super) fn launch(config: &BridgeConfig) -> Result<Launched, RayError> {
    let python = python::find(config.python.as_deref())?;
    let temp_dir = tempfile::Builder::new()
        .prefix("prefect-ray-")
        .tempdir_in(short_temp_root())
        .map_err(RayError::setup("could not create a temporary directory"))?;
    // The bridge script apart from the worker package: Ray puts the driver script's
    // directory on workers' paths, which would shadow the package shipped to a cluster.
    let modules = temp_dir.path().join("modules");
    let package = modules.join("prefect_ray_worker");
    let bridge_dir = temp_dir.path().join("bridge");
    let bridge_path = bridge_dir.join("prefect_ray_bridge.py");
    for dir in [package.join("bin"), bridge_dir.clone()] {
        std::fs::create_dir_all(&dir).map_err(RayError::setup(format!("could not create {}", dir.display())))?;
    }
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(RayError::setup(format!("could not write {}", path.display())))
    };
    for (name, source) in WORKER_PACKAGE {
        write(&package.join(name), source)?;
    }
    write(&bridge_path, BRIDGE_SOURCE)?;
    let executor = executor(config, &package)?;

    let mut command = Command::new(&python);
    command
        .arg("-u")
        .arg(&bridge_path)
        .env("PYTHONPATH", prepend_path(&modules, std::env::var_os("PYTHONPATH")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    environment(config, &mut command);
    // Its own process group: a Ctrl-C at the terminal reaches this program, which then
    // shuts the bridge down in order, instead of reaching Ray's processes all at once.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => {
            RayError::NoPython { hint: python::install_hint(&python), python: python.clone(), source }
        }
        _ => RayError::Setup { what: format!("could not start {}", python.display()), source },
    })?;
    let output = Output::default();
    let stderr = StderrLog { thread: output.forward_stderr(child.stderr.take().expect("piped")), output };
    Ok(Launched { child, python, temp_dir, package, executor, stderr })
}

/// The executor as workers will find it: this program's path, or, for a cluster that does
/// not share this machine's files, a link to it in the worker package that Ray ships.
fn executor(config: &BridgeConfig, package: &Path) -> Result<String, RayError> {
    let executable = std::env::current_exe().map_err(RayError::setup("could not find this program's executable"))?;
    if config.address.is_none() || !config.ship_executor {
        return Ok(executable.to_string_lossy().into_owned());
    }
    let name = executable.file_name().map_or("executor".into(), |n| n.to_string_lossy().into_owned());
    let shipped = package.join("bin").join(&name);
    let stripped = !config.ship_debug_info && strip_debug_info(&executable, &shipped);
    if !stripped && std::fs::hard_link(&executable, &shipped).is_err() {
        std::fs::copy(&executable, &shipped)
            .map_err(RayError::setup(format!("could not copy {} to ship it to Ray", executable.display())))?;
    }
    Ok(format!("{SHIPPED_PREFIX}{name}"))
}

/// Writes `executable` without its debug info to `shipped` (`objcopy --strip-debug`, which
/// keeps the symbols, so a panic's backtrace still names its functions): what Ray uploads
/// shrinks by a fifth for a build with line tables and by nearly half or more for one with full
/// debug info. The same build strips to the same bytes, so Ray, which keys uploaded
/// packages by content, does not upload it again. Returns whether it did; without binutils'
/// `objcopy` the program ships whole.
fn strip_debug_info(executable: &Path, shipped: &Path) -> bool {
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(executable)
        .arg(shipped)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !stripped {
        let _ = std::fs::remove_file(shipped);
    }
    stripped
}

/// How many times a run killed for want of memory is tried again (unless `RAY_task_oom_retries`
/// says otherwise).
const OOM_RETRIES: &str = "2";

/// Ray's settings for the bridge: loopback where Ray stays on this machine, no usage
/// statistics, token authentication on.
fn environment(config: &BridgeConfig, command: &mut Command) {
    let mut defaults = vec![
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_DEDUP_LOGS", "0"),
        // A task that Ray's memory monitor kills is retried this many times (read by the
        // driver, which owns the tasks), then fails: Ray's default retries it forever.
        ("RAY_task_oom_retries", OOM_RETRIES),
        // A crashed run's error reaches the program through its report; Ray would also log
        // it a second time as "unhandled", for the value object nobody asked for.
        ("RAY_IGNORE_UNHANDLED_ERRORS", "1"),
    ];
    if config.address.as_deref().is_none_or(is_loopback_address) {
        // Ray otherwise swaps 127.0.0.1 for the machine's network address, and listens
        // there: on one machine, everything stays on loopback with this.
        defaults.push(("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"));
    }
    if config.address.is_none() {
        // Ports that Ray fixes by default would clash between two temporary instances.
        defaults.extend([("AUTOSCALER_METRIC_PORT", "0"), ("DASHBOARD_METRIC_PORT", "0")]);
    }
    for (name, value) in defaults {
        if std::env::var_os(name).is_none() {
            command.env(name, value);
        }
    }
    // Tasks that take concurrency slots (`prefect::concurrency`) reach the program's server:
    // a temporary instance's workers inherit this, and the bridge passes the address (not the
    // key) to an existing cluster's workers in `runtime_env`.
    if let Some((url, key)) = prefect::runner::prefect_api() {
        command.env("PREFECT_API_URL", url);
        if let Some(key) = key {
            command.env("PREFECT_API_KEY", key);
        }
    }
    let has_token = std::env::var_os("RAY_AUTH_TOKEN").is_some() || std::env::var_os("RAY_AUTH_TOKEN_PATH").is_some();
    match (&config.auth_token, &config.address) {
        (Some(token), _) => {
            command.env("RAY_AUTH_TOKEN", token).env_remove("RAY_AUTH_TOKEN_PATH");
        }
        // A temporary instance gets a token of its own, so token authentication stays on
        // without Ray writing one into ~/.ray.
        (None, None) if !has_token => {
            command.env("RAY_AUTH_TOKEN", uuid::Uuid::new_v4().simple().to_string());
        }
        _ => {}
    }
    // Ray Client only presents a token in token mode, which a driver otherwise enters
    // only for a token it finds in ~/.ray.
    if (config.auth_token.is_some() || has_token || config.address.is_none())
        && std::env::var_os("RAY_AUTH_MODE").is_none()
    {
        command.env("RAY_AUTH_MODE", "token");
    }
}

/// Ends a process group: SIGTERM, a moment's grace, SIGKILL.
pub(super) fn kill_group(pid: u32) {
    let group = -(pid as libc::pid_t);
    // SAFETY: kill(2) with a negative pid signals a process group; it touches no memory.
    unsafe {
        libc::kill(group, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe {
        libc::kill(group, libc::SIGKILL);
    }
}

/// Whether an address (`host:port`, `ray://host:port`, or `auto` with `RAY_ADDRESS`) is on
/// this machine's loopback interface.
fn is_loopback_address(address: &str) -> bool {
    let address = if address == "auto" { std::env::var("RAY_ADDRESS").unwrap_or_default() } else { address.to_owned() };
    let target = address.strip_prefix("ray://").unwrap_or(&address);
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host).trim_matches(['[', ']']);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A directory with a short path: Ray puts Unix sockets in its temp dir, and their paths
/// must stay under 108 bytes.
fn short_temp_root() -> PathBuf {
    let system = std::env::temp_dir();
    if system.as_os_str().len() <= 20 { system } else { PathBuf::from("/tmp") }
}

fn prepend_path(dir: &Path, existing: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(existing) = existing {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned())
}
