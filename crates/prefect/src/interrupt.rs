//! When the program is interrupted (Ctrl-C, SIGTERM, SIGHUP) or exits while runs are still
//! live, those runs end `Crashed` wherever they are observed (a Prefect server), and runners
//! stop what they started (a temporary Ray instance) before the process goes.
//!
//! The engine installs this with the first flow run. On a signal, a thread of its own tells
//! every observer ([`RunObserver::interrupted`](crate::observe::RunObserver::interrupted)),
//! while another stops what runners registered with [`register`]; then the process exits as
//! the signal would have. A second signal while that is under way ends the process at once.
//! A program that exits otherwise while a flow runs on another thread (its `main` returns or
//! panics) ends the live runs the same way, from an `atexit` handler.

use std::io::Write;
use std::sync::{Mutex, Once, Weak};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Something a runner started that must end before the process does: stopped on Ctrl-C
/// and SIGTERM, while the live runs are reported `Crashed`.
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, Weak};
/// use prefect::runner::{StopOnInterrupt, stop_on_interrupt};
///
/// struct Cluster;
///
/// impl StopOnInterrupt for Cluster {
///     fn stop_on_interrupt(&self) {
///         // End the cluster's processes and remove its files: the process is about to exit.
///     }
/// }
///
/// let cluster = Arc::new(Cluster);
/// stop_on_interrupt(Arc::downgrade(&cluster) as Weak<dyn StopOnInterrupt>);
/// ```
pub trait StopOnInterrupt: Send + Sync {
    /// Ends its processes and files at once, leaving runs as they are: the engine ends
    /// those, and the process is about to exit.
    fn stop_on_interrupt(&self);
}

static STOP: Mutex<Vec<Weak<dyn StopOnInterrupt>>> = Mutex::new(Vec::new());

/// Stops `what` when the program is interrupted, if it is still alive then.
pub fn stop_on_interrupt(what: Weak<dyn StopOnInterrupt>) {
    let mut stop = STOP.lock().unwrap_or_else(|p| p.into_inner());
    stop.retain(|weak| weak.strong_count() > 0);
    stop.push(what);
}

/// Installs the signal thread and the exit handler, once per process.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a plain function that the C runtime calls at exit.
        if unsafe { libc::atexit(at_exit) } != 0 {
            tracing::debug!(target: "prefect", "could not register the exit handler");
        }
        let signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(signals) => signals,
            Err(error) => {
                tracing::warn!(target: "prefect", "could not watch for Ctrl-C ({error}); an interrupted program leaves its runs as they are");
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("prefect-signals".into()).spawn(move || {
            let mut signals = signals;
            let mut pending = signals.forever();
            let Some(signal) = pending.next() else { return };
            let ending = std::thread::Builder::new().name("prefect-interrupted".into()).spawn(move || {
                // Whatever happens while ending things (a closed stderr, a panicking
                // observer), the process goes.
                let reason = format!("the program was interrupted ({})", signal_name(signal));
                let _ = std::panic::catch_unwind(|| end_everything(&reason, true));
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            });
            if ending.is_err() {
                // SAFETY: _exit(2) ends the process at once; it touches no memory of ours.
                unsafe { libc::_exit(128 + signal) };
            }
            // A second signal: the user does not want to wait.
            if let Some(again) = pending.next() {
                // SAFETY: as above.
                unsafe { libc::_exit(128 + again) };
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(target: "prefect", "could not start the signal thread: {error}");
        }
    });
}

extern "C" fn at_exit() {
    // A panic must not unwind out of a C callback.
    let _ = std::panic::catch_unwind(|| end_everything("the program exited before the run ended", false));
}

/// Stops what runners registered and ends live runs where they are observed, at the same
/// time; returns when both are done (each bounded by its own deadline).
fn end_everything(reason: &str, announce: bool) {
    let stop: Vec<_> =
        STOP.lock().unwrap_or_else(|p| p.into_inner()).drain(..).filter_map(|weak| weak.upgrade()).collect();
    if stop.is_empty() && !crate::observe::active() {
        return;
    }
    if announce {
        // Not eprintln!, which panics when stderr is gone (a closed terminal, a dead pipe).
        let _ = writeln!(
            std::io::stderr(),
            "prefect: {reason}; ending the live runs and what runners started (again to exit at once)"
        );
    }
    let stopping = std::thread::Builder::new()
        .name("prefect-stop-runners".into())
        .spawn(move || stop.iter().for_each(|what| what.stop_on_interrupt()));
    crate::observe::interrupted(reason);
    if let Ok(stopping) = stopping {
        let _ = stopping.join();
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
