//! Logging through `tracing`, attributed to flow runs and task runs, Prefect-style:
//!
//! ```text
//! 19:20:01.123 | INFO    | Task run 'shout-3f2' - Finished in state Completed()
//! ```
//!
//! Every flow run and task run has a span (`flow_run` / `task_run`, with fields `name` and
//! `id`); events inside are attributed to the innermost one. When the program has installed
//! no subscriber, the first flow run installs a readable one on stderr, filtered by `RUST_LOG`
//! or `PREFECT_LOGGING_LEVEL` (default `info`). A program with its own subscriber adds
//! [`layer`] to it, and [`PrefectFormat`] if it likes the format.

use std::fmt::{self, Write as _};
use std::sync::Once;

use chrono::{DateTime, Utc};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use uuid::Uuid;

use crate::observe::{self, LogRecord};

/// The writer of the default subscriber: stderr, above the live progress lines (see
/// `PREFECT_PROGRESS`). A program with its own `fmt` layer passes it to `with_writer`.
pub use crate::progress::{ConsoleLine, ConsoleWriter};

/// Which run a span stands for.
#[derive(Clone, Debug)]
struct RunLabel {
    is_task: bool,
    name: String,
    id: Option<Uuid>,
}

impl RunLabel {
    fn subject(&self) -> String {
        let kind = if self.is_task { "Task run" } else { "Flow run" };
        format!("{kind} '{}'", self.name)
    }
}

#[derive(Default)]
struct LabelVisitor {
    name: Option<String>,
    id: Option<Uuid>,
}

impl Visit for LabelVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let text = text.trim_matches('"').to_owned();
        match field.name() {
            "name" => self.name = Some(text),
            "id" => self.id = text.parse().ok(),
            _ => {}
        }
    }
}

/// The field that carries the time a replayed event was first written (RFC 3339), for
/// output that a task wrote on another machine.
pub const TIMESTAMP_FIELD: &str = "log.timestamp";

/// The message of an event, with its other fields appended as `key=value`.
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
    timestamp: Option<DateTime<Utc>>,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            TIMESTAMP_FIELD => self.timestamp = DateTime::parse_from_rfc3339(value).ok().map(|t| t.with_timezone(&Utc)),
            // An artifact's JSON is for the server; the message names the artifact.
            crate::artifacts::ARTIFACT_FIELD => {}
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            TIMESTAMP_FIELD => self.record_str(field, format!("{value:?}").trim_matches('"')),
            crate::artifacts::ARTIFACT_FIELD => {}
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

impl MessageVisitor {
    fn of(event: &Event<'_>) -> Self {
        let mut visitor = Self::default();
        event.record(&mut visitor);
        visitor
    }

    fn text(self) -> String {
        self.message + &self.fields
    }
}

/// An event's message with its fields, as the console shows it.
pub fn event_message(event: &Event<'_>) -> String {
    MessageVisitor::of(event).text()
}

/// Remembers which spans stand for runs, and hands log lines inside runs to the run
/// observers (how logs reach a Prefect server).
struct RunLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RunLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let name = attrs.metadata().name();
        if name != "task_run" && name != "flow_run" {
            return;
        }
        let mut visitor = LabelVisitor::default();
        attrs.record(&mut visitor);
        if let (Some(span), Some(run_name)) = (ctx.span(id), visitor.name) {
            span.extensions_mut().insert(RunLabel { is_task: name == "task_run", name: run_name, id: visitor.id });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if !observe::active() {
            return;
        }
        let (mut task_run_id, mut flow_run_id) = (None, None);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(label) = span.extensions().get::<RunLabel>() {
                    match label.is_task {
                        true if task_run_id.is_none() && flow_run_id.is_none() => task_run_id = label.id,
                        false if flow_run_id.is_none() => flow_run_id = label.id,
                        _ => {}
                    }
                }
            }
        }
        if task_run_id.is_none() && flow_run_id.is_none() {
            return;
        }
        if let Some(artifact) = crate::artifacts::artifact_of(event) {
            observe::artifact(task_run_id, flow_run_id, &artifact);
        }
        if event.metadata().target() == PROGRESS_TARGET {
            if let (Some(run), Some(fraction)) = (task_run_id, progress_of(event)) {
                observe::task_run_progress(run, fraction);
            }
            return;
        }
        let visitor = MessageVisitor::of(event);
        let timestamp = visitor.timestamp.unwrap_or_else(Utc::now);
        observe::log(&LogRecord {
            logger: event.metadata().target().replace("::", "."),
            level: *event.metadata().level(),
            message: visitor.text(),
            timestamp,
            flow_run_id,
            task_run_id,
        });
    }
}

/// The layer that attributes events to runs and reports them to observers; add it to your
/// own subscriber.
///
/// # Examples
///
/// ```
/// use tracing_subscriber::prelude::*;
///
/// let subscriber = tracing_subscriber::registry()
///     .with(prefect::logging::layer())
///     .with(tracing_subscriber::fmt::layer().event_format(prefect::logging::PrefectFormat));
/// tracing::subscriber::with_default(subscriber, || {
///     tracing::info!("attributed to the enclosing run, if any");
/// });
/// ```
pub fn layer<S: Subscriber + for<'a> LookupSpan<'a>>() -> impl Layer<S> {
    RunLayer
}

/// Prefect's console format: `HH:MM:SS.mmm | LEVEL   | Task run 'name' - message`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrefectFormat;

impl<S, N> FormatEvent<S, N> for PrefectFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let subject = ctx
            .event_scope()
            .and_then(|scope| {
                scope.into_iter().find_map(|span| span.extensions().get::<RunLabel>().map(RunLabel::subject))
            })
            .unwrap_or_else(|| event.metadata().target().replace("::", "."));
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        let visitor = MessageVisitor::of(event);
        let time = visitor.timestamp.map_or_else(chrono::Local::now, |t| t.with_timezone(&chrono::Local));
        writeln!(writer, "{} | {level:<7} | {subject} - {}", time.format("%H:%M:%S%.3f"), visitor.text())
    }
}

/// The target of the events [`crate::progress`] emits: progress, not log lines.
pub const PROGRESS_TARGET: &str = "prefect::progress";

/// The fraction a [`crate::progress`] event carries, if `event` is one: for a runner whose
/// executor records events itself.
pub fn progress_of(event: &Event<'_>) -> Option<f64> {
    if event.metadata().target() != PROGRESS_TARGET {
        return None;
    }
    struct Progress(Option<f64>);
    impl Visit for Progress {
        fn record_f64(&mut self, field: &Field, value: f64) {
            if field.name() == "progress" {
                self.0 = Some(value);
            }
        }
        fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
    }
    let mut progress = Progress(None);
    event.record(&mut progress);
    progress.0
}

/// Installs the readable default subscriber, unless the program has installed one.
/// Called by the engine before the first flow run; calling it again does nothing.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if tracing::dispatcher::has_been_set() {
            return;
        }
        let directives = std::env::var("RUST_LOG")
            .or_else(|_| {
                std::env::var("PREFECT_LOGGING_LEVEL").map(|level| level.to_lowercase().replace("warning", "warn"))
            })
            .unwrap_or_else(|_| "info".to_owned());
        let filter: tracing_subscriber::filter::Targets =
            directives.parse().unwrap_or_else(|_| tracing_subscriber::filter::Targets::new().with_default(Level::INFO));
        let spans_and_info =
            tracing_subscriber::filter::filter_fn(|meta| meta.is_span() || *meta.level() <= Level::INFO);
        // Progress shows in the progress line and on the server, not as log lines.
        let not_progress = tracing_subscriber::filter::filter_fn(|meta| meta.target() != PROGRESS_TARGET);
        let subscriber = tracing_subscriber::registry().with(RunLayer.with_filter(spans_and_info)).with(
            tracing_subscriber::fmt::layer()
                .event_format(PrefectFormat)
                .with_writer(crate::progress::ConsoleWriter)
                .with_filter(filter)
                .with_filter(not_progress),
        );
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}
