//! Live output: how an executor marks the lines it copies to its Ray worker's log, so that
//! Ray's own log streaming carries them to the bridge while the task runs, attributed to
//! their task run (see PROTOCOL.md, "Live output").
//!
//! A line of a run: `[prefect-run <run id> <pid> <seq> <microseconds> <stream>] <text>`,
//! where `pid` is the executor's (an attempt that Ray retries runs in another), `seq` the
//! line's index among the attempt's recorded lines (the same index as in its report) and
//! `stream` is `o` (stdout), `e` (stderr), a `tracing` level `1`..`5`, or `a` for an artifact
//! (its JSON, on one line). That a run started:
//! `[prefect-run <run id> <pid> started <microseconds>]`. How far it said it is
//! (`prefect::progress`): `[prefect-run <run id> <pid> progress <microseconds>] <fraction>`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::envelope::Stream;

/// What starts every marked line.
pub(crate) const MARK: &str = "[prefect-run ";

/// A recorded line of run `run`, as copied to the worker's log.
pub(crate) fn line(run: Uuid, seq: usize, time: DateTime<Utc>, stream: Stream, text: &str) -> String {
    let stream = match stream {
        Stream::Stdout => 'o',
        Stream::Stderr => 'e',
        Stream::Log(level) => char::from(b'0' + level.min(9)),
        Stream::Artifact => 'a',
    };
    format!("{MARK}{} {} {seq} {} {stream}] {text}\n", run.simple(), std::process::id(), time.timestamp_micros())
}

/// The line that says run `run` started at `at`.
pub(crate) fn started(run: Uuid, at: DateTime<Utc>) -> String {
    format!("{MARK}{} {} started {}]\n", run.simple(), std::process::id(), at.timestamp_micros())
}

/// The line that says run `run` is `fraction` done.
pub(crate) fn progress(run: Uuid, at: DateTime<Utc>, fraction: f64) -> String {
    format!("{MARK}{} {} progress {}] {fraction}\n", run.simple(), std::process::id(), at.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_name_the_run_the_index_the_time_and_the_stream() {
        let run = Uuid::from_u128(0x1234);
        let at = DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap();
        let pid = std::process::id();
        assert_eq!(
            line(run, 7, at, Stream::Log(3), "hello [world]"),
            format!("[prefect-run 00000000000000000000000000001234 {pid} 7 1800000000123456 3] hello [world]\n")
        );
        assert_eq!(
            progress(run, at, 0.25),
            format!("[prefect-run 00000000000000000000000000001234 {pid} progress 1800000000123456] 0.25\n")
        );
        assert_eq!(
            started(run, at),
            format!("[prefect-run 00000000000000000000000000001234 {pid} started 1800000000123456]\n")
        );
    }
}
