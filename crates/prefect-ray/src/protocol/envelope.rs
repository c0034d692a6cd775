//! What travels with a task run through Ray: the call's header (driver to executor), and
//! the run's report and value (executor back to the driver and to dependent runs).
//!
//! Reports and values start with one byte that says whether the run completed, so a
//! dependent run (or the trampoline) can tell without decoding the rest.

use chrono::{DateTime, Utc};
use prefect::runner::{ArgView, ResultPlan};
use prefect::{State, TaskOptions};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{COMPLETED, INLINE_VALUE_LIMIT, NOT_COMPLETED};

/// Everything an executor needs to run one task run. Its arguments are views: the executor
/// reads them in place from the call it received, so a large argument is not copied before
/// the task decodes it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CallHeader<'a> {
    /// The task's registered key.
    pub(crate) task_key: String,
    /// The fingerprint of the task's code in the driver's binary.
    pub(crate) fingerprint: String,
    /// The task run's id.
    pub(crate) run_id: Uuid,
    /// The task run's name.
    pub(crate) run_name: String,
    /// One argument per parameter; `ArgView::Upstream(i)` is the value of dependency `i`.
    #[serde(borrow)]
    pub(crate) args: Vec<ArgView<'a>>,
    /// Retries, timeout, tags.
    pub(crate) options: TaskOptions,
    /// The names of the upstream runs whose values follow the header, in order.
    pub(crate) upstreams: Vec<String>,
    /// The names of the runs waited for, whose reports follow the values.
    pub(crate) wait_for: Vec<String>,
    /// What of the run's output to keep.
    pub(crate) output: OutputSettings,
    /// How the run's value is persisted and cached, if it is: the executor reads and writes
    /// result storage from the worker.
    pub(crate) results: Option<ResultPlan>,
}

/// What of a run's output the executor keeps (and shows live): the program's settings, so
/// that workers on other machines follow them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OutputSettings {
    /// At most this many lines per run; the rest are counted.
    pub(crate) max_lines: u32,
    /// `tracing` events up to this level: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub(crate) level: u8,
}

impl OutputSettings {
    /// From the program's environment: `PREFECT_LOGGING_LEVEL` (or `RUST_LOG`, a plain
    /// level) for the level, `PREFECT_LOGGING_MAX_LINES_PER_RUN` for the cap (10,000).
    pub(crate) fn from_env() -> Self {
        let directive =
            std::env::var("PREFECT_LOGGING_LEVEL").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_default();
        let level = match directive.trim().to_ascii_lowercase().as_str() {
            "trace" => 5,
            "debug" => 4,
            "warn" | "warning" => 2,
            "error" | "critical" => 1,
            _ => 3,
        };
        let max_lines = std::env::var("PREFECT_LOGGING_MAX_LINES_PER_RUN")
            .ok()
            .and_then(|lines| lines.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_LINES);
        Self { max_lines, level }
    }
}

/// How many lines a run keeps unless `PREFECT_LOGGING_MAX_LINES_PER_RUN` says.
pub(crate) const DEFAULT_MAX_LINES: u32 = 10_000;

/// Where a line of a task's output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Stream {
    /// The task wrote it to stdout (`println!`).
    Stdout,
    /// The task wrote it to stderr (`eprintln!`).
    Stderr,
    /// A `tracing` event at this level: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    Log(u8),
    /// An artifact the task published (`prefect::artifacts`), as its JSON: the program
    /// sends it to the server.
    Artifact,
}

/// One line of a task's output, with the time it was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct OutputLine {
    /// When the task wrote it, on the worker's clock.
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub(crate) time: DateTime<Utc>,
    /// Where it came from.
    pub(crate) stream: Stream,
    /// The text, without its newline.
    pub(crate) text: String,
}

/// How a run went on the worker: every state it entered, and what it printed and logged.
/// Encoded compactly (MessagePack arrays, times as microseconds): every run sends one.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RunReport {
    /// The states after `Pending`, in order; the last is final.
    #[serde(with = "compact_states")]
    pub(crate) states: Vec<State>,
    /// Output and log lines, in order.
    pub(crate) output: Vec<OutputLine>,
    /// Lines dropped because the run's output was over the limit.
    pub(crate) dropped_lines: u64,
    /// The executor's process id.
    pub(crate) pid: u32,
}

/// States as `[type, name if not the type's, message, time in µs, scheduled time in µs,
/// persisted result]`.
mod compact_states {
    use std::borrow::Cow;

    use chrono::{DateTime, Utc};
    use prefect::results::PersistedResult;
    use prefect::{State, StateType};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    type Wire = (StateType, Option<Cow<'static, str>>, Option<String>, i64, Option<i64>, Option<Box<PersistedResult>>);

    pub(crate) fn serialize<S: Serializer>(states: &[State], serializer: S) -> Result<S::Ok, S::Error> {
        let wire: Vec<Wire> = states
            .iter()
            .map(|state| {
                let name = (state.name != state.state_type.default_name()).then(|| state.name.clone());
                let scheduled = state.scheduled_time.map(|t| t.timestamp_micros());
                let persisted = state.persisted.clone();
                (
                    state.state_type,
                    name,
                    state.message.clone(),
                    state.timestamp.timestamp_micros(),
                    scheduled,
                    persisted,
                )
            })
            .collect();
        wire.serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<State>, D::Error> {
        let time = |micros: i64| DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
        let wire = Vec::<Wire>::deserialize(deserializer)?;
        Ok(wire
            .into_iter()
            .map(|(state_type, name, message, timestamp, scheduled, persisted)| State {
                state_type,
                name: name.unwrap_or(Cow::Borrowed(state_type.default_name())),
                message,
                timestamp: time(timestamp),
                scheduled_time: scheduled.map(time),
                persisted,
            })
            .collect())
    }
}

/// Encodes a report: its completion byte, then the report, then, for a small value, the
/// value blob (the completion byte, then the value; see [`decode_value`]). The first byte alone tells a dependent run whether
/// the run completed.
pub(crate) fn encode_report(report: &RunReport, value: &[&[u8]]) -> Vec<u8> {
    let completed = report.states.last().is_some_and(State::is_completed);
    let mut bytes = vec![if completed { COMPLETED } else { NOT_COMPLETED }, 0, 0, 0, 0];
    rmp_serde::encode::write(&mut bytes, report).expect("a report always serializes");
    let length = (bytes.len() - 5) as u32;
    bytes[1..5].copy_from_slice(&length.to_le_bytes());
    if value.iter().map(|slice| slice.len()).sum::<usize>() <= INLINE_VALUE_LIMIT {
        value.iter().for_each(|slice| bytes.extend_from_slice(slice));
    }
    bytes
}

/// Decodes a report written by [`encode_report`], with the value blob it carries, if any.
pub(crate) fn decode_report(bytes: &[u8]) -> Result<(RunReport, Option<&[u8]>), String> {
    let length = bytes.get(1..5).ok_or("a report cut short")?;
    let length = u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize;
    let body = bytes.get(5..5 + length).ok_or("a report cut short")?;
    let report = rmp_serde::from_slice(body).map_err(|error| format!("an unreadable report: {error}"))?;
    let value = Some(&bytes[5 + length..]).filter(|value| !value.is_empty());
    Ok((report, value))
}

/// The value in a blob, or the reason the run has none.
pub(crate) fn decode_value(bytes: &[u8]) -> Result<&[u8], String> {
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
        let retry_at = chrono::DateTime::<Utc>::from_timestamp_micros(1_800_000_000_123_456).unwrap();
        let failed = RunReport {
            states: vec![State::running(), State::awaiting_retry(retry_at), State::retrying(), State::failed("x")],
            ..Default::default()
        };
        let blob = |tag: u8, body: &[u8]| [&[tag][..], body].concat();
        let small = blob(COMPLETED, b"abc");
        let large = blob(COMPLETED, &vec![1u8; INLINE_VALUE_LIMIT + 1]);
        assert_eq!(encode_report(&completed, &[&small])[0], COMPLETED);
        assert_eq!(encode_report(&failed, &[&small])[0], NOT_COMPLETED);
        let encoded = encode_report(&failed, &[&small]);
        let (back, value) = decode_report(&encoded).unwrap();
        let to_micros = |states: &[State]| -> Vec<State> {
            let truncate = |t: DateTime<Utc>| DateTime::<Utc>::from_timestamp_micros(t.timestamp_micros()).unwrap();
            states.iter().cloned().map(|s| State { timestamp: truncate(s.timestamp), ..s }).collect()
        };
        assert_eq!(back.states, to_micros(&failed.states), "states survive the compact encoding, to the microsecond");
        assert_eq!(back.states[3].message.as_deref(), Some("x"));
        assert_eq!(value, Some(&small[..]), "a small value travels with its report");
        let encoded = encode_report(&completed, &[&large[..1], &large[1..]]);
        assert_eq!(decode_report(&encoded).unwrap().1, None, "a large one stays in the object store");
        assert_eq!(decode_value(&small).unwrap(), b"abc");
        assert_eq!(decode_value(&blob(NOT_COMPLETED, b"Failed('x')")).unwrap_err(), "Failed('x')");
    }
}
