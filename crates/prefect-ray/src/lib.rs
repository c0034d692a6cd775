#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

mod address;
mod bridge;
#[cfg(feature = "testing")]
mod cluster;
mod error;
mod executor;
mod protocol;
mod python;
mod remote;
mod report;
mod runner;
mod shared_memory;

pub use error::RayError;
pub use remote::{RemoteOptions, remote_options};
pub use runner::RayTaskRunner;

/// Throwaway local Ray clusters, for tests and examples (the `testing` feature).
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::cluster::{ClusterError, LocalCluster, LocalClusterBuilder};
}

/// Figures about this process's connection to Ray, for checking where data went.
pub mod diagnostics {
    pub use crate::protocol::BridgeStats;

    /// The figures of the live Ray bridge (this program's Ray driver process) started last,
    /// if one is running: its peak memory, and how many task values it holds references to.
    pub fn bridge_stats() -> Option<BridgeStats> {
        crate::bridge::live_stats()
    }

    /// This process's peak resident memory, in bytes: with [`bridge_stats`], shows whether
    /// a value passed through the driver.
    pub fn peak_rss_bytes() -> u64 {
        // SAFETY: getrusage fills the struct we hand it.
        let usage = unsafe {
            let mut usage = std::mem::zeroed::<libc::rusage>();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        usage.ru_maxrss as u64 * 1024
    }
}

/// Runners and their errors cross threads: checked here, at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<RayTaskRunner>();
    send_sync::<RayError>();
    send_sync::<RemoteOptions>();
};

/// The repository README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
