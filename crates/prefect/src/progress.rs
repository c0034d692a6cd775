//! A live progress line per flow run on an interactive terminal:
//!
//! ```text
//! ⠙ count_to: 73/100 runs · 2 running (40%) · 1 failed · 12s
//! ```
//!
//! Drawn with indicatif on stderr when stderr is a terminal and `PREFECT_PROGRESS` is not
//! `off` (or `0`, `false`). Log lines of the default subscriber print above the lines
//! through [`ConsoleWriter`], so they never tear them. Counts come from the engine's
//! observer hooks, so a task on Ray counts as running once it starts on its worker.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use uuid::Uuid;

use crate::observe::{self, FlowRunInfo, RunObserver, TaskRunInfo};
use crate::state::State;

/// The progress lines, if they are on.
fn lines() -> Option<&'static MultiProgress> {
    static LINES: OnceLock<Option<MultiProgress>> = OnceLock::new();
    LINES.get_or_init(|| enabled().then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))).as_ref()
}

/// Whether to draw: stderr is a terminal, and the user did not turn it off.
fn enabled() -> bool {
    let off = std::env::var("PREFECT_PROGRESS")
        .is_ok_and(|value| matches!(value.trim().to_ascii_lowercase().as_str(), "off" | "0" | "false" | "no"));
    !off && std::io::stderr().is_terminal()
}

/// Starts drawing progress lines, if they are on; called with the first flow run.
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some(lines) = lines() {
            observe::add_observer(Arc::new(Progress { lines: lines.clone(), flows: Mutex::default() }));
        }
    });
}

/// Writes log lines to stderr above the progress lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsoleWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ConsoleWriter {
    type Writer = ConsoleLine;

    fn make_writer(&'a self) -> Self::Writer {
        ConsoleLine(Vec::new())
    }
}

/// One formatted log line, written whole when dropped.
#[derive(Debug)]
pub struct ConsoleLine(Vec<u8>);

impl Write for ConsoleLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleLine {
    fn drop(&mut self) {
        let write = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match lines() {
            Some(lines) => lines.suspend(write),
            None => write(),
        }
    }
}

/// The counts of one top-level flow run, and its line.
struct FlowProgress {
    name: String,
    bar: ProgressBar,
    total: u64,
    done: u64,
    running: u64,
    failed: u64,
    /// The task runs of the flow run (and its subflows) that are running, with how far
    /// they said they are.
    running_runs: HashMap<Uuid, Option<f64>>,
}

impl FlowProgress {
    fn redraw(&self) {
        let failed = if self.failed > 0 { format!(" · {} failed", self.failed) } else { String::new() };
        let said: Vec<f64> = self.running_runs.values().flatten().copied().collect();
        let along = match said.len() {
            0 => String::new(),
            count => format!(" ({:.0}%)", said.iter().sum::<f64>() / count as f64 * 100.0),
        };
        self.bar.set_message(format!(
            "{}: {}/{} runs · {} running{along}{failed}",
            self.name, self.done, self.total, self.running
        ));
    }
}

/// Keeps the progress lines of the flow runs in progress.
struct Progress {
    lines: MultiProgress,
    /// By flow run id; subflows count towards their top-level flow run.
    flows: Mutex<HashMap<Uuid, Arc<Mutex<FlowProgress>>>>,
}

impl Progress {
    fn flow_of(&self, flow_run: Option<Uuid>) -> Option<Arc<Mutex<FlowProgress>>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner()).get(&flow_run?).cloned()
    }
}

impl RunObserver for Progress {
    fn flow_run_created(&self, info: &FlowRunInfo) {
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let progress = match info.parent.as_ref().and_then(|parent| flows.get(&parent.flow_run_id)) {
            Some(parent) => parent.clone(),
            None => {
                let bar = self.lines.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} · {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
                let progress = FlowProgress {
                    name: info.flow_name.clone(),
                    bar,
                    total: 0,
                    done: 0,
                    running: 0,
                    failed: 0,
                    running_runs: HashMap::new(),
                };
                progress.redraw();
                Arc::new(Mutex::new(progress))
            }
        };
        flows.insert(info.id, progress);
    }

    fn task_run_created(&self, info: &TaskRunInfo, state: &State) {
        if let Some(flow) = self.flow_of(info.flow_run_id) {
            let mut flow = flow.lock().unwrap_or_else(|p| p.into_inner());
            flow.total += 1;
            drop(flow);
            self.task_run_state(info, state);
        }
    }

    fn task_run_state(&self, info: &TaskRunInfo, state: &State) {
        let Some(flow) = self.flow_of(info.flow_run_id) else { return };
        let mut flow = flow.lock().unwrap_or_else(|p| p.into_inner());
        let was_running = flow.running_runs.contains_key(&info.id);
        if state.is_running() && !was_running {
            flow.running_runs.insert(info.id, None);
            flow.running += 1;
        } else if !state.is_running() && was_running {
            flow.running_runs.remove(&info.id);
            flow.running -= 1;
        }
        if state.is_final() {
            flow.done += 1;
            if !state.is_completed() {
                flow.failed += 1;
            }
        }
        flow.redraw();
    }

    fn task_run_progress(&self, task_run_id: Uuid, fraction: f64) {
        let flows: Vec<_> = self.flows.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for flow in flows {
            let mut flow = flow.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(said) = flow.running_runs.get_mut(&task_run_id) {
                *said = Some(fraction);
                flow.redraw();
                return;
            }
        }
    }

    fn flow_run_finished(&self, info: &FlowRunInfo) {
        let removed = self.flows.lock().unwrap_or_else(|p| p.into_inner()).remove(&info.id);
        if let Some(flow) = removed.filter(|_| info.parent.is_none()) {
            let flow = flow.lock().unwrap_or_else(|p| p.into_inner());
            flow.redraw();
            // The last count stays on the terminal, above what comes next.
            flow.bar.finish();
        }
    }
}
