//! The wire protocol between the program, its bridge, the worker trampolines and the
//! executors, as the Rust side speaks it. [PROTOCOL.md](PROTOCOL.md) beside this file tells
//! the whole story; `python/prefect_ray_worker/protocol.py` is the Python side. Every
//! constant and message is defined once here and once there, and the golden fixtures in
//! `fixtures/` (bytes of each message kind) are checked by both languages' tests, so the two
//! sides cannot drift apart without a test failing.
//!
//! The rule for every message between the program and the bridge: a unit message is its
//! name as a string (`"shutdown"`); any other is a map of one entry, its name to the array of
//! its fields in the order declared here. Records inside messages are arrays of fields too.

pub(crate) mod envelope;
pub(crate) mod frame;
#[cfg(test)]
mod golden;
pub(crate) mod live;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::{Map, Value};

/// The variable that puts the program in executor mode: `"<command fd>,<reply fd>"`, the
/// two pipe descriptors the trampoline passes to it.
pub(crate) const EXECUTOR_ENV: &str = "PREFECT_RAY_EXECUTOR";

/// The executor's path, in the bridge's configuration, for a binary shipped inside the
/// worker package (`shipped:<file name>`), rather than an absolute path.
pub(crate) const SHIPPED_PREFIX: &str = "shipped:";

/// The first byte of a call of one run, whose header follows.
pub(crate) const ONE_RUN: u8 = 0;
/// The first byte of a call of several runs (a batch of a map's runs), whose headers follow
/// as an array of byte strings.
pub(crate) const MANY_RUNS: u8 = 1;

/// The first byte of a report or value blob of a run that completed.
pub(crate) const COMPLETED: u8 = 0;
/// The first byte of a report or value blob of a run that did not complete.
pub(crate) const NOT_COMPLETED: u8 = 1;
/// The first byte of a blob between a trampoline and its executor that lives in a
/// shared-memory file instead: the rest is the file's path.
pub(crate) const IN_FILE: u8 = 2;

/// The bridge's exit status when its Python lacks Ray (or MessagePack): it cannot even
/// encode a reply then.
pub(crate) const EXIT_NO_RAY: i32 = 3;

/// The control word an executor ends a reply with when it must be restarted (a timed-out
/// attempt is still running in it); empty otherwise.
pub(crate) const RESTART: &[u8] = b"exit";

/// Values larger than this go between an executor and its trampoline through a
/// shared-memory file rather than the pipe.
pub(crate) const FILE_LIMIT: usize = 1 << 20;

/// Values up to this size also travel inside the run's report, so the program has them
/// without asking Ray.
pub(crate) const INLINE_VALUE_LIMIT: usize = 64 << 10;

/// The largest command the bridge reads (MessagePack's limit for one buffer): a run whose
/// call is larger fails before it is sent.
pub(crate) const MAX_COMMAND: usize = (1 << 31) - 1;

/// The bridge's configuration: the first frame on its stdin, a map with named keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Config {
    /// The cluster's address; `None` starts a temporary local instance.
    pub(crate) address: Option<String>,
    /// Keyword arguments for `ray.init`.
    pub(crate) init_kwargs: Map<String, Value>,
    /// Ray's session directory for a temporary instance.
    pub(crate) temp_dir: String,
    /// The directory of the worker package, shipped to clusters with `py_modules`.
    pub(crate) worker_package: String,
    /// The directory the bridge removes when it exits, whoever ends it.
    pub(crate) own_dir: String,
    /// The executor: an absolute path, or [`SHIPPED_PREFIX`] and a file name.
    pub(crate) executor: String,
    /// At most this many runs in one Ray task when the bridge joins submissions that pile
    /// up into batches (1: never).
    pub(crate) max_batch: u32,
}

/// A command from the program to the bridge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Command {
    /// Defines a remote function for a task with these Ray options.
    Define(Define),
    /// Submits one run.
    Submit(Submit),
    /// Submits several runs of one task as one Ray task.
    SubmitBatch(SubmitBatch),
    /// Asks for a run's value blob.
    Get(Get),
    /// Lets go of runs' objects.
    Release(Release),
    /// Cancels a run.
    Cancel(Cancel),
    /// Asks for the bridge's own figures.
    Stats(Stats),
    /// Shuts Ray down (a temporary instance with it) and exits.
    Shutdown,
}

/// Fields of [`Command::Define`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Define {
    /// The function's number, chosen by the program.
    pub(crate) function: u32,
    /// The task's name, which the Ray task takes.
    pub(crate) task_name: String,
    /// The Ray options, as a JSON object.
    pub(crate) options_json: String,
}

/// Fields of [`Command::Submit`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Submit {
    /// The run's key, chosen by the program; replies name the run by it.
    pub(crate) key: u64,
    /// The remote function.
    pub(crate) function: u32,
    /// The call for the executor: [`ONE_RUN`], then the run's header.
    pub(crate) call: ByteBuf,
    /// The runs whose values the run takes, in order.
    pub(crate) value_keys: Vec<u64>,
    /// The runs it waits for without taking their values.
    pub(crate) report_keys: Vec<u64>,
}

/// Fields of [`Command::SubmitBatch`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SubmitBatch {
    /// The runs' keys, in order.
    pub(crate) keys: Vec<u64>,
    /// The remote function.
    pub(crate) function: u32,
    /// The call for the executor: [`MANY_RUNS`], then the runs' headers.
    pub(crate) call: ByteBuf,
    /// Each run's dependencies, in order.
    pub(crate) dependencies: Vec<Dependencies>,
}

/// A run's dependencies, in a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Dependencies {
    /// The runs whose values it takes.
    pub(crate) value_keys: Vec<u64>,
    /// The runs it waits for.
    pub(crate) report_keys: Vec<u64>,
}

/// Fields of [`Command::Get`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Get {
    /// The request's number; the answer carries it.
    pub(crate) request: u64,
    /// The run whose value blob is wanted.
    pub(crate) key: u64,
}

/// Fields of [`Command::Release`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Release {
    /// The runs whose objects no one needs any more.
    pub(crate) keys: Vec<u64>,
}

/// Fields of [`Command::Cancel`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Cancel {
    /// The run to cancel.
    pub(crate) key: u64,
}

/// Fields of [`Command::Stats`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stats {
    /// The request's number; the answer carries it.
    pub(crate) request: u64,
}

/// A reply from the bridge to the program: a length-prefixed frame on its stdout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// Connected: the first reply of a bridge that works.
    Ready(ClusterInfo),
    /// Could not connect: the first and last reply of a bridge that does not.
    Fatal(Fatal),
    /// The bridge cannot go on: the cause, its last reply before [`Reply::Bye`].
    Died(Died),
    /// A log record of the bridge's Python (its own or Ray's).
    Log(LogRecord),
    /// A run's Ray task ended: its report.
    Done(Done),
    /// A batch's Ray task ended: its runs' reports.
    BatchDone(BatchDone),
    /// Ray could not run a run to its end.
    Failed(Failed),
    /// The answer to a [`Get`].
    Value(ValueReply),
    /// A [`Get`] that found no value.
    ValueError(NoValue),
    /// The answer to a [`Stats`].
    Stats(StatsReply),
    /// Output and starts of runs still running, as Ray's log streaming brought them.
    Live(Live),
    /// The bridge is exiting: its last reply.
    Bye,
}

/// What the bridge found when it connected.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClusterInfo {
    /// Live nodes.
    pub(crate) nodes: u64,
    /// The CPUs of the live nodes, together.
    pub(crate) cpus: f64,
    /// The dashboard's address, or empty.
    pub(crate) dashboard_url: String,
    /// Ray's version.
    pub(crate) ray_version: String,
    /// Whether the bridge started a temporary local instance.
    pub(crate) started_local: bool,
}

/// Why a bridge could not connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FatalKind {
    /// The address is not one Ray can use.
    InvalidAddress,
    /// Nothing answers at the address.
    Unreachable,
    /// The cluster refused the token.
    TokenRefused,
    /// The cluster runs another Ray or Python.
    VersionMismatch,
    /// `ray.init` failed otherwise.
    InitFailed,
}

/// Fields of [`Reply::Fatal`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Fatal {
    /// What went wrong.
    pub(crate) kind: FatalKind,
    /// One line that says so.
    pub(crate) message: String,
    /// Ray's traceback, for the debug log.
    pub(crate) details: String,
}

/// Fields of [`Reply::Died`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Died {
    /// One line that names the cause.
    pub(crate) message: String,
    /// The traceback, for the debug log.
    pub(crate) details: String,
}

/// The level of a [`LogRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogLevel {
    /// Python's DEBUG.
    Debug,
    /// Python's INFO.
    Info,
    /// Python's WARNING.
    Warning,
    /// Python's ERROR and CRITICAL.
    Error,
}

/// Fields of [`Reply::Log`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// Its level.
    pub(crate) level: LogLevel,
    /// The Python logger's name.
    pub(crate) target: String,
    /// The formatted message.
    pub(crate) message: String,
}

/// Fields of [`Reply::Live`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Live {
    /// In the order they arrived.
    pub(crate) lines: Vec<LiveLine>,
}

/// A marked line from a worker's log (see [`live`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LiveLine {
    /// The task run's id, as 32 hex digits.
    pub(crate) run: String,
    /// The executor's process id: each attempt Ray makes runs in its own.
    pub(crate) pid: u32,
    /// The line's index among the run's lines; `None` for the mark that the run started.
    pub(crate) seq: Option<u64>,
    /// When it was written (or the run started), in microseconds since the epoch, on the
    /// worker's clock.
    pub(crate) micros: i64,
    /// `o` (stdout), `e` (stderr) or a `tracing` level `1`..`5`; empty for a start.
    pub(crate) stream: String,
    /// The text; empty for a start.
    pub(crate) text: String,
}

/// Fields of [`Reply::Done`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Done {
    /// The run.
    pub(crate) key: u64,
    /// Its report, as the executor wrote it (see [`envelope`]).
    pub(crate) report: ByteBuf,
}

/// Fields of [`Reply::BatchDone`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct BatchDone {
    /// The runs, in order.
    pub(crate) keys: Vec<u64>,
    /// Their reports: a MessagePack array of byte strings, as the executor wrote it.
    pub(crate) reports: ByteBuf,
}

/// How a run ended that Ray could not run to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureKind {
    /// It could not start (its remote function was refused, say).
    Failed,
    /// Its worker, executor or node died.
    Crashed,
    /// It was cancelled.
    Cancelled,
}

/// Fields of [`Reply::Failed`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Failed {
    /// The run.
    pub(crate) key: u64,
    /// How it ended.
    pub(crate) kind: FailureKind,
    /// One line that says why.
    pub(crate) message: String,
}

/// Fields of [`Reply::Value`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ValueReply {
    /// The request answered.
    pub(crate) request: u64,
    /// The run's value blob (see [`envelope::decode_value`]).
    pub(crate) blob: ByteBuf,
}

/// Fields of [`Reply::ValueError`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct NoValue {
    /// The request answered.
    pub(crate) request: u64,
    /// Why there is no value.
    pub(crate) message: String,
}

/// Fields of [`Reply::Stats`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatsReply {
    /// The request answered.
    pub(crate) request: u64,
    /// The figures.
    pub(crate) stats: BridgeStats,
}

/// Figures the bridge reports about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BridgeStats {
    /// The bridge's peak resident memory.
    pub peak_rss_bytes: u64,
    /// How many task values it still holds references to.
    pub objects: u64,
    /// The bridge's process id.
    pub bridge_pid: u32,
    /// The Ray namespace it joined.
    pub namespace: String,
    /// How many Ray tasks it has submitted (a batch of a map's runs is one).
    pub ray_tasks: u64,
}
