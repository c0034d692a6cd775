//! Why a RayTaskRunner could not start.

use thiserror::Error;

/// Why the runner could not reach Ray; each message says what to do.
#[derive(Debug, Error)]
pub enum RayError {
    /// The Python to run the bridge on does not exist.
    #[error("{0}")]
    NoPython(String),
    /// Python is there, Ray is not.
    #[error("{0}")]
    NoRay(String),
    /// `ray.init` failed, or did not answer in time.
    #[error("could not connect to Ray ({target}): {message}")]
    Connect {
        /// The address, or "a temporary local instance".
        target: String,
        /// What Ray said.
        message: String,
    },
    /// Something on this machine got in the way: files, threads.
    #[error("{0}")]
    Setup(String),
}
