//! The bridge: a Python process that is this program's Ray driver.
//!
//! The runner sends it commands (define a remote function, submit a run, fetch a value,
//! release values, cancel, shut down) on its stdin and reads replies on its stdout; what it
//! prints on stderr goes to the log (see PROTOCOL.md). One bridge serves every flow run of
//! the process that asks while it is up: a subflow's runner reuses its parent's, and the
//! last runner to let go shuts it down, ending the temporary Ray instance if it started one.
//!
//! - [`launch`]: the process, its files and environment;
//! - [`handshake`]: the configuration, and the answer that says whether it connected;
//! - [`session`]: the runs and values of a connected bridge;
//! - [`outbox`]: commands on their way to it.

mod handshake;
mod launch;
mod outbox;
mod session;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde_json::{Map, Value};

pub(crate) use session::{Call, RayObject, Shared};

use crate::error::RayError;
use crate::protocol::{BridgeStats, ClusterInfo};

/// How to reach Ray: what the runner was configured with.
#[derive(Clone, Debug)]
pub(crate) struct BridgeConfig {
    pub(crate) address: Option<String>,
    pub(crate) init_kwargs: Map<String, Value>,
    pub(crate) python: Option<PathBuf>,
    pub(crate) ship_executor: bool,
    pub(crate) max_in_flight: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) auth_token: Option<String>,
    pub(crate) max_batch: usize,
}

/// A runner's hold on the bridge; when the last one is dropped, the bridge shuts down.
pub(crate) struct Bridge {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").field("cluster", &self.shared.info).finish_non_exhaustive()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.shared.shut_down();
    }
}

/// The figures of the live bridge, if any.
pub(crate) fn live_stats() -> Option<BridgeStats> {
    let bridge = lock(current()).upgrade()?;
    bridge.shared.stats().ok()
}

/// The live bridge of this process, if any.
fn current() -> &'static Mutex<Weak<Bridge>> {
    static CURRENT: Mutex<Weak<Bridge>> = Mutex::new(Weak::new());
    &CURRENT
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bridge {
    /// The bridge already running in this process, or a new one started with `config`.
    /// Returns whether it was reused.
    pub(crate) fn acquire(config: &BridgeConfig) -> Result<(Arc<Bridge>, bool), RayError> {
        let mut current = lock(current());
        if let Some(bridge) = current.upgrade().filter(|b| b.shared.is_alive()) {
            return Ok((bridge, true));
        }
        let bridge = Arc::new(Bridge { shared: start(config)? });
        *current = Arc::downgrade(&bridge);
        Ok((bridge, false))
    }

    pub(crate) fn info(&self) -> &ClusterInfo {
        &self.shared.info
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Launches a bridge, connects it, and opens its session.
fn start(config: &BridgeConfig) -> Result<Arc<Shared>, RayError> {
    let launched = launch::launch(config)?;
    let connected = handshake::handshake(launched, config)?;
    let shared = Shared::open(connected, config.max_in_flight)?;
    if shared.info.started_local {
        crate::signals::install();
    }
    crate::signals::register(Arc::downgrade(&shared) as Weak<dyn crate::signals::StopOnSignal>);
    Ok(shared)
}
