//! Ctrl-C and SIGTERM end the temporary Ray instances this process started before the
//! process goes.

use std::sync::{Mutex, Once, Weak};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// What ends on a signal: a bridge, with the temporary Ray instance it started.
pub(crate) trait StopOnSignal: Send + Sync {
    /// Ends its processes and files at once, leaving runs as they are: the process is about
    /// to exit as the signal says.
    fn stop_on_signal(&self);
}

static LIVE: Mutex<Vec<Weak<dyn StopOnSignal>>> = Mutex::new(Vec::new());

/// Remembers a bridge to shut down on a signal.
pub(crate) fn register(bridge: Weak<dyn StopOnSignal>) {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|weak| weak.strong_count() > 0);
    live.push(bridge);
}

/// Starts the thread that waits for SIGINT, SIGTERM and SIGHUP. On one, it shuts down every
/// live bridge (and with them the temporary Ray instances), then ends the process as the
/// signal would have.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(signals) => signals,
            Err(error) => {
                tracing::warn!(target: "prefect_ray", "could not watch for Ctrl-C ({error}); a temporary Ray instance may outlive an interrupted program");
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("prefect-ray-signals".into()).spawn(move || {
            let mut signals = signals;
            if let Some(signal) = signals.forever().next() {
                let live: Vec<_> = LIVE.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
                if live.iter().any(|weak| weak.strong_count() > 0) {
                    eprintln!("prefect-ray: interrupted; shutting down Ray before exiting");
                }
                // Runs are left as they are: finishing them would let the program carry on
                // and exit as if nothing happened, before the signal ends it.
                for bridge in live.iter().filter_map(Weak::upgrade) {
                    bridge.stop_on_signal();
                }
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(target: "prefect_ray", "could not start the signal thread: {error}");
        }
    });
}
