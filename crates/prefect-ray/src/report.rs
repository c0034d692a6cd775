//! Turning what came back from Ray into the task run's states, logs and value.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};

use prefect::State;
use prefect::logging::TIMESTAMP_FIELD;
use prefect::runner::{ResultData, TaskRun, TaskRunWriter, not_ready};

use crate::protocol::envelope::{self, OutputLine, Stream};
use crate::protocol::{FailureKind, LiveLine};

/// A run submitted to Ray and not finished yet: its write handle, and the runs it depends
/// on (whose states decide how it ends when Ray fails it).
pub(crate) struct PendingRun {
    pub(crate) run: TaskRunWriter,
    pub(crate) dependencies: Vec<TaskRun>,
    /// Why the run was cancelled, once it was: however Ray then ends it (a worker killed
    /// by `ray.cancel` can look like a crash), it ends `Cancelled` unless it completed.
    pub(crate) cancelled: Option<String>,
    /// What of the run was shown live, while it ran: its report skips that.
    pub(crate) live: Option<Box<Shown>>,
}

/// What of a run was shown while it ran.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shown {
    /// The lines shown: the executor's process id and the line's index.
    lines: HashSet<(u32, u64)>,
    /// When it started, in microseconds, if that was shown.
    running: Option<i64>,
}

/// Runs that ended without completing, kept a while: a run whose executor died has no
/// report, and what it wrote just before may come after its end.
#[derive(Default)]
pub(crate) struct Recent(std::collections::VecDeque<Ended>);

/// A run that ended without completing, as far as its late lines go: its read-only view
/// (id and span) and what of it was shown.
pub(crate) struct Ended {
    run: TaskRun,
    shown: Shown,
}

impl Ended {
    /// What a late line of `pending` needs, taken before the run ends.
    pub(crate) fn of(pending: &PendingRun) -> Self {
        Self { run: pending.run.run().clone(), shown: pending.live.as_deref().cloned().unwrap_or_default() }
    }

    /// Whether the run completed (its lines were all in its report).
    pub(crate) fn completed(&self) -> bool {
        self.run.state().is_completed()
    }
}

impl Recent {
    /// How many ended runs are kept.
    const KEPT: usize = 256;

    /// Keeps `ended`, dropping the oldest kept beyond [`Self::KEPT`].
    pub(crate) fn keep(&mut self, ended: Ended) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(ended);
    }

    /// Shows a late line of a run kept here; returns whether the run was.
    pub(crate) fn show(&mut self, run: uuid::Uuid, line: &LiveLine) -> bool {
        let Some(ended) = self.0.iter_mut().find(|ended| ended.run.id() == run) else { return false };
        let (Some(seq), Some(output)) = (line.seq, output_line(line)) else { return true };
        if ended.shown.lines.insert((line.pid, seq)) {
            let span = ended.run.span();
            let _entered = span.enter();
            replay(&output);
        }
        true
    }
}

/// A live line as an output line; `None` for a start, or a stream this side does not know.
fn output_line(line: &LiveLine) -> Option<OutputLine> {
    let time = DateTime::<Utc>::from_timestamp_micros(line.micros)?;
    let stream = match line.stream.as_bytes() {
        b"o" => Stream::Stdout,
        b"e" => Stream::Stderr,
        [level @ b'1'..=b'9'] => Stream::Log(level - b'0'),
        b"a" => Stream::Artifact,
        _ => return None,
    };
    Some(OutputLine { time, stream, text: line.text.clone() })
}

/// Shows a line of a run still running under its name, at the time it was written, or
/// moves the run to `Running` at the time it started on its worker.
pub(crate) fn live(pending: &mut PendingRun, line: LiveLine) {
    let Some(time) = DateTime::<Utc>::from_timestamp_micros(line.micros) else { return };
    let shown = pending.live.get_or_insert_with(Box::default);
    match line.seq {
        None if line.stream == "p" => {
            if let Ok(fraction) = line.text.trim().parse::<f64>() {
                let span = pending.run.span();
                let _entered = span.enter();
                prefect::progress(fraction);
            }
        }
        None => {
            if shown.running.is_none() {
                shown.running = Some(line.micros);
                pending.run.set_state(State { timestamp: time, ..State::running() });
            }
        }
        Some(seq) => {
            let Some(output) = output_line(&line) else { return };
            if shown.lines.insert((line.pid, seq)) {
                let span = pending.run.span();
                let _entered = span.enter();
                replay(&output);
            }
        }
    }
}

/// Applies a run's report: replays its output under the run's name, then its states.
pub(crate) fn apply(pending: PendingRun, report: &[u8], value: Option<ResultData>) {
    let run = pending.run;
    let shown = pending.live.unwrap_or_default();
    let pending = Cancelled { cancelled: pending.cancelled };
    let (report, inline_value) = match envelope::decode_report(report) {
        Ok(decoded) => decoded,
        Err(error) => {
            run.crash(format!("the executor sent {error}"));
            return;
        }
    };
    // A small value came with the report: `.result()` needs no trip to Ray for it.
    let value = match inline_value.map(envelope::decode_value) {
        Some(Ok(bytes)) => {
            // Dropped now, not when this function returns: the run's Ray objects are let go
            // below, before the run ends, so whoever sees it ended sees them released.
            drop(value);
            Some(ResultData::Inline(Arc::new(bytes.to_vec())))
        }
        _ => value,
    };
    {
        let span = run.span();
        let _entered = span.enter();
        let pid = report.pid;
        let unseen = report.output.iter().enumerate().filter(|(seq, _)| !shown.lines.contains(&(pid, *seq as u64)));
        unseen.for_each(|(_, line)| replay(line));
        if report.dropped_lines > 0 {
            tracing::warn!(
                target: "prefect::task_runs",
                "{} more line(s) of output were dropped: a run keeps at most {} lines (PREFECT_LOGGING_MAX_LINES_PER_RUN)",
                report.dropped_lines,
                report.output.len()
            );
        }
    }
    let mut states = report.states;
    let Some(mut last) = states.pop() else {
        run.crash("the executor reported no state");
        return;
    };
    if let Some(reason) = pending.cancelled.filter(|_| !last.is_completed()) {
        last = State::cancelled(reason);
    }
    for state in states {
        // The start shown live is not entered twice.
        if state.is_running() && shown.running == Some(state.timestamp.timestamp_micros()) {
            continue;
        }
        run.set_state(state);
    }
    let value = if last.is_completed() { value } else { None };
    if !matches!(value, Some(ResultData::Remote(_))) {
        // Its value came with the report, or it has none: the bridge need not keep the Ray
        // objects (a run that depends on it later gets the value from here), so a map of
        // millions does not keep millions of Ray objects alive in the bridge.
        run.clear_runner_data();
    }
    run.finish(last, value);
}

/// What [`apply`] keeps of a run once its writer is taken out.
struct Cancelled {
    cancelled: Option<String>,
}

/// Emits one line of a task's output as an event of its run, stamped with its first time.
fn replay(line: &OutputLine) {
    let time = line.time.to_rfc3339();
    let text = line.text.as_str();
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(target: "prefect::task_runs", $level, { TIMESTAMP_FIELD } = time.as_str(), "{text}")
        };
    }
    match line.stream {
        Stream::Stdout => emit!(tracing::Level::INFO),
        Stream::Stderr => emit!(tracing::Level::WARN),
        Stream::Log(1) => emit!(tracing::Level::ERROR),
        Stream::Log(2) => emit!(tracing::Level::WARN),
        Stream::Log(3) => emit!(tracing::Level::INFO),
        Stream::Log(4) => emit!(tracing::Level::DEBUG),
        Stream::Log(_) => emit!(tracing::Level::TRACE),
        Stream::Artifact => match serde_json::from_str::<prefect::artifacts::Artifact>(text) {
            Ok(artifact) => prefect::artifacts::emit(&artifact),
            Err(error) => {
                tracing::warn!(target: "prefect::task_runs", "the executor sent an artifact this program cannot read: {error}")
            }
        },
    }
}

/// Ends a run that Ray could not finish. A run whose dependency did not complete ends
/// `NotReady` (Ray fails it with the dependency's error); otherwise `kind` decides.
/// Decided once every dependency has finished, whatever order Ray reports them in.
pub(crate) fn fail(pending: PendingRun, kind: FailureKind, message: String) {
    let unfinished: Vec<TaskRun> = pending.dependencies.iter().filter(|d| !d.is_finished()).cloned().collect();
    if unfinished.is_empty() {
        decide(pending, kind, &message);
        return;
    }
    let waiting = Arc::new(AtomicUsize::new(unfinished.len()));
    let decision = Arc::new(std::sync::Mutex::new(Some((pending, kind, message))));
    for dependency in unfinished {
        let (waiting, decision) = (waiting.clone(), decision.clone());
        dependency.on_finish(move |_| {
            if waiting.fetch_sub(1, Ordering::AcqRel) == 1
                && let Some((pending, kind, message)) = decision.lock().unwrap_or_else(|p| p.into_inner()).take()
            {
                decide(pending, kind, &message);
            }
        });
    }
}

fn decide(pending: PendingRun, kind: FailureKind, message: &str) {
    if let Some(upstream) = pending.dependencies.iter().find(|d| !d.state().is_completed()) {
        pending.run.finish(not_ready(upstream.name(), &upstream.state()), None);
        return;
    }
    if let Some(reason) = pending.cancelled {
        pending.run.finish(State::cancelled(reason), None);
        return;
    }
    let state = match kind {
        FailureKind::Cancelled => State::cancelled(message),
        FailureKind::Failed => State::failed(message),
        FailureKind::Crashed => State::crashed(message),
    };
    pending.run.finish(state, None);
}
