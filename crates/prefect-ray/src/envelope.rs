//! What travels with a task run through Ray: the call's header (driver to executor), and
//! the run's report and value (executor back to the driver and to dependent runs).
//!
//! Reports and values start with one byte that says whether the run completed, so a
//! dependent run (or the trampoline) can tell without decoding the rest.

use chrono::{DateTime, Utc};
use prefect::args::Arg;
use prefect::{State, TaskOptions};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The first byte of a report or value of a completed run.
pub const COMPLETED: u8 = 0;
/// The first byte of a report or value of a run that did not complete.
pub const NOT_COMPLETED: u8 = 1;

/// Everything an executor needs to run one task run.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallHeader {
    /// The task's registered key.
    pub task_key: String,
    /// The fingerprint of the task's code in the driver's binary.
    pub fingerprint: String,
    /// The task run's id.
    pub run_id: Uuid,
    /// The task run's name.
    pub run_name: String,
    /// One argument per parameter; `Arg::Upstream(i)` is the value of dependency `i`.
    pub args: Vec<Arg>,
    /// Retries, timeout, tags.
    pub options: TaskOptions,
    /// The names of the upstream runs whose values follow the header, in order.
    pub upstreams: Vec<String>,
    /// The names of the runs waited for, whose reports follow the values.
    pub wait_for: Vec<String>,
}

/// Where a line of a task's output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// The task wrote it to stdout (`println!`).
    Stdout,
    /// The task wrote it to stderr (`eprintln!`).
    Stderr,
    /// A `tracing` event at this level: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    Log(u8),
}

/// One line of a task's output, with the time it was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    /// When the task wrote it, on the worker's clock.
    pub time: DateTime<Utc>,
    /// Where it came from.
    pub stream: Stream,
    /// The text, without its newline.
    pub text: String,
}

/// How a run went on the worker: every state it entered, and what it printed and logged.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RunReport {
    /// The states after `Pending`, in order; the last is final.
    pub states: Vec<State>,
    /// Output and log lines, in order.
    pub output: Vec<OutputLine>,
    /// Lines dropped because the run's output was over the limit.
    pub dropped_lines: u64,
    /// The executor's process id.
    pub pid: u32,
}

/// Encodes a report behind its completion byte.
pub fn encode_report(report: &RunReport) -> Vec<u8> {
    let completed = report.states.last().is_some_and(State::is_completed);
    let mut bytes = vec![if completed { COMPLETED } else { NOT_COMPLETED }];
    rmp_serde::encode::write_named(&mut bytes, report).expect("a report always serializes");
    bytes
}

/// Decodes a report written by [`encode_report`].
pub fn decode_report(bytes: &[u8]) -> Result<RunReport, String> {
    let body = bytes.get(1..).ok_or("an empty report")?;
    rmp_serde::from_slice(body).map_err(|error| format!("an unreadable report: {error}"))
}

/// A value blob: the completion byte, then the MessagePack value or the reason there is none.
pub fn encode_value(value: Result<&[u8], &str>) -> Vec<u8> {
    let (tag, body) = match value {
        Ok(bytes) => (COMPLETED, bytes),
        Err(reason) => (NOT_COMPLETED, reason.as_bytes()),
    };
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.push(tag);
    bytes.extend_from_slice(body);
    bytes
}

/// The value in a blob, or the reason the run has none.
pub fn decode_value(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.split_first() {
        Some((&COMPLETED, body)) => Ok(body),
        Some((_, reason)) => Err(String::from_utf8_lossy(reason).into_owned()),
        None => Err("an empty value".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_tells_completion() {
        let completed = RunReport { states: vec![State::running(), State::completed()], ..Default::default() };
        let failed = RunReport { states: vec![State::running(), State::failed("x")], ..Default::default() };
        assert_eq!(encode_report(&completed)[0], COMPLETED);
        assert_eq!(encode_report(&failed)[0], NOT_COMPLETED);
        let back = decode_report(&encode_report(&failed)).unwrap();
        assert_eq!(back.states[1].message.as_deref(), Some("x"));
        assert_eq!(decode_value(&encode_value(Ok(b"abc"))).unwrap(), b"abc");
        assert_eq!(decode_value(&encode_value(Err("Failed('x')"))).unwrap_err(), "Failed('x')");
    }
}
