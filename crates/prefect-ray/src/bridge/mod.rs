//! The bridge: a Python process that is this program's Ray driver.
//!
//! The runner sends it commands (define a remote function, submit a run, fetch a value,
//! release values, cancel, shut down) on its stdin and reads replies on its stdout, its log
//! records among them (see PROTOCOL.md). Each runner gets a bridge of its own, connected to
//! the cluster it asked for: the bridge is a process, so two drivers coexist. Only a subflow
//! whose parent flow runs on Ray shares its parent's bridge; the last runner to let go of a
//! bridge shuts it down, ending the temporary Ray instance if it started one.
//!
//! - [`launch`]: the process, its files and environment;
//! - [`handshake`]: the configuration, and the answer that says whether it connected;
//! - [`output`]: its log records and stderr, and what names the cause when it dies;
//! - [`session`]: the runs and values of a connected bridge;
//! - [`outbox`]: commands on their way to it.

mod handshake;
mod launch;
mod outbox;
mod output;
mod session;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prefect::runner::FlowRunInfo;
use serde_json::{Map, Value};
use uuid::Uuid;

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
    pub(crate) ship_debug_info: bool,
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

/// The figures of the most recently started live bridge, if any.
pub(crate) fn live_stats() -> Option<BridgeStats> {
    let bridge = lock(live()).iter().rev().find_map(|(_, bridge)| bridge.upgrade())?;
    bridge.shared.stats().ok()
}

/// The live bridges of this process, by the flow runs they serve, oldest first.
fn live() -> &'static Mutex<Vec<(Uuid, Weak<Bridge>)>> {
    static LIVE: Mutex<Vec<(Uuid, Weak<Bridge>)>> = Mutex::new(Vec::new());
    &LIVE
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bridge {
    /// The bridge for `flow_run`: its parent flow run's, if that runs on Ray in this
    /// process, or a new one started with `config`. Returns whether it was reused.
    pub(crate) fn acquire(config: &BridgeConfig, flow_run: &FlowRunInfo) -> Result<(Arc<Bridge>, bool), RayError> {
        let parent = flow_run.parent.as_ref().map(|parent| parent.flow_run_id);
        let found = {
            let mut live = lock(live());
            live.retain(|(_, bridge)| bridge.upgrade().is_some_and(|b| b.shared.is_alive()));
            live.iter().find(|(id, _)| Some(*id) == parent).and_then(|(_, bridge)| bridge.upgrade())
        };
        let (bridge, reused) = match found {
            Some(bridge) => (bridge, true),
            // Started outside the lock: another flow's runner need not wait for this one.
            None => (Arc::new(Bridge { shared: start(config)? }), false),
        };
        lock(live()).push((flow_run.id, Arc::downgrade(&bridge)));
        Ok((bridge, reused))
    }

    pub(crate) fn info(&self) -> &ClusterInfo {
        &self.shared.info
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// How long a cluster's address may take to accept a connection before the runner gives
/// up on it, without starting a bridge.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Launches a bridge, connects it, and opens its session. A bad address, or one where
/// nothing answers, fails first, in the program.
fn start(config: &BridgeConfig) -> Result<Arc<Shared>, RayError> {
    if let Some(address) = &config.address {
        let parsed = crate::address::parse(address)?;
        crate::address::probe(address, &parsed, PROBE_WAIT)?;
    }
    let launched = launch::launch(config)?;
    let connected = handshake::handshake(launched, config)?;
    let shared = Shared::open(connected, config.max_in_flight)?;
    // Ctrl-C and SIGTERM end the bridge (and a temporary instance with it) before the
    // program goes, while the engine ends the live runs.
    prefect::runner::stop_on_interrupt(Arc::downgrade(&shared) as Weak<dyn prefect::runner::StopOnInterrupt>);
    Ok(shared)
}
