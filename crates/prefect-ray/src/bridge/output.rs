//! What the bridge says besides its replies: its log records (`log` replies), its stderr,
//! and, when it dies, what names the cause.
//!
//! The level of a record is the one Python gave it; nothing here guesses a level or a
//! cause from the text of a line.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::ChildStderr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::protocol::{Died, LogLevel, LogRecord};

/// How many lines of stderr are kept for an error message.
const STDERR_LINES: usize = 50;

/// What the bridge said that may explain its end; shared by the reader of its replies and
/// the reader of its stderr.
#[derive(Clone, Default)]
pub(super) struct Output {
    said: Arc<Mutex<Said>>,
}

#[derive(Default)]
struct Said {
    /// The `died` message: the cause, as the bridge itself named it.
    died: Option<String>,
    /// The last `warning` or `error` record.
    problem: Option<String>,
    /// The last lines of stderr (what bypassed logging).
    stderr: VecDeque<String>,
}

impl Output {
    fn said(&self) -> MutexGuard<'_, Said> {
        self.said.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs a record of the bridge's Python at its own level, and keeps a problem's first
    /// line for an error message.
    pub(super) fn log(&self, record: LogRecord) {
        let LogRecord { level, message, .. } = record;
        match level {
            LogLevel::Debug => tracing::debug!(target: "prefect_ray::ray", "{message}"),
            LogLevel::Info => tracing::info!(target: "prefect_ray::ray", "{message}"),
            LogLevel::Warning => tracing::warn!(target: "prefect_ray::ray", "{message}"),
            LogLevel::Error => tracing::error!(target: "prefect_ray::ray", "{message}"),
        }
        if matches!(level, LogLevel::Warning | LogLevel::Error) {
            self.said().problem = first_line(&message);
        }
    }

    /// Keeps the cause the bridge named before it exits; its traceback goes to the debug log.
    pub(super) fn died(&self, died: Died) {
        let Died { message, details } = died;
        tracing::debug!(target: "prefect_ray::ray", "the Ray bridge stopped: {message}\n{details}");
        self.said().died = Some(message);
    }

    /// The best account of why the bridge stopped: the cause it named, else its last
    /// warning or error, else the last line of its stderr.
    pub(super) fn cause(&self) -> Option<String> {
        let said = self.said();
        said.died
            .clone()
            .or_else(|| said.problem.clone())
            .or_else(|| said.stderr.iter().rev().find(|line| !line.trim().is_empty()).cloned())
    }

    /// Starts a thread that logs the bridge's stderr at DEBUG (what reaches it bypassed
    /// Python's logging, so its level is unknown) and keeps the last lines.
    pub(super) fn forward_stderr(&self, stderr: ChildStderr) -> JoinHandle<()> {
        let output = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                tracing::debug!(target: "prefect_ray::ray", "{line}");
                let mut said = output.said();
                said.stderr.push_back(line);
                if said.stderr.len() > STDERR_LINES {
                    said.stderr.pop_front();
                }
            }
        })
    }
}

fn first_line(message: &str) -> Option<String> {
    message.lines().map(str::trim).find(|line| !line.is_empty()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(level: LogLevel, message: &str) -> LogRecord {
        LogRecord { level, target: "ray".into(), message: message.into() }
    }

    #[test]
    fn the_cause_the_bridge_named_comes_first_then_its_last_problem() {
        let output = Output::default();
        assert_eq!(output.cause(), None);
        output.said().stderr.push_back("a line of Ray's core".into());
        assert_eq!(output.cause().as_deref(), Some("a line of Ray's core"));
        output.log(record(LogLevel::Info, "Started a local Ray instance."));
        assert_eq!(output.cause().as_deref(), Some("a line of Ray's core"), "info is no problem");
        output.log(record(LogLevel::Error, "command Submit failed\nTraceback ..."));
        assert_eq!(output.cause().as_deref(), Some("command Submit failed"));
        output.died(Died { message: "BufferFull: too large".into(), details: "Traceback ...".into() });
        assert_eq!(output.cause().as_deref(), Some("BufferFull: too large"));
    }
}
