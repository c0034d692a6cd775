//! The S3-compatible server that result-storage tests write to: s3s-fs, an S3 service over a
//! directory, built from crates.io into the workspace's `.tools`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;

/// The pinned version (the last one this toolchain builds).
const VERSION: &str = "0.14.1";

/// The variable through which tests find the server's binary.
pub(crate) const BIN_ENV: &str = "PREFECT_TEST_S3_SERVER";

/// The server's binary, built on first use.
pub(crate) fn ensure(root: &Path) -> Result<PathBuf> {
    let tools = root.join(".tools");
    let binary = tools.join("bin/s3s-fs");
    let stamp = tools.join(format!("s3s-fs-{VERSION}"));
    if binary.exists() && stamp.exists() {
        return Ok(binary);
    }
    eprintln!("xtask: building the S3-compatible test server (s3s-fs {VERSION}) into {}", tools.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "--quiet", "--locked", "--features", "binary", "--version", VERSION, "s3s-fs", "--root"])
        .arg(&tools)
        .status()
        .map_err(|e| format!("could not run cargo install: {e}"))?;
    if !status.success() {
        return Err(format!("cargo install s3s-fs {VERSION} failed ({status})"));
    }
    std::fs::write(&stamp, VERSION).map_err(|e| format!("could not write {}: {e}", stamp.display()))?;
    Ok(binary)
}
