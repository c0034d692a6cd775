//! Finding the Python that has Ray.

use std::path::{Path, PathBuf};

/// The environment variable that names the Python to use.
pub(crate) const PYTHON_ENV: &str = "PREFECT_RAY_PYTHON";

/// The Ray release this crate is built and tested against.
pub(crate) const RAY_REQUIREMENT: &str = "ray[default]==2.60.0";

/// The name of the environment a user of the crates creates in their cache directory.
const CACHED_ENV: &str = "prefect-ray/ray-2.60.0";

/// The Python the bridge runs on: `PREFECT_RAY_PYTHON` if set; else the `.venv` of the
/// current directory or the nearest parent that has one (where `cargo xtask setup` puts
/// it); else the environment in the user's cache directory
/// (`~/.cache/prefect-ray/ray-2.60.0`, which [`install_hint`] says how to create); else
/// the active virtual environment; else `python3` from `PATH`.
pub(crate) fn find(explicit: Option<&Path>) -> PathBuf {
    let places = Places {
        env: std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()).map(PathBuf::from),
        current_dir: std::env::current_dir().ok(),
        cache: cached_env(),
        virtual_env: std::env::var_os("VIRTUAL_ENV").map(PathBuf::from),
    };
    places.find(explicit, |path| path.exists())
}

/// Where a Python with Ray may be.
struct Places {
    env: Option<PathBuf>,
    current_dir: Option<PathBuf>,
    cache: Option<PathBuf>,
    virtual_env: Option<PathBuf>,
}

impl Places {
    fn find(&self, explicit: Option<&Path>, exists: impl Fn(&Path) -> bool) -> PathBuf {
        if let Some(path) = explicit.or(self.env.as_deref()) {
            return path.to_path_buf();
        }
        let python = |env: &Path| env.join("bin").join("python");
        let local = self.current_dir.iter().flat_map(|dir| dir.ancestors().map(|dir| python(&dir.join(".venv"))));
        let others = [&self.cache, &self.virtual_env].into_iter().flatten().map(|env| python(env));
        local.chain(others).find(|candidate| exists(candidate)).unwrap_or_else(|| PathBuf::from("python3"))
    }
}

/// `~/.cache/prefect-ray/ray-2.60.0` (or under `XDG_CACHE_HOME`).
fn cached_env() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join(CACHED_ENV))
}

/// What to do when `python` has no Ray: one command that sets it up where the runner looks,
/// for a user of the crates (who has no clone of this repository).
pub(crate) fn install_hint(python: &Path) -> String {
    let env = cached_env().map_or_else(|| format!("~/.cache/{CACHED_ENV}"), |env| env.display().to_string());
    format!(
        "Ray is not installed for {}: run `python3 -m venv {env} && {env}/bin/pip install '{RAY_REQUIREMENT}'` \
         (the runner looks there), or set {PYTHON_ENV} to a Python that has {RAY_REQUIREMENT}",
        python.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places() -> Places {
        Places {
            env: None,
            current_dir: Some(PathBuf::from("/work/project/src")),
            cache: Some(PathBuf::from("/home/me/.cache/prefect-ray/ray-2.60.0")),
            virtual_env: Some(PathBuf::from("/home/me/venv")),
        }
    }

    #[test]
    fn a_venv_above_the_current_directory_comes_before_the_cache_and_the_active_venv() {
        let project = Path::new("/work/project/.venv/bin/python");
        let found = places().find(None, |path| path == project || path.starts_with("/home"));
        assert_eq!(found, project);
        let found = places().find(None, |path| path.starts_with("/home"));
        assert_eq!(found, Path::new("/home/me/.cache/prefect-ray/ray-2.60.0/bin/python"));
        let found = places().find(None, |path| path.starts_with("/home/me/venv"));
        assert_eq!(found, Path::new("/home/me/venv/bin/python"));
        assert_eq!(places().find(None, |_| false), Path::new("python3"));
    }

    #[test]
    fn an_explicit_python_or_the_variable_wins() {
        let places = Places { env: Some(PathBuf::from("/opt/py/bin/python")), ..places() };
        assert_eq!(places.find(None, |_| true), Path::new("/opt/py/bin/python"));
        assert_eq!(places.find(Some(Path::new("/x/python")), |_| true), Path::new("/x/python"));
    }

    #[test]
    fn the_hint_is_one_command_a_user_of_the_crates_can_run() {
        let hint = install_hint(Path::new("python3"));
        assert!(
            hint.contains("python3 -m venv ") && hint.contains("/bin/pip install 'ray[default]==2.60.0'"),
            "{hint}"
        );
        assert!(!hint.contains("xtask"), "{hint}");
    }
}
