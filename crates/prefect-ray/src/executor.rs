//! Executor mode: this program, started by a Ray worker to run its tasks.
//!
//! The worker's trampoline starts the user's own binary with `PREFECT_RAY_EXECUTOR` set to
//! the numbers of two pipe descriptors. A constructor sees the variable before `main` runs,
//! serves task runs over those pipes until the worker closes them, and exits; `main` never
//! runs. The task's stdout and stderr are captured per run (and copied to the worker's log),
//! `tracing` events are recorded, and both travel back with the run's states.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use chrono::Utc;
use prefect::State;
use prefect::runner::{self, LookupError, assemble, not_ready};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::envelope::{self, CallHeader, OutputLine, RunReport, Stream};
use crate::frame::{read_parts, write_parts};

/// The environment variable that puts a program in executor mode.
pub const EXECUTOR_ENV: &str = "PREFECT_RAY_EXECUTOR";

/// How many lines of output one run keeps; the rest are counted and dropped.
pub const MAX_OUTPUT_LINES: usize = 10_000;

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
    serve(commands, replies);
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
                std::process::exit(1);
            }
        };
        let (batch, outcomes, inputs) = run_call(parts, &output);
        let restart = runner::abandoned_attempts_running();
        let control: &[u8] = if restart { b"exit" } else { b"" };
        if let Err(error) = reply(&mut replies, batch, &outcomes, control) {
            eprintln!("prefect-ray executor: the reply pipe broke: {error}");
            std::process::exit(1);
        }
        // Unmapping a large input frees its shared memory, which takes a while: after the reply.
        drop(inputs);
        if restart {
            std::process::exit(0);
        }
    }
}

/// A blob from the worker: in the frame, or, when large, mapped from a shared-memory file.
enum Blob {
    Inline(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Blob::Inline(bytes) => bytes,
            Blob::Mapped(map) => map,
        }
    }
}

impl Blob {
    /// The blob of a frame's part: the part, or the file it names (which goes at once).
    fn open(part: Vec<u8>) -> std::io::Result<Blob> {
        let Some(path) = part.strip_prefix(&[envelope::IN_FILE]) else { return Ok(Blob::Inline(part)) };
        let path = std::path::PathBuf::from(String::from_utf8_lossy(path).into_owned());
        let file = File::open(&path)?;
        let _ = std::fs::remove_file(&path);
        // SAFETY: the file is ours alone: its writer handed it over and it is unlinked.
        Ok(Blob::Mapped(unsafe { memmap2::Mmap::map(&file)? }))
    }
}

/// Writes a blob made of `slices` to a new shared-memory file; returns the part that names it.
fn write_shared(slices: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() { dir.to_path_buf() } else { std::env::temp_dir() };
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("prefect-ray-{}-{count}", std::process::id()));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, File::create(&path)?);
    for slice in slices {
        file.write_all(slice)?;
    }
    file.flush()?;
    let mut reference = vec![envelope::IN_FILE];
    reference.extend_from_slice(path.to_string_lossy().as_bytes());
    Ok(reference)
}

/// The first byte of a call: one run, whose header follows.
const ONE_RUN: u8 = 0;
/// The first byte of a call: several runs (the runs of a map), whose headers follow as a
/// MessagePack array of byte strings; their dependencies follow run after run.
const MANY_RUNS: u8 = 1;

/// A run's report, and its value as the completion byte and the MessagePack value (or, for
/// a run that did not complete, the text of its final state).
type Outcome = (RunReport, (u8, Vec<u8>));

/// Runs the runs of one call, one after the other; returns whether it was a call of many,
/// the outcomes, and the call's inputs (for the caller to drop once it has replied).
fn run_call(mut parts: Vec<Vec<u8>>, output: &Output) -> (bool, Vec<Outcome>, Vec<Blob>) {
    let crashed = |message: String| {
        (
            RunReport { states: vec![State::crashed(message)], ..Default::default() },
            (envelope::NOT_COMPLETED, Vec::new()),
        )
    };
    if parts.is_empty() {
        return (false, vec![crashed("the worker sent an empty call".into())], Vec::new());
    }
    let call = parts.remove(0);
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
fn reply(out: &mut impl Write, batch: bool, outcomes: &[Outcome], control: &[u8]) -> std::io::Result<()> {
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

/// A large value goes through a shared-memory file: returns the part that names it.
fn in_shared_file(tag: u8, body: &[u8]) -> Option<Vec<u8>> {
    if body.len() <= envelope::FILE_LIMIT {
        return None;
    }
    write_shared(&[&[tag], body])
        .inspect_err(|error| {
            eprintln!("prefect-ray executor: could not use shared memory ({error}); sending the value through the pipe")
        })
        .ok()
}

/// Runs one task run, taking its dependencies from `dependencies`.
fn run<'a>(header: &[u8], dependencies: &mut impl Iterator<Item = &'a Blob>, output: &Output) -> Outcome {
    output.begin();
    let mut states = Vec::new();
    let value = execute(header, dependencies, &mut states);
    let (lines, dropped_lines) = output.end();
    let report = RunReport { states, output: lines, dropped_lines, pid: std::process::id() };
    let value = match (value, report.states.last()) {
        (Some(bytes), Some(last)) if last.is_completed() => (envelope::COMPLETED, bytes),
        (_, last) => {
            (envelope::NOT_COMPLETED, last.map_or_else(|| "no state".to_owned(), State::to_string).into_bytes())
        }
    };
    (report, value)
}

fn execute<'a>(
    header: &[u8],
    dependencies: &mut impl Iterator<Item = &'a Blob>,
    states: &mut Vec<State>,
) -> Option<Vec<u8>> {
    let header: CallHeader = match rmp_serde::from_slice(header) {
        Ok(header) => header,
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
        if blob.first() != Some(&envelope::COMPLETED) {
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
    let args = assemble(&header.args, &upstream_values);
    let span = tracing::info_span!("task_run", name = %header.run_name, id = %header.run_id);
    let execution = runner::execute(task, &args, &header.options, &span, &mut |state| states.push(state));
    states.push(execution.state);
    execution.result
}

/// `NotReady` for an upstream run whose final state is shown as `state`.
fn not_ready_from(upstream: &str, state: &str) -> State {
    let mut ready = not_ready(upstream, &State::failed(""));
    ready.message = Some(format!("Upstream task run '{upstream}' did not reach a 'COMPLETED' state: {state}"));
    ready
}

/// The lines a run writes, to stdout, stderr or `tracing`.
#[derive(Clone)]
struct Output(Arc<Captured>);

struct Captured {
    state: Mutex<CaptureState>,
    drained: Condvar,
    /// The read ends of the stdout and stderr pipes, to tell whether anything is unread.
    pipes: Mutex<Vec<RawFd>>,
    /// The worker's own stderr, where recorded events are copied for Ray's logs.
    worker_stderr: Mutex<Option<File>>,
}

#[derive(Default)]
struct CaptureState {
    lines: Vec<OutputLine>,
    dropped: u64,
    /// The unfinished last line of stdout and of stderr.
    partial: [Vec<u8>; 2],
}

impl Output {
    /// Points this process's stdout and stderr at pipes read by threads that record each
    /// line and copy it to the worker's own stdout and stderr (Ray's log files).
    fn capture() -> Self {
        let output = Output(Arc::new(Captured {
            state: Mutex::default(),
            drained: Condvar::new(),
            pipes: Mutex::default(),
            worker_stderr: Mutex::new(None),
        }));
        for (index, (fd, stream)) in [(1, Stream::Stdout), (2, Stream::Stderr)].into_iter().enumerate() {
            match redirect(fd) {
                Ok((pipe, original)) => {
                    if fd == 2 {
                        *output.0.worker_stderr.lock().unwrap_or_else(|p| p.into_inner()) = original.try_clone().ok();
                    }
                    output.0.pipes.lock().unwrap_or_else(|p| p.into_inner()).push(pipe.as_raw_fd());
                    let output = output.clone();
                    std::thread::spawn(move || output.pump(index, stream, pipe, original));
                }
                Err(error) => eprintln!("prefect-ray executor: output of tasks will not be captured: {error}"),
            }
        }
        output
    }

    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one captured stream: waits for data without the lock, then reads all there is
    /// and records whole lines with the lock held, so `end` can tell when nothing is pending.
    fn pump(&self, index: usize, stream: Stream, mut pipe: File, mut original: File) {
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let mut poll = libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: polls one descriptor we own, with a valid pollfd.
            if unsafe { libc::poll(&mut poll, 1, -1) } < 0 {
                continue;
            }
            let mut state = self.lock();
            let mut closed = false;
            loop {
                match pipe.read(&mut buffer) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(read) => {
                        let _ = original.write_all(&buffer[..read]);
                        state.partial[index].extend_from_slice(&buffer[..read]);
                        while let Some(end) = state.partial[index].iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = state.partial[index].drain(..=end).collect();
                            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                            state.record(stream, text);
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            drop(state);
            self.0.drained.notify_all();
            if closed {
                return;
            }
        }
    }

    fn record(&self, stream: Stream, text: String) {
        self.lock().record(stream, text);
    }

    fn begin(&self) {
        let mut state = self.lock();
        state.lines.clear();
        state.dropped = 0;
    }

    /// The run's lines, once everything it wrote has been read: nothing is left in the pipes
    /// while the pump threads are between reads.
    fn end(&self) -> (Vec<OutputLine>, u64) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let pipes = self.0.pipes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut state = self.lock();
        while pipes.iter().any(|&fd| unread(fd) > 0) && std::time::Instant::now() < deadline {
            state = self
                .0
                .drained
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        for (index, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if !state.partial[index].is_empty() {
                let text = String::from_utf8_lossy(&std::mem::take(&mut state.partial[index])).into_owned();
                state.record(stream, text);
            }
        }
        (std::mem::take(&mut state.lines), std::mem::take(&mut state.dropped))
    }
}

impl CaptureState {
    fn record(&mut self, stream: Stream, text: String) {
        if self.lines.len() >= MAX_OUTPUT_LINES {
            self.dropped += 1;
        } else {
            self.lines.push(OutputLine { time: Utc::now(), stream, text });
        }
    }
}

/// How many bytes wait unread in a pipe.
fn unread(fd: RawFd) -> libc::c_int {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut pending) };
    pending
}

/// Makes `fd` the write end of a new pipe; returns its read end and a copy of the old `fd`.
fn redirect(fd: RawFd) -> std::io::Result<(File, File)> {
    let mut ends = [0; 2];
    // SAFETY: plain descriptor calls on descriptors this process owns; results are checked.
    unsafe {
        if libc::pipe(ends.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let original = libc::dup(fd);
        if original < 0 || libc::dup2(ends[1], fd) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(ends[1]);
        libc::fcntl(ends[0], libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(ends[0], libc::F_SETFL, libc::fcntl(ends[0], libc::F_GETFL) | libc::O_NONBLOCK);
        libc::fcntl(original, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok((File::from_raw_fd(ends[0]), File::from_raw_fd(original)))
    }
}

/// Records `tracing` events of the running task (info and above, or what `RUST_LOG` asks).
struct RecordEvents(Output);

impl<S: Subscriber> Layer<S> for RecordEvents {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.is_span() || *metadata.level() <= max_level()
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => 1,
            tracing::Level::WARN => 2,
            tracing::Level::INFO => 3,
            tracing::Level::DEBUG => 4,
            tracing::Level::TRACE => 5,
        };
        let text = prefect::logging::event_message(event);
        if let Some(stderr) = self.0.0.worker_stderr.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = writeln!(stderr, "{} {text}", event.metadata().level());
        }
        self.0.record(Stream::Log(level), text);
    }
}

fn max_level() -> tracing::Level {
    static LEVEL: OnceLock<tracing::Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let directive =
            std::env::var("RUST_LOG").or_else(|_| std::env::var("PREFECT_LOGGING_LEVEL")).unwrap_or_default();
        match directive.to_ascii_lowercase().as_str() {
            "trace" => tracing::Level::TRACE,
            "debug" => tracing::Level::DEBUG,
            "warn" | "warning" => tracing::Level::WARN,
            "error" => tracing::Level::ERROR,
            _ => tracing::Level::INFO,
        }
    })
}
