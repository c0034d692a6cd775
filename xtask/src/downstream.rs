//! The crates as a user gets them: packaged with `cargo publish --dry-run` (which builds each
//! one from its package, so a file missing from a package fails here), then used by a fresh crate
//! outside the workspace, made of the README's "Your first project" files, set up the way
//! that section says and nothing more: `cargo run` (whose first flow installs Ray into an
//! empty cache directory) and `cargo test`, each running flows on a temporary Ray instance.

use std::path::Path;
use std::process::Command;

use super::{Result, cargo, run};

/// The crates a user depends on, in the order they are packaged.
const CRATES: &[&str] = &["prefect-api", "prefect-macros", "prefect", "prefect-ray"];

/// The README's section that the fresh crate is made of: each block after a
/// `<!-- first-project: PATH -->` line is that file.
const GUIDE_MARK: &str = "<!-- first-project: ";

pub(crate) fn check(root: &Path) -> Result {
    eprintln!("xtask: packaging the crates, then running a flow from a crate of a user's own");
    forget_earlier_packages();
    // What `cargo publish` does short of the upload, for each crate in dependency order:
    // package it, check its metadata, and build it from its package against the packages
    // before it (so a file missing from a package, such as the bridge's Python, fails here).
    let mut publish = cargo();
    publish.args(["publish", "--dry-run", "--workspace", "--exclude", "xtask", "--exclude", "prefect-ray-bench"]);
    run(publish.args(["--allow-dirty", "--quiet"]))?;

    let home = std::env::temp_dir().join(format!("prefect-downstream-{}", std::process::id()));
    let outcome = run_downstream(root, &home);
    let _ = std::fs::remove_dir_all(&home);
    outcome
}

/// Packaging checks each crate against the others through a registry of its own,
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
        for name in CRATES {
            let _ = std::fs::remove_dir_all(registry.path().join(format!("{name}-{version}")));
        }
    }
}

fn run_downstream(root: &Path, home: &Path) -> Result {
    let write = |path: &Path, text: &str| {
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .and_then(|()| std::fs::write(path, text))
            .map_err(|e| format!("could not write {}: {e}", path.display()))
    };
    let readme =
        std::fs::read_to_string(root.join("README.md")).map_err(|e| format!("could not read README.md: {e}"))?;
    let files = guide_files(&readme);
    let Some(manifest) = files.get("Cargo.toml") else {
        return Err("README.md's first-project section lacks its Cargo.toml".into());
    };
    let patches: String = CRATES
        .iter()
        .map(|name| format!("{name} = {{ path = {:?} }}\n", root.join("target/package").join(format!("{name}-0.1.0"))))
        .collect();
    let project = home.join("my-flows");
    write(&project.join("Cargo.toml"), &format!("{manifest}\n[patch.crates-io]\n{patches}\n[workspace]\n"))?;
    for (path, text) in files.iter().filter(|(path, _)| *path != "Cargo.toml") {
        write(&project.join(path), text)?;
    }
    let cargo = |args: &[&str]| {
        let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(&project)
            // Built apart from the workspace, and removed with it by `cargo clean`.
            .env("CARGO_TARGET_DIR", root.join("target/downstream"))
            // A user's machine: no Python chosen, nothing installed in the cache directory.
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env_remove("PREFECT_RAY_PYTHON")
            .env_remove("PREFECT_RAY_PROVISION")
            .env_remove("VIRTUAL_ENV")
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .output()
            .map_err(|e| format!("could not run cargo: {e}"))?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        if output.status.success() {
            Ok((stdout, stderr))
        } else {
            Err(format!(
                "`cargo {}` failed in the crate of a user's own ({}):\n{stdout}\n{stderr}",
                args.join(" "),
                output.status
            ))
        }
    };
    let (stdout, stderr) = cargo(&["run", "--quiet"])?;
    let installed = stderr.contains("prefect-ray: Ray is installed in");
    if !(installed && stdout.contains("sum of squares: 385") && stdout.contains("doubled: 42")) {
        return Err(format!("the crate of a user's own did not install Ray and run its flows:\n{stdout}\n{stderr}"));
    }
    let (stdout, stderr) = cargo(&["test", "--quiet"])?;
    // Its unit test and tests/cluster.rs, on the Ray installed by `cargo run`.
    if stdout.matches("test result: ok. 1 passed").count() != 2 || stderr.contains("installing ray") {
        return Err(format!(
            "`cargo test` of the crate of a user's own did not pass on the installed Ray:\n{stdout}\n{stderr}"
        ));
    }
    Ok(())
}

/// The files of the README's first-project section, by path.
fn guide_files(readme: &str) -> std::collections::HashMap<String, String> {
    let mut files = std::collections::HashMap::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line.strip_prefix(GUIDE_MARK).and_then(|rest| rest.strip_suffix(" -->")) else { continue };
        if !lines.next().is_some_and(|fence| fence.starts_with("```")) {
            continue;
        }
        let body: Vec<&str> = lines.by_ref().take_while(|line| !line.starts_with("```")).collect();
        files.insert(path.to_string(), body.join("\n") + "\n");
    }
    files
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_guide_files_are_the_blocks_after_their_marks() {
        let readme = "text\n<!-- first-project: a.toml -->\n```toml\nx = 1\n```\nmore\n\
                      <!-- first-project: src/b.rs -->\n```rust,ignore\nfn b() {}\n\nfn c() {}\n```\n";
        let files = super::guide_files(readme);
        assert_eq!(files["a.toml"], "x = 1\n");
        assert_eq!(files["src/b.rs"], "fn b() {}\n\nfn c() {}\n");
        assert_eq!(files.len(), 2);
    }
}
