//! The crates as a user gets them: packaged with `cargo package` (which builds each one from
//! its package, so a file missing from a package fails here), then used by a fresh crate
//! outside the workspace that runs a flow on a temporary Ray instance.

use std::path::Path;
use std::process::Command;

use super::{Result, cargo, run};

/// The crates a user depends on, in the order they are packaged.
const CRATES: &[&str] = &["prefect-api", "prefect-macros", "prefect", "prefect-ray"];

const MAIN: &str = r#"
use prefect::{flow, task};
use prefect_ray::RayTaskRunner;

#[task]
fn square(number: u64) -> u64 {
    number * number
}

#[flow(task_runner = RayTaskRunner::new())]
fn squares(highest: u64) -> u64 {
    square.map(0..highest).iter().map(|f| f.result().unwrap()).sum()
}

fn main() {
    println!("SUM={}", squares(10).unwrap());
}
"#;

pub(crate) fn check(root: &Path, ray_python: &Path) -> Result {
    eprintln!("xtask: packaging the crates, then running a flow from a crate of a user's own");
    forget_earlier_packages();
    let mut package = cargo();
    package.args(["package", "--workspace", "--exclude", "xtask", "--exclude", "prefect-ray-bench", "--allow-dirty"]);
    run(package.arg("--quiet"))?;

    let home = std::env::temp_dir().join(format!("prefect-downstream-{}", std::process::id()));
    let outcome = run_downstream(root, ray_python, &home);
    let _ = std::fs::remove_dir_all(&home);
    outcome
}

/// `cargo package` checks each crate against the others through a registry of its own,
/// whose crates Cargo extracts under `$CARGO_HOME/registry/src/-<hash of its path>/` and
/// never extracts again: a checkout at a path used before would be checked against the
/// crates packaged then. Those directories (only local registries' names start with `-`)
/// are removed for our crates first.
fn forget_earlier_packages() {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    let Some(sources) = home.map(|home| home.join("registry").join("src")) else { return };
    let Ok(registries) = std::fs::read_dir(&sources) else { return };
    let version = env!("CARGO_PKG_VERSION");
    for registry in registries.flatten().filter(|r| r.file_name().to_string_lossy().starts_with('-')) {
        for name in ["prefect", "prefect-api", "prefect-macros", "prefect-ray"] {
            let _ = std::fs::remove_dir_all(registry.path().join(format!("{name}-{version}")));
        }
    }
}

fn run_downstream(root: &Path, ray_python: &Path, home: &Path) -> Result {
    let write = |path: &Path, text: &str| {
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .and_then(|()| std::fs::write(path, text))
            .map_err(|e| format!("could not write {}: {e}", path.display()))
    };
    let patches: String = CRATES
        .iter()
        .map(|name| format!("{name} = {{ path = {:?} }}\n", root.join("target/package").join(format!("{name}-0.1.0"))))
        .collect();
    let manifest = format!(
        "[package]\nname = \"downstream\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [dependencies]\nprefect = \"0.1.0\"\nprefect-ray = \"0.1.0\"\n\n\
         [patch.crates-io]\n{patches}\n[workspace]\n"
    );
    write(&home.join("Cargo.toml"), &manifest)?;
    write(&home.join("src/main.rs"), MAIN)?;
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["run", "--quiet"])
        .current_dir(home)
        // Built apart from the workspace, and removed with it by `cargo clean`.
        .env("CARGO_TARGET_DIR", root.join("target/downstream"))
        .env("PREFECT_RAY_PYTHON", ray_python)
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .output()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && stdout.contains("SUM=285") {
        Ok(())
    } else {
        Err(format!(
            "the crate of a user's own did not run its flow ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
