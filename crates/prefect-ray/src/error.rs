//! Why a RayTaskRunner could not start.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why the runner could not reach Ray; each message says what to do. A flow whose runner
/// fails to start ends `Crashed`, and its [`FlowError::RunnerStart`](prefect::FlowError::RunnerStart)
/// carries this error: `error.runner_error::<RayError>()` gets it back.
///
/// # Examples
///
/// ```no_run
/// use prefect::flow;
/// use prefect_ray::{RayError, RayTaskRunner};
///
/// #[flow(task_runner = RayTaskRunner::new().address("ray://head:10001"))]
/// fn remote() {}
///
/// match remote() {
///     Err(error) => match error.runner_error::<RayError>() {
///         Some(RayError::Unreachable { .. }) => eprintln!("start the cluster first"),
///         Some(RayError::TokenRefused { .. }) => eprintln!("set RAY_AUTH_TOKEN"),
///         _ => eprintln!("{error}"),
///     },
///     Ok(()) => {}
/// }
/// ```
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RayError {
    /// The Python to run the bridge on does not exist.
    #[error("{hint}")]
    NoPython {
        /// The Python looked for.
        python: PathBuf,
        /// What to do.
        hint: String,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },
    /// Python is there, Ray is not.
    #[error("{hint}")]
    NoRay {
        /// The Python without Ray.
        python: PathBuf,
        /// What to do.
        hint: String,
    },
    /// No Python with Ray was found, and installing one for the runner failed.
    #[error(
        "could not install Ray into {}: {reason}; or set PREFECT_RAY_PYTHON to a Python that has ray[default]==2.60.0",
        env.display()
    )]
    InstallFailed {
        /// The environment it was installing.
        env: PathBuf,
        /// What went wrong, and what to do.
        reason: String,
        /// The failure underneath, if it was this machine's.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The address is not one Ray can use: empty, without a host, without a port.
    #[error("could not connect to Ray ({address:?}): {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it, and what to write instead.
        reason: String,
    },
    /// Nothing answers at the cluster's address.
    #[error("could not connect to Ray ({address}): {message}")]
    Unreachable {
        /// The address.
        address: String,
        /// What the connection attempt said.
        message: String,
    },
    /// The cluster refused this driver's authentication token (or it had none).
    #[error(
        "could not connect to Ray ({address}): the cluster refused this driver's authentication token; pass the cluster's token with .auth_token(...) or RAY_AUTH_TOKEN"
    )]
    TokenRefused {
        /// The address.
        address: String,
    },
    /// The cluster runs another Ray or Python than this program's bridge.
    #[error("could not connect to Ray ({address}): {message}")]
    VersionMismatch {
        /// The address.
        address: String,
        /// Both versions, and what to do.
        message: String,
    },
    /// Ray did not answer within the connection deadline.
    #[error(
        "could not connect to Ray ({target}): Ray did not answer within {} s; check that the cluster is running and reachable, or raise .connect_timeout(...)",
        after.as_secs()
    )]
    Timeout {
        /// The address, or "a temporary local instance".
        target: String,
        /// How long the runner waited.
        after: Duration,
    },
    /// `ray.init` failed otherwise.
    #[error("could not connect to Ray ({target}): {message}")]
    Connect {
        /// The address, or "a temporary local instance".
        target: String,
        /// What Ray said.
        message: String,
    },
    /// The bridge process exited before it said whether it connected.
    #[error("could not connect to Ray ({target}): the bridge process ({}) exited: {cause}", python.display())]
    BridgeExited {
        /// The address, or "a temporary local instance".
        target: String,
        /// The bridge's Python.
        python: PathBuf,
        /// Why, as far as it said: its last warning or error, or the last line of its stderr.
        cause: String,
    },
    /// Something on this machine got in the way: files, threads.
    #[error("{what}: {source}")]
    Setup {
        /// What the runner was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl RayError {
    pub(crate) fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RayError {
        let what = what.into();
        move |source| RayError::Setup { what, source }
    }
}
