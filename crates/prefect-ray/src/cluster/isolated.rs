//! A node that shares nothing with the program, as a machine of its own would not.
//!
//! **Files.** It starts in a mount namespace of its own (`unshare --mount`, which needs root
//! or user namespaces), where the program's checkout, its build directory, `/tmp` and
//! `/dev/shm` are empty file systems of the node's own. Only the Python environment with Ray
//! stays visible, bound at a path of its own. Flows that work there do not count on files the
//! program can see.
//!
//! **Network.** Where the machine allows it ([`network_isolation`]: root, `ip` from
//! iproute2), the node also gets a network namespace of its own, so that it cannot reach the
//! program's loopback either: a value that reaches it came through Ray, over an address as a
//! real network would carry it. The namespace is made in the node's process itself (`unshare`
//! in `pre_exec`), so that it is there as soon as the process is, and the node waits on its
//! standard input until the program has wired it: a veth pair whose end in the program's
//! namespace has the cluster's address `198.18.X.1` with the node's address `198.18.X.n` as
//! its point-to-point peer, and whose other end is the node's `eth0`, with the addresses the
//! other way round. One local address on several such ends, each with its own peer, joins
//! any number of nodes without a bridge device. The cluster's other nodes (the head among
//! them) then run on `198.18.X.1` rather than on 127.0.0.1, which the isolated node cannot
//! reach.
//!
//! Why this shape: nothing it adds can outlive the test, even one killed with SIGKILL. There
//! is no named namespace under `/var/run/netns`, no bridge, and no address on a device of the
//! machine's own: a veth pair goes when its namespace does, and the namespace goes with the
//! last of the node's processes and the handle the cluster keeps on it (which the kernel
//! closes when the program dies; holding it keeps `198.18.X.1` up when a test kills the node).
//! The addresses come from the range set aside for benchmarks (RFC 2544), one `/24` per
//! cluster, picked at random, unused by any address or route of the machine, and reserved
//! against other test processes by an abstract Unix socket named after it, which also goes
//! with its process. Nothing leaves the machine: every address is on a veth of the cluster's.
//!
//! Where the machine does not allow a network namespace, the node keeps the mount namespace
//! alone and runs on 127.0.0.1, as the rest of the cluster does.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{ClusterError, io};

/// Run by bash inside the new namespaces: `$1` the Python environment to keep (or empty),
/// `$2` the directories to hide (`:`-separated), `$3` the node's address and its peer's
/// (space-separated; empty when the node shares the program's network), `$4` the Python,
/// then its arguments.
const ISOLATE: &str = r#"
set -eu
venv="$1"; hide="$2"; network="$3"; python="$4"; shift 4
mount -t tmpfs node-files /mnt
if [ -n "$venv" ]; then
    mkdir /mnt/venv
    mount --bind "$venv" /mnt/venv
    python="/mnt/venv/bin/python"
fi
cd /
IFS=:
for dir in $hide; do
    mount -t tmpfs hidden "$dir"
done
unset IFS
mkdir -p /tmp/node
if [ -n "$network" ]; then
    # The program writes a line once it has made this node's eth0 and given its own end an
    # address; end of input means it gave up.
    read -r _
    set -- $network "$@"
    ip link set lo up
    ip addr add "$1" peer "$2" dev eth0
    ip link set eth0 up
    shift 2
fi
exec "$python" "$@" </dev/null
"#;

/// The node's own directory for Ray's session files, inside its empty `/tmp`.
pub(super) const NODE_TEMP_DIR: &str = "/tmp/node";

/// The node's end of its veth pair, in its own namespace.
const NODE_END: &str = "eth0";

/// A command that runs `python` with the arguments added to it later, in a mount namespace
/// where the program's files are hidden and, with `network` (the node's address and the
/// cluster's), a network namespace of its own. It dies with its parent, as other nodes do.
/// A node with a network waits for [`Network::connect`], then for [`release`] on its
/// standard input, which the caller pipes.
pub(super) fn command(python: &Path, network: Option<(Ipv4Addr, Ipv4Addr)>) -> Command {
    let (venv, python) = match venv_of(python) {
        Some(venv) => (venv.display().to_string(), String::new()),
        None => (String::new(), python.display().to_string()),
    };
    let hide: Vec<String> = hidden_dirs().iter().map(|dir| dir.display().to_string()).collect();
    let addresses = network.map(|(node, peer)| format!("{node} {peer}")).unwrap_or_default();
    let mut command = Command::new("unshare");
    command
        // No `--fork`: unshare blocks SIGTERM while it waits for a child, so the node would
        // outlive a SIGTERM, and the program's death (its parent-death signal). Without it,
        // unshare becomes bash and bash becomes Python, which keeps that signal.
        .args(["--mount", "--propagation", "private", "--", "bash", "-c", ISOLATE])
        .args(["isolate", &venv, &hide.join(":"), &addresses, &python]);
    if network.is_some() {
        in_new_network(&mut command);
    }
    command
}

/// Lets a node made by [`command`] with a network go on, once its veth is in place.
pub(super) fn release(node: &mut Child) {
    if let Some(mut stdin) = node.stdin.take() {
        // A node that has died says so when the cluster waits for it to come up.
        let _ = stdin.write_all(b"go\n");
    }
}

/// Whether isolated nodes get a network namespace of their own on this machine, or why not.
/// Tried once per process, the way a node would be wired: a process in a new network
/// namespace, and a veth pair from here into it (which goes with that process).
pub(super) fn network_isolation() -> Result<(), String> {
    static TRIED: OnceLock<Result<(), String>> = OnceLock::new();
    TRIED.get_or_init(try_network).clone()
}

fn try_network() -> Result<(), String> {
    let mut command = Command::new("cat");
    command.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
    in_new_network(&mut command);
    let mut child = command.spawn().map_err(|e| format!("no network namespace for a new process: {e}"))?;
    let wired =
        ip(&["link", "add", &link_name(), "type", "veth", "peer", "name", NODE_END, "netns", &child.id().to_string()]);
    let _ = child.kill();
    let _ = child.wait();
    wired
}

/// Makes the command's process start in a network namespace of its own, before it runs
/// anything: when `spawn` returns, the namespace is there.
fn in_new_network(command: &mut Command) {
    // SAFETY: unshare and prctl are system calls that touch no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The addresses of a cluster whose isolated nodes have networks of their own: a `/24` of
/// 198.18.0.0/15, the cluster's on `.1`, its isolated nodes' from `.2` on, and the links
/// that join them. Dropped after the nodes, it lets their namespaces (and so the links) go.
#[derive(Debug)]
pub(super) struct Network {
    /// `198.18.X.0` or `198.19.X.0`.
    subnet: [u8; 3],
    /// Holds the `/24` against other clusters on this machine while the cluster lives.
    _reserved: UnixListener,
    /// The isolated nodes handed out so far.
    nodes: u8,
    /// Each isolated node's namespace, kept for as long as the cluster.
    namespaces: Vec<OwnedFd>,
}

impl Network {
    /// Reserves a `/24` that no address or route of this machine uses, nor another cluster.
    pub(super) fn reserve() -> Result<Network, ClusterError> {
        let used = used_networks()?;
        for _ in 0..64 {
            let [a, b, ..] = *uuid::Uuid::new_v4().as_bytes();
            let subnet = [198, 18 + (a & 1), b];
            let base = u32::from(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 0));
            if used.iter().any(|&(network, prefix)| overlaps(base, 24, network, prefix)) {
                continue;
            }
            let name = format!("prefect-ray/{}.{}.{}.0/24", subnet[0], subnet[1], subnet[2]);
            let address =
                SocketAddr::from_abstract_name(name.as_bytes()).map_err(io("could not name a reservation"))?;
            if let Ok(reserved) = UnixListener::bind_addr(&address) {
                return Ok(Network { subnet, _reserved: reserved, nodes: 0, namespaces: Vec::new() });
            }
        }
        Err(ClusterError::Io {
            what: "could not find a free /24 in 198.18.0.0/15 for the cluster's isolated nodes".into(),
            source: std::io::ErrorKind::AddrInUse.into(),
        })
    }

    /// The address of the cluster's nodes that share the program's network: `198.18.X.1`.
    pub(super) fn cluster_address(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// An address for one more isolated node.
    pub(super) fn next_node_address(&mut self) -> Result<Ipv4Addr, ClusterError> {
        if self.nodes >= 250 {
            return Err(ClusterError::Io {
                what: "more than 250 isolated nodes".into(),
                source: std::io::ErrorKind::AddrNotAvailable.into(),
            });
        }
        self.nodes += 1;
        Ok(self.host(self.nodes + 1))
    }

    /// Joins the isolated node `pid` (in its new network namespace) to this namespace: a veth
    /// pair, its end here up with the cluster's address and the node's as its peer.
    pub(super) fn connect(&mut self, pid: u32, node: Ipv4Addr) -> Result<(), ClusterError> {
        let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(io("could not open the isolated node's network namespace"))?;
        self.namespaces.push(namespace.into());
        let here = link_name();
        let wire = |args: &[&str]| {
            ip(args).map_err(|message| ClusterError::Io {
                what: format!("could not wire the isolated node at {node}"),
                source: std::io::Error::other(message),
            })
        };
        wire(&["link", "add", &here, "type", "veth", "peer", "name", NODE_END, "netns", &pid.to_string()])?;
        let (local, peer) = (self.cluster_address().to_string(), node.to_string());
        wire(&["addr", "add", &local, "peer", &peer, "dev", &here])?;
        wire(&["link", "set", &here, "up"])?;
        Ok(())
    }

    fn host(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, host)
    }
}

/// A name for a veth end in the program's namespace, unique on this machine while this
/// process lives: `prt`, this process's id and a count, in at most 15 characters.
fn link_name() -> String {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    format!("prt{:x}n{:x}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed))
}

/// Runs `ip` with `args`; its error output when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// The IPv4 networks (address, prefix length) that this machine's addresses and routes use.
fn used_networks() -> Result<Vec<(u32, u32)>, ClusterError> {
    let mut text = String::new();
    for args in [&["-o", "-4", "addr", "show"][..], &["-4", "route", "show", "table", "all"][..]] {
        let output = Command::new("ip").args(args).output().map_err(io("could not list this machine's addresses"))?;
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        text.push('\n');
    }
    Ok(text
        .split_whitespace()
        .filter_map(|word| {
            let (address, prefix) = word.split_once('/').unwrap_or((word, "32"));
            Some((u32::from(address.parse::<Ipv4Addr>().ok()?), prefix.parse::<u32>().ok().filter(|&p| p <= 32)?))
        })
        // 0.0.0.0/0 (a default route) and 0.0.0.0/8 are no addresses of the range.
        .filter(|&(network, _)| network != 0)
        .collect())
}

/// Whether two networks share an address.
fn overlaps(a: u32, a_prefix: u32, b: u32, b_prefix: u32) -> bool {
    let prefix = a_prefix.min(b_prefix);
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    a & mask == b & mask
}

/// The virtual environment `python` belongs to, by its real path (so it stays reachable
/// when the directory that holds it is hidden).
fn venv_of(python: &Path) -> Option<PathBuf> {
    let dir = python.parent()?.parent()?;
    dir.join("pyvenv.cfg").exists().then(|| dir.canonicalize().ok()).flatten()
}

/// What the program can see and a machine of its own would not: its checkout (the
/// repository around its executable and its working directory), temporary files and shared
/// memory.
fn hidden_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/tmp"), PathBuf::from("/dev/shm")];
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    for start in starts.into_iter().flatten() {
        let checkout = start.ancestors().find(|dir| dir.join("Cargo.lock").exists() || dir.join(".git").exists());
        // A checkout under /tmp is hidden with it (and gone from the namespace once /tmp is).
        if let Some(checkout) = checkout.and_then(|dir| dir.canonicalize().ok())
            && !dirs.iter().any(|hidden| checkout.starts_with(hidden))
        {
            dirs.push(checkout);
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_overlap_when_one_holds_an_address_of_the_other() {
        let net = |a, b, c| u32::from(Ipv4Addr::new(198, a, b, c));
        assert!(overlaps(net(18, 7, 0), 24, net(18, 7, 9), 32));
        assert!(overlaps(net(18, 7, 0), 24, net(18, 0, 0), 15));
        assert!(!overlaps(net(18, 7, 0), 24, net(18, 8, 1), 32));
        assert!(!overlaps(net(19, 7, 0), 24, net(18, 0, 0), 16));
    }
}
