//! Finding the Python that has Ray, and saying what to run when there is none.

mod support;

use std::path::Path;

use prefect::flow;
use prefect_ray::{RayError, RayTaskRunner};

/// A Python without Ray: a bare virtual environment.
fn python_without_ray() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let status =
        std::process::Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(dir.path()).status().unwrap();
    assert!(status.success());
    let python = dir.path().join("bin").join("python");
    (dir, python)
}

#[flow(task_runner = RayTaskRunner::new().python(&python))]
fn with_python(python: std::path::PathBuf) {}

#[flow(task_runner = RayTaskRunner::new())]
fn with_default_python() {}

#[test]
fn a_python_without_ray_says_which_command_to_run() {
    let (_dir, python) = python_without_ray();
    let error = with_python(python.clone()).unwrap_err();
    assert!(matches!(error.runner_error::<RayError>(), Some(RayError::NoRay { .. })), "{error:?}");
    let error = error.to_string();
    assert!(error.contains(&format!("Ray is not installed for {}", python.display())), "{error}");
    // One command a user of the crates can run, without this repository, or the way back to
    // the runner's own installation.
    assert!(error.contains(&format!("`{} -m pip install 'ray[default]==2.60.0'`", python.display())), "{error}");
    assert!(error.contains("unset PREFECT_RAY_PYTHON"), "{error}");
}

#[test]
fn a_missing_python_says_the_same() {
    let error = with_python("/nonexistent/bin/python".into()).unwrap_err();
    assert!(matches!(error.runner_error::<RayError>(), Some(RayError::NoPython { .. })), "{error:?}");
    let error = error.to_string();
    assert!(error.contains("Ray is not installed for /nonexistent/bin/python"), "{error}");
}

#[test]
#[ignore = "runs in a child process with PREFECT_RAY_PYTHON set"]
fn child_with_default_python() {
    println!("RESULT={}", with_default_python().unwrap_err());
}

#[test]
fn prefect_ray_python_chooses_the_python() {
    let (_dir, python) = python_without_ray();
    let output =
        support::run_test_in_child("child_with_default_python", &[("PREFECT_RAY_PYTHON", python.to_str().unwrap())]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("Ray is not installed for {}", python.display())), "{stdout}");
}

/// Runs `child_with_default_python` from a directory with no `.venv` above it, with the
/// user's cache directory at `cache` and `path` first on `PATH`; returns its stdout.
fn default_python_elsewhere(cache: &std::path::Path, path: &std::path::Path, env: &[(&str, &str)]) -> String {
    let elsewhere = tempfile::tempdir().unwrap();
    let search = format!("{}:{}", path.display(), std::env::var("PATH").unwrap_or_default());
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_with_default_python", "--ignored", "--nocapture"])
        .current_dir(elsewhere.path())
        .env("XDG_CACHE_HOME", cache)
        .env("PATH", search)
        .env_remove("PREFECT_RAY_PYTHON")
        .env_remove("PREFECT_RAY_PROVISION")
        .env_remove("VIRTUAL_ENV")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The environment the runner installs in the user's cache directory is found there once
/// it is marked complete, from a directory with no `.venv` above it.
#[test]
fn the_environment_in_the_users_cache_directory_is_found() {
    let (_dir, python) = python_without_ray();
    let cache = tempfile::tempdir().unwrap();
    let env = cache.path().join("prefect-ray/ray-2.60.0");
    std::fs::create_dir_all(env.join("bin")).unwrap();
    std::os::unix::fs::symlink(&python, env.join("bin/python")).unwrap();
    std::fs::write(env.join("prefect-ray-ready"), "").unwrap();
    let stdout = default_python_elsewhere(cache.path(), Path::new("/nonexistent"), &[]);
    let expected = env.join("bin/python");
    assert!(stdout.contains(&format!("Ray is not installed for {}", expected.display())), "{stdout}");
}

/// With installing forbidden and no Python with Ray anywhere, the runner tries `python3` and
/// says how to get Ray: install it there, or allow the runner's own installation.
#[test]
fn with_installing_forbidden_python3_is_tried_and_the_message_says_what_to_do() {
    let (dir, python) = python_without_ray();
    let path = dir.path().join("on-path");
    std::fs::create_dir_all(&path).unwrap();
    std::os::unix::fs::symlink(&python, path.join("python3")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let stdout = default_python_elsewhere(cache.path(), &path, &[("PREFECT_RAY_PROVISION", "0")]);
    assert!(stdout.contains("Ray is not installed for python3"), "{stdout}");
    assert!(stdout.contains("unset PREFECT_RAY_PYTHON and PREFECT_RAY_PROVISION"), "{stdout}");
    assert!(!cache.path().join("prefect-ray").exists(), "nothing was installed");
}
