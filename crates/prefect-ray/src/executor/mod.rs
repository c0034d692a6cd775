//! Executor mode: this program, started by a Ray worker to run its tasks.
//!
//! The worker's trampoline starts the user's own binary with `PREFECT_RAY_EXECUTOR` set to
//! the numbers of two pipe descriptors. A constructor sees the variable before `main` runs,
//! serves task runs over those pipes until the worker closes them, and exits; `main` never
//! runs. The task's stdout and stderr are captured per run (and copied to the worker's log),
//! `tracing` events are recorded, and both travel back with the run's states.
//!
//! - [`call`]: running the runs of one call, and writing the reply;
//! - [`capture`]: what a task writes, per run.

mod call;
mod capture;

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};

use prefect::runner;
use tracing_subscriber::layer::SubscriberExt;

use crate::protocol::frame::read_parts;
use crate::protocol::{EXECUTOR_ENV, RESTART};
use capture::{Output, RecordEvents};

#[ctor::ctor(unsafe)]
fn enter_executor_mode() {
    let Some(fds) = std::env::var_os(EXECUTOR_ENV) else { return };
    // SAFETY: constructors run before main, on the only thread there is.
    unsafe { std::env::remove_var(EXECUTOR_ENV) };
    let parsed: Option<(RawFd, RawFd)> = fds.to_str().and_then(|text| {
        let (commands, replies) = text.split_once(',')?;
        Some((commands.parse().ok()?, replies.parse().ok()?))
    });
    let Some((commands, replies)) = parsed else {
        eprintln!("prefect-ray executor: {EXECUTOR_ENV} must be two descriptors, like 3,4; got {fds:?}");
        std::process::exit(2);
    };
    die_with_worker();
    serve(commands, replies);
}

/// An executor goes when its worker goes (killed for memory, with its node), mid-task or
/// not: it would otherwise run on, holding what its task holds, with nobody to answer.
fn die_with_worker() {
    let worker = std::os::unix::process::parent_id();
    // SAFETY: prctl(2) with PR_SET_PDEATHSIG touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if std::os::unix::process::parent_id() != worker {
        // The worker died before the request took effect.
        std::process::exit(1);
    }
}

/// Serves task runs until the worker closes the command pipe.
fn serve(commands: RawFd, replies: RawFd) -> ! {
    // SAFETY: the trampoline passed these descriptors for this purpose; nothing else owns them.
    let (commands, replies) = unsafe { (File::from_raw_fd(commands), File::from_raw_fd(replies)) };
    let (mut commands, mut replies) =
        (std::io::BufReader::with_capacity(1 << 16, commands), std::io::BufWriter::with_capacity(1 << 16, replies));
    let output = Output::capture();
    let subscriber = tracing_subscriber::registry().with(RecordEvents(output.clone()));
    let _ = tracing::subscriber::set_global_default(subscriber);
    loop {
        let parts = match read_parts(&mut commands) {
            Ok(Some(parts)) => parts,
            Ok(None) => std::process::exit(0),
            Err(error) => {
                eprintln!("prefect-ray executor: the command pipe broke: {error}");
                crate::shared_memory::remove_own_files();
                std::process::exit(1);
            }
        };
        let (batch, outcomes, inputs) = call::run_call(parts, &output);
        let restart = runner::abandoned_attempts_running();
        let control: &[u8] = if restart { RESTART } else { b"" };
        if let Err(error) = call::reply(&mut replies, batch, &outcomes, control) {
            eprintln!("prefect-ray executor: the reply pipe broke: {error}");
            crate::shared_memory::remove_own_files();
            std::process::exit(1);
        }
        // Unmapping a large input frees its shared memory, which takes a while: after the reply.
        drop(inputs);
        if restart {
            std::process::exit(0);
        }
    }
}
