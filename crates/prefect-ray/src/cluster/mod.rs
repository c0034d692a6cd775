//! Throwaway Ray clusters on this machine, for tests and examples.

mod isolated;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
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
    #[error("nothing listens on {address}:{port} after {} s", after.as_secs())]
    PortClosed {
        /// The head's address.
        address: String,
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
/// A cluster with an [isolated node](LocalClusterBuilder::isolated_node) that has a network
/// of its own runs on an address of the benchmark range instead (`198.18.X.1`), which that
/// node can reach and which no other machine sees.
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
    /// Dropped after the nodes: the isolated nodes' network namespaces and addresses.
    network: Option<isolated::Network>,
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

    /// The GCS address, `127.0.0.1:port` (`198.18.X.1:port` with an isolated node that has
    /// a network of its own).
    pub fn gcs_address(&self) -> &str {
        &self.gcs_address
    }

    /// The Ray Client address, `ray://127.0.0.1:port` (or at `198.18.X.1`, as
    /// [`gcs_address`](Self::gcs_address)).
    pub fn client_address(&self) -> &str {
        &self.client_address
    }

    /// The IP address node `index` runs on (0 for the head, 1 for the first added with
    /// [`LocalClusterBuilder::node`]): the cluster's, or an isolated node's own.
    ///
    /// # Panics
    ///
    /// If `index` names no node.
    pub fn node_address(&self, index: usize) -> &str {
        &self.nodes[index].address
    }

    /// Whether [isolated nodes](LocalClusterBuilder::isolated_node) get a network namespace
    /// of their own on this machine, or why not (without root, or without `ip`): tried once
    /// per process.
    ///
    /// # Errors
    ///
    /// What kept a process from a network namespace of its own, wired to this one.
    pub fn network_isolation() -> Result<(), String> {
        isolated::network_isolation()
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

    /// Adds a node like [`node`](Self::node) that shares nothing with the program, as a
    /// machine of its own would, so that a flow that works with it does not count on
    /// anything but Ray to carry its values.
    ///
    /// It runs in a mount namespace of its own, where the program's checkout, build
    /// directory, `/tmp` and `/dev/shm` are empty; this needs `unshare` and the right to use
    /// it (root, or user namespaces). Where the machine allows it
    /// ([`LocalCluster::network_isolation`]: root and `ip`), it also gets a network namespace
    /// of its own, where the program's loopback is out of reach: it runs at an address of its
    /// own in a `/24` of 198.18.0.0/15 picked for the cluster, joined to the program's
    /// namespace by a veth pair, and the cluster's other nodes run at that network's
    /// `198.18.X.1` instead of 127.0.0.1 (see [`LocalCluster::gcs_address`] and
    /// [`LocalCluster::node_address`]). Nothing of it outlives the cluster, nor the program
    /// if it is killed: the pair goes with the node's namespace, and the addresses with the
    /// pair. Elsewhere the node shares the program's network and runs on 127.0.0.1, as the
    /// others do.
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
        let own_networks = self.nodes.iter().any(|spec| spec.isolated)
            && match isolated::network_isolation() {
                Ok(()) => true,
                Err(why) => {
                    tracing::info!("isolated nodes share the program's network: {why}");
                    false
                }
            };
        let network = if own_networks { Some(isolated::Network::reserve()?) } else { None };
        let host = network.as_ref().map_or(Ipv4Addr::LOCALHOST, isolated::Network::cluster_address);
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            network,
            gcs_address: format!("{host}:{gcs_port}"),
            client_address: format!("ray://{host}:{client_port}"),
            auth_token,
            dashboard_url: None,
            dir: Some(dir),
        };
        // Isolated nodes with networks of their own start first, and wait: the cluster's
        // address is on their links, which must be there before the head binds to it.
        let mut waiting = Waiting(Vec::new());
        for spec in &self.nodes {
            let Some(network) = cluster.network.as_mut().filter(|_| spec.isolated) else {
                waiting.0.push(None);
                continue;
            };
            let address = network.next_node_address()?;
            let command = isolated::command(&python, Some((address, host)));
            let node = Node::spawn(self.worker_node(command, spec, &cluster, address), &python, address)?;
            let pid = node.process.id();
            waiting.0.push(Some(node));
            cluster.network.as_mut().expect("checked").connect(pid, address)?;
        }
        let mut head = vec![
            "start".to_owned(),
            "--head".to_owned(),
            "--block".to_owned(),
            format!("--node-ip-address={host}"),
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
        let mut node = Node::spawn(command, &python, host)?;
        node.wait_until("Ray runtime started", &python)?;
        cluster.nodes.push(node);
        // The Ray Client server comes up a moment after the node says it has started.
        wait_for_port(host, client_port, Duration::from_secs(60))?;
        for (spec, early) in self.nodes.iter().zip(&mut waiting.0) {
            let node = match early.take() {
                Some(mut node) => {
                    isolated::release(&mut node.process);
                    node
                }
                None => {
                    let command = if spec.isolated { isolated::command(&python, None) } else { Command::new(&python) };
                    Node::spawn(self.worker_node(command, spec, &cluster, host), &python, host)?
                }
            };
            // Pushed first, so that the cluster ends it if it does not come up.
            cluster.nodes.push(node);
            let node = cluster.nodes.last_mut().expect("just pushed");
            node.wait_until("WORKER_NODE_READY", &python)?;
        }
        Ok(cluster)
    }

    /// The command that starts node `spec` at `address` and joins it to the cluster's head
    /// (`program` runs the Python).
    fn worker_node(&self, program: Command, spec: &NodeSpec, cluster: &LocalCluster, address: Ipv4Addr) -> Command {
        let temp_dir = if spec.isolated { PathBuf::from(isolated::NODE_TEMP_DIR) } else { cluster.dir().to_path_buf() };
        let mut command = node_command(program, &spec.env, &cluster.auth_token, &temp_dir);
        if spec.isolated && cluster.network.is_some() {
            // Its go-ahead, once its link is in place (see isolated::release).
            command.stdin(Stdio::piped());
        }
        command.args(["-c", WORKER_NODE]).args([
            cluster.gcs_address.clone(),
            address.to_string(),
            spec.num_cpus.to_string(),
            Value::Object(spec.resources.clone()).to_string(),
            temp_dir.display().to_string(),
        ]);
        command
    }
}

/// Isolated nodes started ahead of the head, ended if the cluster does not come up.
struct Waiting(Vec<Option<Node>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        for node in self.0.iter_mut().flatten() {
            stop_group(&mut node.process);
        }
    }
}

/// The `ray` command line.
const RAY_CLI: &str = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())";

/// A node that joins the head. `ray start --address` refuses to add a node when Ray is kept
/// on loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), so this starts one the way Ray's own
/// `cluster_utils` does. Arguments: GCS address, the node's IP address, CPUs, resources
/// (JSON), temp dir.
const WORKER_NODE: &str = r#"
import json, signal, sys
import ray._private.node as node
from ray._private.parameter import RayParams
gcs, ip, cpus, resources, temp_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
params = RayParams(node_ip_address=ip, gcs_address=gcs, num_cpus=cpus, resources=resources,
                   temp_dir=temp_dir, include_log_monitor=False, node_manager_port=0,
                   dashboard_agent_listen_port=None, min_worker_port=0, max_worker_port=0)
started = node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("WORKER_NODE_READY", started.node_id, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
"#;

/// A Python command for a node: Ray kept on this machine, token authentication on, no
/// fixed ports, in a process group of its own that dies with the thread that started it.
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
    /// Its output, line by line, until it has come up (in a mutex, for the cluster to be
    /// `Sync`).
    lines: Option<Mutex<mpsc::Receiver<String>>>,
    /// The IP address it runs on.
    address: String,
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

    /// Starts a node's process, whose output is read from now on.
    fn spawn(mut command: Command, python: &Path, address: Ipv4Addr) -> Result<Node, ClusterError> {
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ClusterError::Ray(RayError::NoPython {
                    hint: python::install_hint(python),
                    python: python.into(),
                    source,
                })
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
        Ok(Node { process: child, output, lines: Some(Mutex::new(receiver)), address: address.to_string() })
    }

    /// Waits for the line that says the node is up; ends it if none comes within two
    /// minutes, or if it ends first.
    fn wait_until(&mut self, ready: &str, python: &Path) -> Result<(), ClusterError> {
        let lines =
            self.lines.take().expect("waited for once").into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            match lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line.contains(ready) => return Ok(()),
                Ok(_) => {}
                Err(_) => {
                    stop_group(&mut self.process);
                    let tail: Vec<String> = self
                        .output
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .rev()
                        .take(15)
                        .rev()
                        .cloned()
                        .collect();
                    return Err(if tail.iter().any(|l| l.contains("No module named")) {
                        ClusterError::Ray(RayError::NoRay { hint: python::install_hint(python), python: python.into() })
                    } else {
                        ClusterError::NodeDidNotStart { output: tail.join("\n") }
                    });
                }
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

fn wait_for_port(host: Ipv4Addr, port: u16, limit: Duration) -> Result<(), ClusterError> {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect((host, port)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(ClusterError::PortClosed { address: host.to_string(), port, after: limit });
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
