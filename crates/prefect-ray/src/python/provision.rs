//! Installing Ray for a user of the crates who has none: a virtual environment in their
//! cache directory, made once and shared by every program of theirs.
//!
//! Two programs may start at once: the one that takes the lock beside the environment
//! installs, the other waits and then finds it ready. An install that was cut short leaves
//! no ready mark, so the next program finishes it (`pip install` does only what is left).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{PROVISION_ENV, PYTHON_ENV, RAY_REQUIREMENT, answers_yes, python_of};
use crate::error::RayError;

/// The file whose presence says that the environment is complete.
const READY_MARK: &str = "prefect-ray-ready";

/// Whether `env` is an environment this module finished installing.
pub(super) fn is_ready(env: &Path) -> bool {
    env.join(READY_MARK).exists() && python_of(env).exists()
}

/// Installs Ray into `env` (unless another program did so meanwhile) and returns its Python.
/// Says on stderr what it does, with pip's own progress, since it takes about a minute.
pub(super) fn install(env: &Path) -> Result<PathBuf, RayError> {
    let failed = |reason: &str| {
        let (env, reason) = (env.to_path_buf(), reason.to_string());
        move |source| RayError::InstallFailed { env, reason, source: Some(source) }
    };
    let parent = env.parent().expect("the environment is in a cache directory");
    std::fs::create_dir_all(parent).map_err(failed("could not create its directory"))?;
    let lock_path =
        parent.join(format!("{}.lock", env.file_name().map_or("env".into(), |name| name.to_string_lossy())));
    let lock = File::create(&lock_path).map_err(failed("could not create its lock file"))?;
    if lock.try_lock().is_err() {
        eprintln!("prefect-ray: waiting for another program that is installing Ray into {}", env.display());
        lock.lock().map_err(failed("could not lock it"))?;
    }
    if is_ready(env) {
        return Ok(python_of(env));
    }
    eprintln!(
        "prefect-ray: no Python with Ray found; installing {RAY_REQUIREMENT} into {} (once for all your \
         programs; about a minute). Set {PYTHON_ENV} to use a Python of your own, or {PROVISION_ENV}=0 to \
         never install.",
        env.display()
    );
    let started = Instant::now();
    if !python_of(env).exists() {
        let base = base_python().ok_or_else(|| RayError::InstallFailed {
            env: env.to_path_buf(),
            reason: "found no Python 3.9 to 3.13 on PATH (as python3); install one".into(),
            source: None,
        })?;
        let _ = std::fs::remove_dir_all(env);
        run(
            Command::new(&base).args(["-m", "venv"]).arg(env),
            env,
            "python3 -m venv failed (on Debian and Ubuntu, install python3-venv)",
        )?;
    }
    run(
        Command::new(python_of(env)).args(["-m", "pip", "install", "--disable-pip-version-check", RAY_REQUIREMENT]),
        env,
        "pip could not install Ray (see its output above)",
    )?;
    std::fs::write(env.join(READY_MARK), RAY_REQUIREMENT).map_err(failed("could not mark it ready"))?;
    eprintln!("prefect-ray: Ray is installed in {} ({:.0} s)", env.display(), started.elapsed().as_secs_f64());
    Ok(python_of(env))
}

/// `python3` from `PATH` if it is a Python that Ray 2.60 has wheels for.
fn base_python() -> Option<PathBuf> {
    let python = PathBuf::from("python3");
    answers_yes(&python, "import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 13)))").then_some(python)
}

/// Runs `command` with its output on this program's stderr (its stdout is the program's
/// own), and fails with `reason` unless it succeeds.
fn run(command: &mut Command, env: &Path, reason: &str) -> Result<(), RayError> {
    let failed = |source| RayError::InstallFailed { env: env.to_path_buf(), reason: reason.into(), source };
    let stderr = std::io::stderr();
    let as_stdout = std::os::fd::AsFd::as_fd(&stderr).try_clone_to_owned().map_err(|e| failed(Some(e)))?;
    let status = command.stdin(Stdio::null()).stdout(Stdio::from(as_stdout)).status().map_err(|e| failed(Some(e)))?;
    if status.success() { Ok(()) } else { Err(failed(None)) }
}
