//! Throwaway Ray clusters on this machine, for tests and examples.

mod isolated;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::RayError;
use crate::python;

/// Why a [`LocalCluster`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Python or Ray is missing.
    #[error(transparent)]
    Ray(#[from] RayError),
    /// Something on this machine got in the way: files, ports, processes.
    #[error("{what}: {source}")]
    Io {
        /// What the cluster was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A node did not say it was up within two minutes.
    #[error("a Ray node did not come up; it said:\n{output}")]
    NodeDidNotStart {
        /// Its last lines of output.
        output: String,
    },
    /// The head's Ray Client port did not open.
    #[error("nothing listens on 127.0.0.1:{port} after {} s", after.as_secs())]
    PortClosed {
        /// The port.
        port: u16,
        /// How long the cluster waited.
        after: Duration,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A Ray cluster started with `ray start` on 127.0.0.1, with token authentication on, for
/// tests and examples: a head node and any number of extra nodes, each in a process group
/// of its own. Dropping it ends every process it started and removes its directory.
///
/// # Examples
///
/// ```no_run
/// use prefect_ray::testing::LocalCluster;
///
/// let cluster = LocalCluster::builder()
///     .num_cpus(2)
///     .node(1, [("special", 1.0)], [("NODE_NAME", "special")])
///     .start()
///     .unwrap();
/// println!("GCS at {}, Ray Client at {}", cluster.gcs_address(), cluster.client_address());
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    nodes: Vec<Node>,
    gcs_address: String,
    client_address: String,
    auth_token: String,
    dashboard_url: Option<String>,
    dir: Option<tempfile::TempDir>,
}

/// How to start a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct LocalClusterBuilder {
    python: Option<PathBuf>,
    num_cpus: u32,
    head_env: Vec<(String, String)>,
    head_resources: Map<String, Value>,
    dashboard: bool,
    nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug)]
struct NodeSpec {
    num_cpus: u32,
    resources: Map<String, Value>,
    env: Vec<(String, String)>,
    /// In a mount namespace of its own, without the program's files.
    isolated: bool,
}

impl LocalCluster {
    /// Kills extra node `index` (1 for the first added with [`LocalClusterBuilder::node`])
    /// outright, its raylet, workers and their children, as a machine that dies would; the
    /// rest of the cluster goes on. For fault tests.
    ///
    /// # Panics
    ///
    /// If `index` is 0 (the head) or names no node.
    pub fn kill_node(&mut self, index: usize) {
        assert!(index > 0, "the head is not killed: the cluster would go with it");
        let node = &mut self.nodes[index].process;
        // SAFETY: kill(2) on a process group we started; no memory is involved.
        unsafe { libc::kill(-(node.id() as libc::pid_t), libc::SIGKILL) };
        let _ = node.wait();
    }

    /// A builder for a cluster whose head has 2 CPUs, a Ray Client server, and no dashboard.
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder {
            python: None,
            num_cpus: 2,
            head_env: Vec::new(),
            head_resources: Map::new(),
            dashboard: false,
            nodes: Vec::new(),
        }
    }

    /// The GCS address, `127.0.0.1:port`.
    pub fn gcs_address(&self) -> &str {
        &self.gcs_address
    }

    /// The Ray Client address, `ray://127.0.0.1:port`.
    pub fn client_address(&self) -> &str {
        &self.client_address
    }

    /// The token that connecting drivers must present.
    pub fn auth_token(&self) -> &str {
        &self.auth_token
    }

    /// The dashboard's URL, when it was asked for.
    pub fn dashboard_url(&self) -> Option<&str> {
        self.dashboard_url.as_deref()
    }

    /// The cluster's directory (Ray's `--temp-dir`): sessions, logs, runtime resources.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until dropped").path()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test learns what the cluster said, and whether a node had died.
            for (index, node) in self.nodes.iter_mut().enumerate() {
                eprintln!("{}", node.describe(index));
            }
        }
        for node in self.nodes.iter_mut().rev() {
            stop_group(&mut node.process);
        }
        self.dir.take();
    }
}

impl LocalClusterBuilder {
    /// Custom resources of the head node, such as `[("head", 1.0)]`.
    pub fn head_resources<'a>(mut self, resources: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        self.head_resources.extend(resources.into_iter().map(|(k, v)| (k.to_owned(), Value::from(v))));
        self
    }

    /// The head node's CPUs.
    pub fn num_cpus(mut self, cpus: u32) -> Self {
        self.num_cpus = cpus;
        self
    }

    /// An environment variable for the head node's processes (and so its tasks).
    pub fn head_env(mut self, name: &str, value: &str) -> Self {
        self.head_env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the dashboard too, on a free port of 127.0.0.1.
    pub fn dashboard(mut self, dashboard: bool) -> Self {
        self.dashboard = dashboard;
        self
    }

    /// Adds a node with `cpus` CPUs, custom resources, and environment variables for its
    /// processes (and so its tasks).
    pub fn node<'a>(
        mut self,
        cpus: u32,
        resources: impl IntoIterator<Item = (&'a str, f64)>,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        self.nodes.push(NodeSpec {
            num_cpus: cpus,
            resources: resources.into_iter().map(|(k, v)| (k.to_owned(), Value::from(v))).collect(),
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            isolated: false,
        });
        self
    }

    /// Adds a node like [`node`](Self::node) that shares nothing with the program but the
    /// network, as a machine of its own would: it runs in a mount namespace of its own, where
    /// the program's checkout, build directory, `/tmp` and `/dev/shm` are empty. Needs
    /// `unshare` and the right to use it (root, or user namespaces).
    pub fn isolated_node<'a>(
        self,
        cpus: u32,
        resources: impl IntoIterator<Item = (&'a str, f64)>,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut builder = self.node(cpus, resources, env);
        if let Some(spec) = builder.nodes.last_mut() {
            spec.isolated = true;
        }
        builder
    }

    /// The Python that has Ray, instead of the one found by default.
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = Some(python.into());
        self
    }

    /// Starts the head, then the other nodes, and waits until each says it is up.
    ///
    /// # Errors
    ///
    /// If Python or Ray is missing, or a node does not start.
    pub fn start(self) -> Result<LocalCluster, ClusterError> {
        let python = python::find(self.python.as_deref()).map_err(ClusterError::Ray)?;
        let dir = tempfile::Builder::new()
            .prefix("prt-")
            .tempdir_in("/tmp")
            .map_err(io("could not create a directory for the cluster"))?;
        let auth_token = uuid::Uuid::new_v4().simple().to_string();
        let (gcs_port, client_port) = (free_port()?, free_port()?);
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            gcs_address: format!("127.0.0.1:{gcs_port}"),
            client_address: format!("ray://127.0.0.1:{client_port}"),
            auth_token,
            dashboard_url: None,
            dir: Some(dir),
        };
        let mut head = vec![
            "start".to_owned(),
            "--head".to_owned(),
            "--block".to_owned(),
            "--node-ip-address=127.0.0.1".to_owned(),
            "--disable-usage-stats".to_owned(),
            format!("--port={gcs_port}"),
            format!("--ray-client-server-port={client_port}"),
            "--dashboard-agent-listen-port=0".to_owned(),
            "--min-worker-port=0".to_owned(),
            "--max-worker-port=0".to_owned(),
            format!("--num-cpus={}", self.num_cpus),
            format!("--resources={}", Value::Object(self.head_resources.clone())),
            format!("--temp-dir={}", cluster.dir().display()),
        ];
        if self.dashboard {
            let port = free_port()?;
            head.extend([
                "--include-dashboard=true".to_owned(),
                "--dashboard-host=127.0.0.1".to_owned(),
                format!("--dashboard-port={port}"),
            ]);
            cluster.dashboard_url = Some(format!("http://127.0.0.1:{port}"));
        } else {
            head.push("--include-dashboard=false".to_owned());
        }
        let mut command = node_command(Command::new(&python), &self.head_env, &cluster.auth_token, cluster.dir());
        command.args(["-c", RAY_CLI]).args(&head);
        cluster.nodes.push(start_node(command, "Ray runtime started", &python)?);
        // The Ray Client server comes up a moment after the node says it has started.
        wait_for_port(client_port, Duration::from_secs(60))?;
        for spec in &self.nodes {
            let (program, temp_dir) = if spec.isolated {
                (isolated::command(&python), PathBuf::from(isolated::NODE_TEMP_DIR))
            } else {
                (Command::new(&python), cluster.dir().to_path_buf())
            };
            let mut command = node_command(program, &spec.env, &cluster.auth_token, &temp_dir);
            command.args(["-c", WORKER_NODE]).args([
                cluster.gcs_address.clone(),
                spec.num_cpus.to_string(),
                Value::Object(spec.resources.clone()).to_string(),
                temp_dir.display().to_string(),
            ]);
            cluster.nodes.push(start_node(command, "WORKER_NODE_READY", &python)?);
        }
        Ok(cluster)
    }
}

/// The `ray` command line.
const RAY_CLI: &str = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())";

/// A node that joins the head, on 127.0.0.1. `ray start --address` refuses to add a node
/// when Ray is kept on loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), so this starts one
/// the way Ray's own `cluster_utils` does. Arguments: GCS address, CPUs, resources (JSON),
/// temp dir.
const WORKER_NODE: &str = r#"
import json, signal, sys
import ray._private.node as node
from ray._private.parameter import RayParams
gcs, cpus, resources, temp_dir = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
params = RayParams(node_ip_address="127.0.0.1", gcs_address=gcs, num_cpus=cpus, resources=resources,
                   temp_dir=temp_dir, include_log_monitor=False, node_manager_port=0,
                   dashboard_agent_listen_port=None, min_worker_port=0, max_worker_port=0)
started = node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("WORKER_NODE_READY", started.node_id, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
"#;

/// A Python command for a node: loopback only, token authentication on, no fixed ports,
/// in a process group of its own that dies with the thread that started it.
fn node_command(mut command: Command, env: &[(String, String)], token: &str, temp_dir: &Path) -> Command {
    command
        // Python's own temporary files (the dashboard's multiprocessing sockets, say) go with
        // the cluster's directory, which is removed when the cluster is dropped.
        .env("TMPDIR", temp_dir)
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .env("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        .env("AUTOSCALER_METRIC_PORT", "0")
        .env("DASHBOARD_METRIC_PORT", "0")
        .env("RAY_AUTH_MODE", "token")
        .env("RAY_AUTH_TOKEN", token)
        .env_remove("RAY_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command
}

/// A node's process, and its last lines of output, kept for a test that fails.
#[derive(Debug)]
struct Node {
    process: Child,
    output: Arc<Mutex<VecDeque<String>>>,
}

/// How many of a node's last lines of output are kept.
const KEPT_LINES: usize = 40;

impl Node {
    /// Whether the node is still running, and what it said last.
    fn describe(&mut self, index: usize) -> String {
        let role = if index == 0 { "head".to_owned() } else { format!("node {index}") };
        let status = match self.process.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            _ => "running".to_owned(),
        };
        let output = self.output.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lines: Vec<&str> = output.iter().map(String::as_str).collect();
        format!("Ray {role} (pid {}) is {status}; its last output:\n{}", self.process.id(), lines.join("\n"))
    }
}

/// Starts a node and waits for the line that says it is up.
fn start_node(mut command: Command, ready: &str, python: &Path) -> Result<Node, ClusterError> {
    let mut child = command.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ClusterError::Ray(RayError::NoPython { hint: python::install_hint(python), python: python.into(), source })
        } else {
            ClusterError::Io { what: "could not start a Ray node".into(), source }
        }
    })?;
    let output = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
    let (sender, receiver) = mpsc::channel();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let (sender, output) = (sender.clone(), Arc::clone(&output));
        // Reads until the node ends, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut kept = output.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line.clone());
                drop(kept);
                let _ = sender.send(line);
            }
        });
    }
    drop(sender);
    loop {
        match receiver.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains(ready) => return Ok(Node { process: child, output }),
            Ok(_) => {}
            Err(_) => {
                stop_group(&mut child);
                let tail: Vec<String> = output
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .rev()
                    .take(15)
                    .rev()
                    .cloned()
                    .collect();
                let missing = tail.iter().any(|l| l.contains("No module named"));
                return Err(if missing {
                    ClusterError::Ray(RayError::NoRay { hint: python::install_hint(python), python: python.into() })
                } else {
                    ClusterError::NodeDidNotStart { output: tail.join("\n") }
                });
            }
        }
    }
}

/// Ends a node: SIGTERM to its leader, which stops its processes in order (signalling the
/// whole group would make them wait out Ray's 30 s drain), a grace period, then SIGKILL to
/// whatever is left in the group.
fn stop_group(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        // Gone already (killed by a test): its pid may belong to another process by now.
        return;
    }
    // SAFETY: kill(2) on processes we started; no memory is involved.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    for _ in 0..200 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

fn wait_for_port(port: u16, limit: Duration) -> Result<(), ClusterError> {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(ClusterError::PortClosed { port, after: limit });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(io("could not find a free port"))
}
