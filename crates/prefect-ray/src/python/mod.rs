//! Finding the Python that has Ray, and installing one where there is none (`provision`).

mod provision;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::RayError;

/// The environment variable that names the Python to use.
pub(crate) const PYTHON_ENV: &str = "PREFECT_RAY_PYTHON";

/// The environment variable that, set to `0`, keeps the runner from installing Ray itself.
pub(crate) const PROVISION_ENV: &str = "PREFECT_RAY_PROVISION";

/// The Ray release this crate is built and tested against.
pub(crate) const RAY_REQUIREMENT: &str = "ray[default]==2.60.0";

/// The environment the runner installs Ray into, under the user's cache directory.
const CACHED_ENV: &str = "prefect-ray/ray-2.60.0";

/// The Python the bridge and test clusters run on: `explicit` or `PREFECT_RAY_PYTHON` if
/// set; else the `.venv` of the current directory or the nearest parent that has one, if it
/// has Ray (where `cargo xtask setup` puts it in this repository); else the environment the
/// runner installed in the user's cache directory (`~/.cache/prefect-ray/ray-2.60.0`); else
/// the active virtual environment, if it has Ray; else `python3` from `PATH`, if it has Ray.
///
/// When none of them has Ray, the runner installs it into the cache directory, once for
/// every program of this user (`provision`), unless `PREFECT_RAY_PROVISION=0`: then it is
/// `python3`, and the bridge fails saying what to do ([`install_hint`]).
pub(crate) fn find(explicit: Option<&Path>) -> Result<PathBuf, RayError> {
    let places = Places {
        env: std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()).map(PathBuf::from),
        current_dir: std::env::current_dir().ok(),
        cache: cached_env(),
        virtual_env: std::env::var_os("VIRTUAL_ENV").filter(|p| !p.is_empty()).map(PathBuf::from),
    };
    if let Some(python) = places.find(explicit, has_ray, provision::is_ready) {
        return Ok(python);
    }
    let system = PathBuf::from("python3");
    let allowed = std::env::var(PROVISION_ENV).map_or(true, |value| !matches!(value.trim(), "0" | "false" | "no"));
    match places.cache {
        Some(cache) if allowed && !imports_ray(&system) => provision::install(&cache),
        _ => Ok(system),
    }
}

/// Where a Python with Ray may be.
struct Places {
    env: Option<PathBuf>,
    current_dir: Option<PathBuf>,
    cache: Option<PathBuf>,
    virtual_env: Option<PathBuf>,
}

impl Places {
    /// The first Python that will do, or `None` when only `python3` is left. `has_ray` says
    /// whether a virtual environment has Ray; `ready` whether the runner's own is complete.
    fn find(
        &self,
        explicit: Option<&Path>,
        has_ray: impl Fn(&Path) -> bool,
        ready: impl Fn(&Path) -> bool,
    ) -> Option<PathBuf> {
        if let Some(path) = explicit.or(self.env.as_deref()) {
            return Some(path.to_path_buf());
        }
        let local = self.current_dir.iter().flat_map(|dir| dir.ancestors().map(|dir| dir.join(".venv")));
        let cache = self.cache.iter().filter(|env| ready(env)).cloned();
        let active = self.virtual_env.iter().cloned();
        let mut candidates = local.filter(|env| has_ray(env)).chain(cache).chain(active.filter(|env| has_ray(env)));
        candidates.next().map(|env| python_of(&env))
    }
}

/// The Python of a virtual environment.
fn python_of(env: &Path) -> PathBuf {
    env.join("bin").join("python")
}

/// Whether the virtual environment `env` has a Python and Ray installed for it (a
/// `ray-*.dist-info` in its site-packages), without starting Python.
fn has_ray(env: &Path) -> bool {
    if !python_of(env).exists() {
        return false;
    }
    let Ok(versions) = std::fs::read_dir(env.join("lib")) else { return false };
    versions.flatten().any(|version| {
        std::fs::read_dir(version.path().join("site-packages")).is_ok_and(|packages| {
            packages.flatten().any(|package| {
                let name = package.file_name();
                let name = name.to_string_lossy();
                name.starts_with("ray-") && name.ends_with(".dist-info")
            })
        })
    })
}

/// Whether `python` can find Ray (it need not exist).
fn imports_ray(python: &Path) -> bool {
    answers_yes(python, "import importlib.util, sys; sys.exit(importlib.util.find_spec('ray') is None)")
}

/// Whether `python` exists and `code` exits successfully under it.
fn answers_yes(python: &Path, code: &str) -> bool {
    Command::new(python)
        .args(["-c", code])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `~/.cache/prefect-ray/ray-2.60.0` (or under `XDG_CACHE_HOME`).
fn cached_env() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join(CACHED_ENV))
}

/// What to do when `python` has no Ray, for a user of the crates (who has no clone of this
/// repository): install it there, or let the runner install its own.
pub(crate) fn install_hint(python: &Path) -> String {
    let env = cached_env().map_or_else(|| format!("~/.cache/{CACHED_ENV}"), |env| env.display().to_string());
    format!(
        "Ray is not installed for {python}: run `{python} -m pip install '{RAY_REQUIREMENT}'`, or unset \
         {PYTHON_ENV} and {PROVISION_ENV} so that the runner installs Ray into {env} itself",
        python = python.display()
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
    fn a_venv_with_ray_above_the_current_directory_comes_before_the_cache_and_the_active_venv() {
        let project = Path::new("/work/project/.venv");
        let all = |_: &Path| true;
        let found = places().find(None, |env| env == project || env.starts_with("/home"), all);
        assert_eq!(found.as_deref(), Some(Path::new("/work/project/.venv/bin/python")));
        let found = places().find(None, |env| env.starts_with("/home"), all);
        assert_eq!(found.as_deref(), Some(Path::new("/home/me/.cache/prefect-ray/ray-2.60.0/bin/python")));
        let found = places().find(None, |env| env.starts_with("/home"), |_| false);
        assert_eq!(found.as_deref(), Some(Path::new("/home/me/venv/bin/python")));
        assert_eq!(places().find(None, |_| false, |_| false), None);
    }

    #[test]
    fn a_venv_without_ray_is_passed_over() {
        let found = places().find(None, |env| env == Path::new("/.venv"), |_| false);
        assert_eq!(found.as_deref(), Some(Path::new("/.venv/bin/python")));
    }

    #[test]
    fn an_explicit_python_or_the_variable_wins() {
        let places = Places { env: Some(PathBuf::from("/opt/py/bin/python")), ..places() };
        assert_eq!(places.find(None, |_| true, |_| true).as_deref(), Some(Path::new("/opt/py/bin/python")));
        let explicit = places.find(Some(Path::new("/x/python")), |_| true, |_| true);
        assert_eq!(explicit.as_deref(), Some(Path::new("/x/python")));
    }

    #[test]
    fn the_hint_is_one_command_a_user_of_the_crates_can_run() {
        let hint = install_hint(Path::new("/opt/py/bin/python"));
        assert!(hint.contains("`/opt/py/bin/python -m pip install 'ray[default]==2.60.0'`"), "{hint}");
        assert!(hint.contains("PREFECT_RAY_PYTHON") && hint.contains("prefect-ray/ray-2.60.0"), "{hint}");
        assert!(!hint.contains("xtask"), "{hint}");
    }

    #[test]
    fn a_venv_has_ray_when_its_site_packages_hold_ray() {
        let env = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(env.path().join("bin")).unwrap();
        std::fs::write(env.path().join("bin/python"), "").unwrap();
        let packages = env.path().join("lib/python3.11/site-packages");
        std::fs::create_dir_all(packages.join("rich-13.0.0.dist-info")).unwrap();
        assert!(!has_ray(env.path()));
        std::fs::create_dir_all(packages.join("ray-2.60.0.dist-info")).unwrap();
        assert!(has_ray(env.path()));
        std::fs::remove_file(env.path().join("bin/python")).unwrap();
        assert!(!has_ray(env.path()));
    }
}
