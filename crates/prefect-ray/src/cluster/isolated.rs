//! A node that shares nothing with the program but the network: started in a mount
//! namespace of its own (`unshare --mount`, which needs root or user namespaces), where the
//! program's checkout, its build directory, `/tmp` and `/dev/shm` are empty file systems of
//! the node's own. Only the Python environment with Ray stays visible, bound at a path of its
//! own. Flows that work there do not count on files the program can see.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Run by bash inside the new namespace: `$1` the Python environment to keep (or empty),
/// `$2` the directories to hide (`:`-separated), `$3` the Python, then its arguments.
const ISOLATE: &str = r#"
set -eu
venv="$1"; hide="$2"; python="$3"; shift 3
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
exec "$python" "$@"
"#;

/// The node's own directory for Ray's session files, inside its empty `/tmp`.
pub(super) const NODE_TEMP_DIR: &str = "/tmp/node";

/// A command that runs `python` with the arguments added to it later, in a mount namespace
/// where the program's files are hidden. It dies with its parent, as other nodes do.
pub(super) fn command(python: &Path) -> Command {
    let (venv, python) = match venv_of(python) {
        Some(venv) => (venv.display().to_string(), String::new()),
        None => (String::new(), python.display().to_string()),
    };
    let hide: Vec<String> = hidden_dirs().iter().map(|dir| dir.display().to_string()).collect();
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--fork", "--kill-child=SIGTERM", "--", "bash", "-c", ISOLATE])
        .args(["isolate", &venv, &hide.join(":"), &python]);
    command
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
