//! The Python side: virtual environments with the pinned Ray and Prefect.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, run};

/// The Ray that the runner's bridge and workers use.
pub const RAY: &str = "ray[default]==2.60.0";
/// The Prefect server that tests report to, and the prefect-ray that benchmarks compare with.
pub const PREFECT: &[&str] = &["prefect==3.9.1", "prefect-ray==0.6.0", "ray[default]==2.60.0"];

/// `.venv`, with Ray; created or repaired when its pinned requirements are missing.
pub fn ray_venv(root: &Path) -> Result<PathBuf> {
    venv(&root.join(".venv"), &[RAY])
}

/// `.venv-prefect`, with Prefect and prefect-ray.
pub fn prefect_venv(root: &Path) -> Result<PathBuf> {
    venv(&root.join(".venv-prefect"), PREFECT)
}

/// A virtual environment at `dir` with `requirements` installed; returns its python.
fn venv(dir: &Path, requirements: &[&str]) -> Result<PathBuf> {
    let python = dir.join("bin").join("python");
    let stamp = dir.join(".requirements");
    let wanted = requirements.join("\n");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(python);
    }
    eprintln!("xtask: setting up {} with {}", dir.display(), requirements.join(", "));
    if !python.exists() {
        let system = system_python()?;
        run(Command::new(&system).args(["-m", "venv"]).arg(dir))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"]))?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(requirements))?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("could not write {}: {e}", stamp.display()))?;
    Ok(python)
}

/// The linters and test runner of the Python side, pinned.
pub const PYTHON_TOOLS: &[&str] = &["ruff==0.11.13", "mypy==1.16.1", "pytest==8.3.5"];

/// Installs extra `requirements` (`name==version` each) into the virtual environment of
/// `python`, unless those very versions are there.
pub fn install(python: &Path, requirements: &[&str]) -> Result {
    let check = format!(
        "import importlib.metadata as m, sys; sys.exit(any(m.version(n) != v for n, v in {:?}))",
        requirements.iter().filter_map(|r| r.split_once("==")).collect::<Vec<_>>()
    )
    .replace('"', "'");
    let present = Command::new(python).args(["-c", &check]).output().is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    run(Command::new(python).args(["-m", "pip", "install", "--quiet"]).args(requirements))
}

/// A Python 3.9 or newer on PATH.
fn system_python() -> Result<String> {
    for candidate in ["python3.11", "python3.12", "python3.10", "python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import sys, venv; sys.exit(sys.version_info < (3, 9))"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(candidate.to_owned());
        }
    }
    Err("no Python 3.9+ with the venv module on PATH; install python3 (and python3-venv) first".into())
}
