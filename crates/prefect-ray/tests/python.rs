//! Finding the Python that has Ray, and saying what to run when there is none.

mod support;

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
    // One command a user of the crates can run, without this repository.
    assert!(error.contains("python3 -m venv ") && error.contains("pip install 'ray[default]==2.60.0'"), "{error}");
    assert!(error.contains("PREFECT_RAY_PYTHON"), "{error}");
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

/// A user of the crates creates the environment in their cache directory, as the message
/// says; the runner finds it there, from a directory with no `.venv` above it.
#[test]
fn the_environment_in_the_users_cache_directory_is_found() {
    let (_dir, python) = python_without_ray();
    let cache = tempfile::tempdir().unwrap();
    let env_bin = cache.path().join("prefect-ray/ray-2.60.0/bin");
    std::fs::create_dir_all(&env_bin).unwrap();
    std::os::unix::fs::symlink(&python, env_bin.join("python")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_with_default_python", "--ignored", "--nocapture"])
        .current_dir(elsewhere.path())
        .env("XDG_CACHE_HOME", cache.path())
        .env_remove("PREFECT_RAY_PYTHON")
        .env_remove("VIRTUAL_ENV")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = env_bin.join("python");
    assert!(stdout.contains(&format!("Ray is not installed for {}", expected.display())), "{stdout}");
}
