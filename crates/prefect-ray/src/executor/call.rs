//! Running the runs of one call from a trampoline, and writing the reply.

use std::io::Write;

use prefect::State;
use prefect::runner::{self, LookupError, assemble, not_ready};

use super::capture::Output;
use crate::protocol::envelope::{self, CallHeader, OutputLine, RunReport, Stream};
use crate::protocol::frame::write_parts;
use crate::protocol::{COMPLETED, MANY_RUNS, NOT_COMPLETED, ONE_RUN};
use crate::shared_memory::{Blob, in_shared_file};

/// A run's report, and its value as the completion byte and the MessagePack value (or, for
/// a run that did not complete, the text of its final state).
pub(super) type Outcome = (RunReport, (u8, Vec<u8>));

/// Runs the runs of one call, one after the other; returns whether it was a call of many,
/// the outcomes, and the call's inputs (for the caller to drop once it has replied).
pub(super) fn run_call(mut parts: Vec<Vec<u8>>, output: &Output) -> (bool, Vec<Outcome>, Vec<Blob>) {
    let crashed = |message: String| {
        (RunReport { states: vec![State::crashed(message)], ..Default::default() }, (NOT_COMPLETED, Vec::new()))
    };
    if parts.is_empty() {
        return (false, vec![crashed("the worker sent an empty call".into())], Vec::new());
    }
    let call = match Blob::open(parts.remove(0)) {
        Ok(call) => call,
        Err(error) => {
            return (false, vec![crashed(format!("could not read the call from shared memory: {error}"))], Vec::new());
        }
    };
    let dependencies = match parts.into_iter().map(Blob::open).collect::<std::io::Result<Vec<_>>>() {
        Ok(dependencies) => dependencies,
        Err(error) => {
            let message = format!("could not read an upstream value from shared memory: {error}");
            return (false, vec![crashed(message)], Vec::new());
        }
    };
    let mut inputs = dependencies.iter();
    let (batch, outcomes) = match call.split_first() {
        Some((&ONE_RUN, header)) => (false, vec![run(header, &mut inputs, output)]),
        Some((&MANY_RUNS, headers)) => match rmp_serde::from_slice::<Vec<serde_bytes::ByteBuf>>(headers) {
            Ok(headers) => (true, headers.iter().map(|header| run(header, &mut inputs, output)).collect()),
            Err(error) => (true, vec![crashed(format!("the worker sent calls this executor cannot read: {error}"))]),
        },
        _ => (false, vec![crashed("the worker sent a call of an unknown kind".into())]),
    };
    (batch, outcomes, dependencies)
}

/// Writes the reply to a call: the report (for many runs, an array of reports), each run's
/// value (a large one through a shared-memory file), and the control word.
pub(super) fn reply(out: &mut impl Write, batch: bool, outcomes: &[Outcome], control: &[u8]) -> std::io::Result<()> {
    let reports: Vec<Vec<u8>> =
        outcomes.iter().map(|(report, (tag, body))| envelope::encode_report(report, &[&[*tag], body])).collect();
    let head = if batch {
        let blobs: Vec<serde_bytes::ByteBuf> = reports.into_iter().map(serde_bytes::ByteBuf::from).collect();
        rmp_serde::to_vec(&blobs).map_err(std::io::Error::other)?
    } else {
        reports.into_iter().next().unwrap_or_default()
    };
    let tags: Vec<[u8; 1]> = outcomes.iter().map(|(_, (tag, _))| [*tag]).collect();
    let files: Vec<Option<Vec<u8>>> = outcomes.iter().map(|(_, (tag, body))| in_shared_file(*tag, body)).collect();
    let mut parts: Vec<Vec<&[u8]>> = vec![vec![head.as_slice()]];
    for (((_, (_, body)), tag), file) in outcomes.iter().zip(&tags).zip(&files) {
        parts.push(match file {
            Some(reference) => vec![reference.as_slice()],
            None => vec![tag.as_slice(), body.as_slice()],
        });
    }
    parts.push(vec![control]);
    let parts: Vec<&[&[u8]]> = parts.iter().map(Vec::as_slice).collect();
    write_parts(out, &parts)
}

/// Runs one task run, taking its dependencies from `dependencies`.
fn run<'a>(header: &[u8], dependencies: &mut impl Iterator<Item = &'a Blob>, output: &Output) -> Outcome {
    let mut states = Vec::new();
    let value = execute(header, dependencies, &mut states, output);
    let (mut lines, dropped_lines) = output.end();
    // A run that did not complete says where Ray keeps its worker's log.
    if states.last().is_some_and(|state| !state.is_completed())
        && let Some(log) = output.worker_log()
    {
        let text = format!("Ray's log of this run's worker: {}", log.display());
        lines.push(OutputLine { time: chrono::Utc::now(), stream: Stream::Log(2), text });
    }
    let report = RunReport { states, output: lines, dropped_lines, pid: std::process::id() };
    let value = match (value, report.states.last()) {
        (Some(bytes), Some(last)) if last.is_completed() => (COMPLETED, bytes),
        (_, last) => (NOT_COMPLETED, last.map_or_else(|| "no state".to_owned(), State::to_string).into_bytes()),
    };
    (report, value)
}

fn execute<'a>(
    header: &[u8],
    dependencies: &mut impl Iterator<Item = &'a Blob>,
    states: &mut Vec<State>,
    output: &Output,
) -> Option<Vec<u8>> {
    let header = match rmp_serde::from_slice::<CallHeader<'_>>(header) {
        Ok(header) => {
            output.begin(header.run_id, header.output);
            header
        }
        Err(error) => {
            states.push(State::crashed(format!("the worker sent a call this executor cannot read: {error}")));
            return None;
        }
    };
    // Take this run's dependencies whatever happens, so the next run of a batch gets its own.
    let values: Vec<&Blob> = dependencies.by_ref().take(header.upstreams.len()).collect();
    let reports: Vec<&Blob> = dependencies.by_ref().take(header.wait_for.len()).collect();
    let mut upstream_values = Vec::with_capacity(values.len());
    for (name, blob) in header.upstreams.iter().zip(values) {
        match envelope::decode_value(blob) {
            Ok(value) => upstream_values.push(value),
            Err(state) => {
                states.push(not_ready_from(name, &state));
                return None;
            }
        }
    }
    for (name, blob) in header.wait_for.iter().zip(reports) {
        if blob.first() != Some(&COMPLETED) {
            // A report, or (for a run of a batch) a value blob: either tells the state.
            let state = envelope::decode_report(blob)
                .ok()
                .and_then(|(report, _)| report.states.last().map(State::to_string))
                .or_else(|| envelope::decode_value(blob).err())
                .unwrap_or_else(|| "an unknown state".into());
            states.push(not_ready_from(name, &state));
            return None;
        }
    }
    let exe = || std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
    let task = match runner::lookup(&header.task_key) {
        Ok(task) => task,
        Err(LookupError::Missing(key)) => {
            states.push(State::failed(format!(
                "task '{key}' is not in the executor binary {}: it was built from other code; rebuild, and run the flow again",
                exe()
            )));
            return None;
        }
        Err(error) => {
            states.push(State::failed(format!("the executor binary {}: {error}", exe())));
            return None;
        }
    };
    if task.fingerprint != header.fingerprint {
        states.push(State::failed(format!(
            "the executor binary {} has another version of task '{}' than the flow that submitted it; rebuild, and run the flow again",
            exe(),
            task.name
        )));
        return None;
    }
    let args = assemble(header.args, &upstream_values);
    let span = tracing::info_span!("task_run", name = %header.run_name, id = %header.run_id);
    let execution = runner::execute(task, &args, &header.options, header.results.as_ref(), &span, &mut |state| {
        if state.is_running() {
            output.running(state.timestamp);
        }
        states.push(state);
    });
    states.push(execution.state);
    execution.result
}

/// `NotReady` for an upstream run whose final state is shown as `state`.
fn not_ready_from(upstream: &str, state: &str) -> State {
    let mut ready = not_ready(upstream, &State::failed(""));
    ready.message = Some(format!("Upstream task run '{upstream}' did not reach a 'COMPLETED' state: {state}"));
    ready
}
