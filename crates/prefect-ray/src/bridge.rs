//! The bridge: a Python process that is this program's Ray driver.
//!
//! The runner sends it commands (define a remote function, submit a run, fetch a value,
//! release values, cancel, shut down) on its stdin and reads replies on its stdout; what it
//! prints on stderr goes to the log. One bridge serves every flow run of the process that
//! asks while it is up: a subflow's runner reuses its parent's, and the last runner to let
//! go shuts it down, ending the temporary Ray instance if it started one.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prefect::runner::{RemoteResult, ResultData, TaskRun, TaskRunWriter};
use serde::{Deserialize, Serialize};
use serde_bytes::{ByteBuf, Bytes};
use serde_json::{Map, Value};

use crate::envelope;
use crate::error::RayError;
use crate::frame::{read_message, write_message};
use crate::outbox::Outbox;
use crate::python;

/// The first byte of a call of several runs; one run's call starts with 0 (see the executor).
const MANY_RUNS: u8 = 1;

const BRIDGE_SOURCE: &str = include_str!("../python/prefect_ray_bridge.py");
const WORKER_SOURCE: &str = include_str!("../python/prefect_ray_worker/__init__.py");

/// How to reach Ray: what the runner was configured with.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    pub address: Option<String>,
    pub init_kwargs: Map<String, Value>,
    pub python: Option<PathBuf>,
    pub ship_executor: bool,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    pub auth_token: Option<String>,
    pub max_batch: usize,
}

/// What the bridge found when it connected.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClusterInfo {
    pub nodes: u64,
    /// The CPUs of the live nodes, together.
    #[serde(default)]
    pub cpus: f64,
    pub dashboard_url: String,
    pub ray_version: String,
    pub started_local: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Command_<'a> {
    Define(u32, &'a str, &'a str),
    Submit(u64, u32, &'a Bytes, &'a [u64], &'a [u64]),
    SubmitBatch(Vec<u64>, u32, &'a Bytes, Vec<(&'a [u64], &'a [u64])>),
    Get(u64, u64),
    Release { keys: Vec<u64> },
    Cancel { key: u64 },
    Stats { request: u64 },
    Shutdown,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ready(ClusterInfo),
    Fatal(String, String),
    Done(u64, ByteBuf),
    BatchDone(Vec<u64>, ByteBuf),
    Failed(u64, String, String),
    Value(u64, ByteBuf),
    ValueError(u64, String),
    Stats(u64, BridgeStats),
    Bye,
}

/// A remote function of the bridge: a task's options, and the function's id.
type RemoteFunction = (Map<String, Value>, u32);

/// Figures the bridge reports about itself.
#[derive(Clone, Debug, Deserialize)]
pub struct BridgeStats {
    /// The bridge's peak resident memory.
    pub peak_rss_bytes: u64,
    /// How many task values it still holds references to.
    pub objects: u64,
    /// The bridge's process id.
    pub bridge_pid: u32,
    /// The Ray namespace it joined.
    pub namespace: String,
    /// How many Ray tasks it has submitted (a batch of a map's runs is one).
    pub ray_tasks: u64,
}

/// A runner's hold on the bridge; when the last one is dropped, the bridge shuts down.
pub struct Bridge {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").field("cluster", &self.shared.info).finish_non_exhaustive()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.shared.shut_down();
    }
}

/// The figures of the live bridge, if any.
pub fn live_stats() -> Option<BridgeStats> {
    let bridge = lock(current()).upgrade()?;
    bridge.shared.stats().ok()
}

/// The live bridge of this process, if any.
fn current() -> &'static Mutex<Weak<Bridge>> {
    static CURRENT: Mutex<Weak<Bridge>> = Mutex::new(Weak::new());
    &CURRENT
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bridge {
    /// The bridge already running in this process, or a new one started with `config`.
    /// Returns whether it was reused.
    pub fn acquire(config: &BridgeConfig) -> Result<(Arc<Bridge>, bool), RayError> {
        let mut current = lock(current());
        if let Some(bridge) = current.upgrade().filter(|b| b.shared.alive.load(Ordering::Acquire)) {
            return Ok((bridge, true));
        }
        let bridge = Arc::new(Bridge { shared: Shared::start(config)? });
        *current = Arc::downgrade(&bridge);
        Ok((bridge, false))
    }

    pub fn info(&self) -> &ClusterInfo {
        &self.shared.info
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// The state of one bridge process, shared by its runners, its reader thread and the
/// handles of the values it holds.
pub struct Shared {
    commands: Outbox,
    child: Mutex<Child>,
    dispatch: Mutex<Dispatch>,
    room: Condvar,
    /// The remote functions defined so far: per task, its options and the function's id.
    functions: Mutex<HashMap<&'static str, Vec<RemoteFunction>>>,
    next_key: AtomicU64,
    pub info: ClusterInfo,
    max_in_flight: usize,
    alive: AtomicBool,
    releases: Mutex<Vec<u64>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    temp_dir: Mutex<Option<tempfile::TempDir>>,
}

#[derive(Default)]
struct Dispatch {
    runs: HashMap<u64, PendingRun>,
    requests: HashMap<u64, mpsc::Sender<Result<Answer, String>>>,
    next_request: u64,
    /// Why the session ended, once it has: set under the same lock that admits runs, so no
    /// run is admitted after its runs were failed.
    closed: Option<String>,
}

/// The bridge's answer to a request.
enum Answer {
    Value(Vec<u8>),
    Stats(BridgeStats),
}

/// A run ready for Ray: its header (behind the byte that says "one run") and the keys of
/// the Ray objects it depends on: values it takes, and runs it waits for.
pub struct Call {
    pub pending: PendingRun,
    pub header: Vec<u8>,
    pub value_keys: Vec<u64>,
    pub report_keys: Vec<u64>,
}

/// A run submitted to Ray and not finished yet.
pub struct PendingRun {
    pub run: TaskRunWriter,
    pub dependencies: Vec<TaskRun>,
}

/// A task run's value in Ray's object store; released when the last handle goes.
pub struct RayObject {
    pub key: u64,
    shared: Weak<Shared>,
}

impl RayObject {
    /// Whether this object lives in `shared`'s Ray session.
    pub fn belongs_to(&self, shared: &Arc<Shared>) -> bool {
        self.shared.as_ptr() == Arc::as_ptr(shared)
    }
}

impl Drop for RayObject {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.release(self.key);
        }
    }
}

impl RemoteResult for RayObject {
    fn fetch(&self) -> Result<Vec<u8>, String> {
        let shared = self.shared.upgrade().ok_or_else(|| {
            "the Ray session that held it has ended; call .result() inside the flow, or return the future from the flow".to_owned()
        })?;
        let blob = shared.fetch(self.key)?;
        envelope::decode_value(&blob).map(<[u8]>::to_vec)
    }
}

impl Shared {
    fn start(config: &BridgeConfig) -> Result<Arc<Shared>, RayError> {
        let python = python::find(config.python.as_deref());
        let temp_dir = tempfile::Builder::new()
            .prefix("prefect-ray-")
            .tempdir_in(short_temp_root())
            .map_err(|e| RayError::Setup(format!("could not create a temporary directory: {e}")))?;
        // The bridge script apart from the worker package: Ray puts the driver script's
        // directory on workers' paths, which would shadow the package shipped to a cluster.
        let modules = temp_dir.path().join("modules");
        let package = modules.join("prefect_ray_worker");
        let bridge_dir = temp_dir.path().join("bridge");
        let bridge_path = bridge_dir.join("prefect_ray_bridge.py");
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(|e| RayError::Setup(format!("could not write {}: {e}", path.display())))
        };
        for dir in [package.join("bin"), bridge_dir.clone()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| RayError::Setup(format!("could not create {}: {e}", dir.display())))?;
        }
        write(&package.join("__init__.py"), WORKER_SOURCE)?;
        write(&bridge_path, BRIDGE_SOURCE)?;
        let executable = std::env::current_exe()
            .map_err(|e| RayError::Setup(format!("could not find this program's executable: {e}")))?;
        let executor = if config.address.is_some() && config.ship_executor {
            let name = executable.file_name().map_or("executor".into(), |n| n.to_string_lossy().into_owned());
            let shipped = package.join("bin").join(&name);
            if std::fs::hard_link(&executable, &shipped).is_err() {
                std::fs::copy(&executable, &shipped).map_err(|e| {
                    RayError::Setup(format!("could not copy {} to ship it to Ray: {e}", executable.display()))
                })?;
            }
            format!("shipped:{name}")
        } else {
            executable.to_string_lossy().into_owned()
        };

        let mut command = Command::new(&python);
        command
            .arg("-u")
            .arg(&bridge_path)
            .env("PYTHONPATH", prepend_path(&modules, std::env::var_os("PYTHONPATH")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut defaults = vec![("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_DEDUP_LOGS", "0")];
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
        let has_token =
            std::env::var_os("RAY_AUTH_TOKEN").is_some() || std::env::var_os("RAY_AUTH_TOKEN_PATH").is_some();
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
        // Its own process group: a Ctrl-C at the terminal reaches this program, which then
        // shuts the bridge down in order, instead of reaching Ray's processes all at once.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                RayError::NoPython(python::install_hint(&python))
            } else {
                RayError::Setup(format!("could not start {}: {error}", python.display()))
            }
        })?;
        let mut commands = BufWriter::new(child.stdin.take().expect("piped"));
        let replies = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_thread = forward_stderr(stderr, stderr_tail.clone());

        let mut init = Map::new();
        init.insert("address".into(), config.address.clone().map_or(Value::Null, Value::String));
        init.insert("init_kwargs".into(), Value::Object(config.init_kwargs.clone()));
        init.insert("temp_dir".into(), Value::String(temp_dir.path().join("ray").to_string_lossy().into_owned()));
        init.insert("worker_package".into(), Value::String(package.to_string_lossy().into_owned()));
        init.insert("own_dir".into(), Value::String(temp_dir.path().to_string_lossy().into_owned()));
        init.insert("executor".into(), Value::String(executor));
        let sent = write_message(&mut commands, &init).and_then(|()| commands.flush());

        let (ready_sender, ready_receiver) = mpsc::channel();
        let mut replies = BufReader::with_capacity(1 << 16, replies);
        let handshake = std::thread::spawn(move || {
            let first = read_message::<Reply>(&mut replies);
            let _ = ready_sender.send(first);
            replies
        });
        let hello = if sent.is_err() { None } else { ready_receiver.recv_timeout(config.connect_timeout).ok() };
        let target = config.address.clone().unwrap_or_else(|| "a temporary local instance".to_owned());
        let info = match hello {
            Some(Ok(Some(Reply::Ready(info)))) => info,
            unready => {
                // The bridge is of no use: end it and everything it started.
                drop(commands);
                kill_group(child.id());
                let _ = child.wait();
                let _ = stderr_thread.join();
                let last = lock(&stderr_tail).iter().rev().find(|l| !l.trim().is_empty()).cloned().unwrap_or_default();
                return Err(match unready {
                    Some(Ok(Some(Reply::Fatal(message, _)))) if message.starts_with("Ray is not installed") => {
                        RayError::NoRay(python::install_hint(&python))
                    }
                    Some(Ok(Some(Reply::Fatal(message, details)))) => {
                        tracing::debug!(target: "prefect_ray", "ray.init failed:\n{details}");
                        RayError::Connect { target, message }
                    }
                    None => RayError::Connect {
                        target,
                        message: format!(
                            "Ray did not answer within {} s; check that the cluster is running and reachable",
                            config.connect_timeout.as_secs()
                        ),
                    },
                    _ if last.contains("No module named") => RayError::NoRay(python::install_hint(&python)),
                    _ => RayError::Connect {
                        target,
                        message: format!("the bridge process ({}) exited: {last}", python.display()),
                    },
                });
            }
        };
        let replies = handshake.join().expect("the handshake thread does not panic");

        let shared = Arc::new(Shared {
            commands: Outbox::new(commands.into_inner().map_err(|e| RayError::Setup(e.to_string()))?)
                .map_err(|e| RayError::Setup(format!("could not start a thread: {e}")))?,
            child: Mutex::new(child),
            dispatch: Mutex::new(Dispatch::default()),
            room: Condvar::new(),
            functions: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            info,
            max_in_flight: config.max_in_flight.max(1),
            alive: AtomicBool::new(true),
            releases: Mutex::new(Vec::new()),
            threads: Mutex::new(vec![stderr_thread]),
            stderr_tail,
            temp_dir: Mutex::new(Some(temp_dir)),
        });
        let reader_shared = Arc::downgrade(&shared);
        let reader = std::thread::Builder::new()
            .name("prefect-ray-replies".into())
            .spawn(move || read_replies(replies, reader_shared))
            .map_err(|e| RayError::Setup(format!("could not start a thread: {e}")))?;
        lock(&shared.threads).push(reader);
        if shared.info.started_local {
            crate::signals::install();
        }
        crate::signals::register(&shared);
        Ok(shared)
    }

    fn send(&self, command: &Command_) -> Result<(), String> {
        let releases = std::mem::take(&mut *lock(&self.releases));
        self.commands
            .send(|frames| {
                // After the configuration, commands go as a plain stream of MessagePack values.
                if !releases.is_empty() {
                    rmp_serde::encode::write(frames, &Command_::Release { keys: releases })
                        .map_err(std::io::Error::other)?;
                }
                rmp_serde::encode::write(frames, command).map_err(std::io::Error::other)
            })
            .map_err(|e| format!("could not reach the Ray bridge: {e}{}", self.last_words()))
    }

    fn last_words(&self) -> String {
        let tail = lock(&self.stderr_tail);
        match tail.iter().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => format!(" (its last words: {line})"),
            None => String::new(),
        }
    }

    /// The id of the remote function for this task with these options, defined on first use.
    pub fn function(
        &self,
        task_key: &'static str,
        task_name: &str,
        options: &Map<String, Value>,
    ) -> Result<u32, String> {
        let mut functions = lock(&self.functions);
        if let Some((_, id)) = functions.get(task_key).into_iter().flatten().find(|(known, _)| known == options) {
            return Ok(*id);
        }
        let id = functions.values().map(Vec::len).sum::<usize>() as u32;
        let options_json = serde_json::to_string(options).expect("JSON values serialize");
        self.send(&Command_::Define(id, task_name, &options_json))?;
        functions.entry(task_key).or_default().push((options.clone(), id));
        Ok(id)
    }

    /// Submits a run; its dependencies' values and reports are Ray objects of this bridge.
    /// Blocks while `max_in_flight` runs are unfinished.
    pub fn submit(self: &Arc<Self>, function: u32, call: Call) {
        let Call { pending, header, value_keys, report_keys } = call;
        let Some(key) = self.admit(vec![pending]).pop() else { return };
        let submitted = self.send(&Command_::Submit(key, function, Bytes::new(&header), &value_keys, &report_keys));
        if let Err(message) = submitted {
            self.fail_submitted(&[key], &message);
        }
    }

    /// Submits the runs of `calls` as one Ray task, which runs them one after the other.
    pub fn submit_batch(self: &Arc<Self>, function: u32, calls: Vec<Call>) {
        let mut headers = Vec::with_capacity(calls.len());
        let mut dependencies = Vec::with_capacity(calls.len());
        let mut pendings = Vec::with_capacity(calls.len());
        for Call { pending, header, value_keys, report_keys } in calls {
            headers.push(ByteBuf::from(header[1..].to_vec()));
            dependencies.push((value_keys, report_keys));
            pendings.push(pending);
        }
        let mut batch = vec![MANY_RUNS];
        if let Err(error) = rmp_serde::encode::write(&mut batch, &headers) {
            pendings.into_iter().for_each(|p| p.run.crash(format!("could not encode the calls: {error}")));
            return;
        }
        let keys = self.admit(pendings);
        if keys.is_empty() {
            return;
        }
        let dependencies =
            dependencies.iter().map(|(values, reports)| (values.as_slice(), reports.as_slice())).collect();
        if let Err(message) =
            self.send(&Command_::SubmitBatch(keys.clone(), function, Bytes::new(&batch), dependencies))
        {
            self.fail_submitted(&keys, &message);
        }
    }

    /// Registers runs as submitted, once `max_in_flight` leaves room; returns their keys
    /// (none if the session has ended: then the runs end `Crashed`).
    fn admit(self: &Arc<Self>, pendings: Vec<PendingRun>) -> Vec<u64> {
        let mut dispatch = lock(&self.dispatch);
        while dispatch.runs.len() >= self.max_in_flight && dispatch.closed.is_none() {
            dispatch = self.room.wait(dispatch).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(reason) = dispatch.closed.clone() {
            drop(dispatch);
            for pending in pendings {
                pending.run.crash(format!("the run could not be submitted: {reason}"));
            }
            return Vec::new();
        }
        pendings
            .into_iter()
            .map(|pending| {
                let key = self.next_key.fetch_add(1, Ordering::Relaxed);
                pending.run.set_runner_data(Arc::new(RayObject { key, shared: Arc::downgrade(self) }));
                dispatch.runs.insert(key, pending);
                key
            })
            .collect()
    }

    fn fail_submitted(&self, keys: &[u64], message: &str) {
        for key in keys {
            if let Some(pending) = self.take_run(*key) {
                pending.run.crash(message);
            }
        }
    }

    fn take_run(&self, key: u64) -> Option<PendingRun> {
        let taken = lock(&self.dispatch).runs.remove(&key);
        if taken.is_some() {
            self.room.notify_all();
        }
        taken
    }

    /// Sends the command that `make` builds around a new request number, and waits for
    /// the answer.
    fn request(&self, make: impl FnOnce(u64) -> Command_<'static>) -> Result<Answer, String> {
        let (sender, receiver) = mpsc::channel();
        let request = {
            let mut dispatch = lock(&self.dispatch);
            dispatch.next_request += 1;
            let request = dispatch.next_request;
            dispatch.requests.insert(request, sender);
            request
        };
        if let Err(error) = self.send(&make(request)) {
            lock(&self.dispatch).requests.remove(&request);
            return Err(error);
        }
        receiver
            .recv()
            .unwrap_or_else(|_| Err(format!("the Ray bridge stopped before it answered{}", self.last_words())))
    }

    /// Fetches a value blob.
    fn fetch(&self, key: u64) -> Result<Vec<u8>, String> {
        match self.request(|request| Command_::Get(request, key))? {
            Answer::Value(bytes) => Ok(bytes),
            Answer::Stats(_) => Err("the Ray bridge answered out of turn".to_owned()),
        }
    }

    /// The bridge process's own figures.
    pub fn stats(&self) -> Result<BridgeStats, String> {
        match self.request(|request| Command_::Stats { request })? {
            Answer::Stats(stats) => Ok(stats),
            Answer::Value(_) => Err("the Ray bridge answered out of turn".to_owned()),
        }
    }

    fn release(&self, key: u64) {
        let mut releases = lock(&self.releases);
        releases.push(key);
        if releases.len() >= 1024 {
            let keys = std::mem::take(&mut *releases);
            drop(releases);
            let _ = self.send(&Command_::Release { keys });
        }
    }

    /// Asks Ray to cancel every unfinished run.
    pub fn cancel_all(&self) {
        let keys: Vec<u64> = lock(&self.dispatch).runs.keys().copied().collect();
        for key in keys {
            let _ = self.send(&Command_::Cancel { key });
        }
    }

    /// Ends the bridge: Ray shuts down (the temporary instance with it), unfinished runs end
    /// `Crashed`, the temporary directory goes. Safe to call more than once.
    pub fn shut_down(&self) {
        if self.stop_processes() {
            self.fail_everything("the Ray session ended before the run finished");
        }
    }

    /// Ends the bridge's processes and files without touching its runs, for a process that
    /// is about to exit on a signal. Returns whether this call did the work.
    pub fn stop_processes(&self) -> bool {
        if !self.alive.swap(false, Ordering::AcqRel) {
            return false;
        }
        let _ = self.send(&Command_::Shutdown);
        self.commands.close();
        let mut child = lock(&self.child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let exited = loop {
            match child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => break false,
            }
        };
        if !exited {
            tracing::warn!(target: "prefect_ray", "the Ray bridge did not stop within 60 s; killing its process group");
        }
        // Whatever the bridge started that is still alive goes with its process group.
        kill_group(child.id());
        let _ = child.wait();
        drop(child);
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
        lock(&self.temp_dir).take();
        true
    }

    /// Ends the session's runs and requests: every run not finished yet ends `Crashed`, and
    /// any run submitted from now on too. Only the first reason counts.
    fn fail_everything(&self, message: &str) {
        let (runs, requests) = {
            let mut dispatch = lock(&self.dispatch);
            dispatch.closed.get_or_insert_with(|| message.to_owned());
            (std::mem::take(&mut dispatch.runs), std::mem::take(&mut dispatch.requests))
        };
        self.room.notify_all();
        for (_, pending) in runs {
            pending.run.crash(message);
        }
        for (_, request) in requests {
            let _ = request.send(Err(message.to_owned()));
        }
    }

    fn on_reply(&self, reply: Reply) {
        match reply {
            Reply::Done(key, report) => self.done(key, &report),
            Reply::BatchDone(keys, reports) => match rmp_serde::from_slice::<Vec<ByteBuf>>(&reports) {
                Ok(reports) if reports.len() == keys.len() => {
                    keys.iter().zip(&reports).for_each(|(key, report)| self.done(*key, report));
                }
                _ => self.fail_submitted(&keys, "the executor sent reports this driver cannot read"),
            },
            Reply::Failed(key, kind, message) => {
                if let Some(pending) = self.take_run(key) {
                    crate::report::fail(pending, kind, message);
                }
            }
            Reply::Value(request, bytes) => self.answer(request, Ok(Answer::Value(bytes.into_vec()))),
            Reply::ValueError(request, message) => self.answer(request, Err(message)),
            Reply::Stats(request, stats) => self.answer(request, Ok(Answer::Stats(stats))),
            Reply::Ready(_) | Reply::Fatal(..) | Reply::Bye => {}
        }
    }

    fn done(&self, key: u64, report: &[u8]) {
        if let Some(pending) = self.take_run(key) {
            let value = pending.run.runner_data::<RayObject>().map(|object| ResultData::Remote(object));
            crate::report::apply(pending, report, value);
        }
    }

    fn answer(&self, request: u64, answer: Result<Answer, String>) {
        if let Some(sender) = lock(&self.dispatch).requests.remove(&request) {
            let _ = sender.send(answer);
        }
    }
}

fn read_replies(mut replies: BufReader<std::process::ChildStdout>, shared: Weak<Shared>) {
    loop {
        let reply = read_message::<Reply>(&mut replies);
        let Some(shared) = shared.upgrade() else { return };
        match reply {
            Ok(Some(Reply::Bye)) | Ok(None) | Err(_) => {
                // A bridge stopped on purpose has its runs ended by whoever stopped it (or,
                // on a signal, left as they are while the process goes).
                if shared.alive.load(Ordering::Acquire) {
                    let reason = format!("the Ray bridge process exited unexpectedly{}", shared.last_words());
                    tracing::error!(target: "prefect_ray", "{reason}");
                    shared.fail_everything(&reason);
                }
                return;
            }
            Ok(Some(reply)) => shared.on_reply(reply),
        }
    }
}

/// Forwards the bridge's stderr (Ray's and Python's messages) to the log, keeping the last
/// lines for error messages.
fn forward_stderr(stderr: std::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("Error") || line.contains("ERROR") || line.contains("Traceback") {
                tracing::warn!(target: "prefect_ray::ray", "{line}");
            } else {
                tracing::debug!(target: "prefect_ray::ray", "{line}");
            }
            let mut tail = lock(&tail);
            tail.push_back(line);
            if tail.len() > 50 {
                tail.pop_front();
            }
        }
    })
}

fn kill_group(pid: u32) {
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
