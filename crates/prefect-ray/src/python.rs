//! Finding the Python that has Ray.

use std::path::{Path, PathBuf};

/// The environment variable that names the Python to use.
pub(crate) const PYTHON_ENV: &str = "PREFECT_RAY_PYTHON";

/// The Ray release this crate is built and tested against.
pub(crate) const RAY_REQUIREMENT: &str = "ray[default]==2.60.0";

/// The Python the bridge runs on: `PREFECT_RAY_PYTHON` if set; else the `.venv` of the
/// current directory or the nearest parent that has one (where `cargo xtask setup` puts
/// it); else the active virtual environment; else `python3` from `PATH`.
pub(crate) fn find(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    if let Some(path) = std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Ok(current) = std::env::current_dir() {
        for dir in current.ancestors() {
            let candidate = dir.join(".venv").join("bin").join("python");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let candidate = PathBuf::from(venv).join("bin").join("python");
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("python3")
}

/// What to do when `python` has no Ray.
pub(crate) fn install_hint(python: &Path) -> String {
    format!(
        "Ray is not installed for {}: run `cargo xtask setup` in the prefect-ray repository (it creates .venv with {RAY_REQUIREMENT}), \
         or `pip install '{RAY_REQUIREMENT}'`, or set {PYTHON_ENV} to a Python that has Ray",
        python.display()
    )
}
