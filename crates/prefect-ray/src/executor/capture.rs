//! What a task writes while it runs, recorded per run: stdout and stderr (through pipes
//! this process reads), and `tracing` events. Each recorded line is also copied to the
//! worker's own stdout or stderr (Ray's log files), marked with its run, so that Ray's log
//! streaming brings it to the program while the task runs ([`live`]); so is a mark that the
//! run started, once it has run for [`ANNOUNCE_AFTER`] or writes its first line.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use uuid::Uuid;

use crate::protocol::envelope::{DEFAULT_MAX_LINES, OutputLine, OutputSettings, Stream};
use crate::protocol::live;

/// A run that is still running this long after it started is announced as running: a
/// no-op task ends first, and costs no log line.
const ANNOUNCE_AFTER: Duration = Duration::from_millis(200);

/// The lines a run writes, to stdout, stderr or `tracing`.
#[derive(Clone)]
pub(super) struct Output(Arc<Captured>);

struct Captured {
    state: Mutex<CaptureState>,
    /// The `tracing` level the run in progress records up to (1 error .. 5 trace), read on
    /// every event without the lock.
    level: AtomicU8,
    drained: Condvar,
    /// Wakes the announcer when a run starts.
    started: Condvar,
    /// The read ends of the stdout and stderr pipes, to tell whether anything is unread.
    pipes: Mutex<Vec<RawFd>>,
}

#[derive(Default)]
struct CaptureState {
    lines: Vec<OutputLine>,
    dropped: u64,
    /// The unfinished last line of stdout and of stderr.
    partial: [Vec<u8>; 2],
    /// The worker's own stdout and stderr (Ray's log files), where lines are copied.
    worker: [Option<File>; 2],
    /// The run in progress, if any.
    run: Option<LiveRun>,
    /// How many lines the run in progress keeps.
    max_lines: usize,
    /// Whether the announcer waits for a run to start (then a start wakes it; while it
    /// waits for a deadline, starts need not, which keeps a stream of short runs cheap).
    announcer_parked: bool,
}

/// The run in progress, as far as its live output goes.
struct LiveRun {
    id: Uuid,
    /// When it entered `Running`, and since when by this process's clock.
    running: Option<(DateTime<Utc>, Instant)>,
    /// Whether the worker's log says it started.
    announced: bool,
}

impl Output {
    /// Points this process's stdout and stderr at pipes read by threads that record each
    /// line and copy it to the worker's own stdout and stderr (Ray's log files).
    pub(super) fn capture() -> Self {
        let output = Output(Arc::new(Captured {
            state: Mutex::new(CaptureState { max_lines: DEFAULT_MAX_LINES as usize, ..CaptureState::default() }),
            level: AtomicU8::new(3),
            drained: Condvar::new(),
            started: Condvar::new(),
            pipes: Mutex::default(),
        }));
        for (index, (fd, stream)) in [(1, Stream::Stdout), (2, Stream::Stderr)].into_iter().enumerate() {
            match redirect(fd) {
                Ok((pipe, original)) => {
                    output.lock().worker[index] = Some(original);
                    output.0.pipes.lock().unwrap_or_else(|p| p.into_inner()).push(pipe.as_raw_fd());
                    let output = output.clone();
                    std::thread::spawn(move || output.pump(index, stream, pipe));
                }
                Err(error) => eprintln!("prefect-ray executor: output of tasks will not be captured: {error}"),
            }
        }
        let announcer = output.clone();
        std::thread::spawn(move || announcer.announce());
        output
    }

    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one captured stream: waits for data without the lock, then reads all there is
    /// and records whole lines with the lock held, so `end` can tell when nothing is pending.
    fn pump(&self, index: usize, stream: Stream, mut pipe: File) {
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

    /// A run starts: what is written from now on is its own, kept as `settings` say.
    pub(super) fn begin(&self, run: Uuid, settings: OutputSettings) {
        self.0.level.store(settings.level, Ordering::Relaxed);
        let mut state = self.lock();
        state.lines.clear();
        state.dropped = 0;
        state.max_lines = settings.max_lines as usize;
        state.run = Some(LiveRun { id: run, running: None, announced: false });
    }

    /// The run entered `Running` at `at`: announced once it has run a while.
    pub(super) fn running(&self, at: DateTime<Utc>) {
        let mut state = self.lock();
        if let Some(run) = state.run.as_mut() {
            run.running = Some((at, Instant::now()));
        }
        if state.announcer_parked {
            self.0.started.notify_all();
        }
    }

    /// Where the worker's log of stdout is (a file of Ray's), if it is one.
    pub(super) fn worker_log(&self) -> Option<std::path::PathBuf> {
        let state = self.lock();
        let fd = state.worker[0].as_ref()?.as_raw_fd();
        std::fs::read_link(format!("/proc/self/fd/{fd}")).ok().filter(|path| path.is_absolute())
    }

    /// Marks in the worker's log the runs that have run for [`ANNOUNCE_AFTER`].
    fn announce(&self) {
        let mut state = self.lock();
        loop {
            let due = match &state.run {
                Some(LiveRun { running: Some((_, since)), announced: false, .. }) => {
                    Some(ANNOUNCE_AFTER.saturating_sub(since.elapsed()))
                }
                _ => None,
            };
            state = match due {
                Some(wait) if wait.is_zero() => {
                    state.announce_run();
                    state
                }
                Some(wait) => self.0.started.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0,
                None => {
                    state.announcer_parked = true;
                    let mut state = self.0.started.wait(state).unwrap_or_else(|p| p.into_inner());
                    state.announcer_parked = false;
                    state
                }
            };
        }
    }

    /// The run's lines, once everything it wrote has been read: nothing is left in the pipes
    /// while the pump threads are between reads.
    pub(super) fn end(&self) -> (Vec<OutputLine>, u64) {
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
        state.run = None;
        (std::mem::take(&mut state.lines), std::mem::take(&mut state.dropped))
    }
}

impl CaptureState {
    /// Records a line of the run in progress, and copies it to the worker's log: marked
    /// with its run if it is recorded, as it is otherwise.
    fn record(&mut self, stream: Stream, text: String) {
        let time = Utc::now();
        let seq = self.lines.len();
        let recorded = seq < self.max_lines;
        let copy = match (&self.run, recorded) {
            (Some(run), true) => {
                let id = run.id;
                self.announce_run();
                live::line(id, seq, time, stream, &text)
            }
            _ => format!("{text}\n"),
        };
        let index = usize::from(!matches!(stream, Stream::Stdout));
        if let Some(worker) = self.worker[index].as_mut() {
            let _ = worker.write_all(copy.as_bytes());
        }
        if recorded {
            self.lines.push(OutputLine { time, stream, text });
        } else {
            self.dropped += 1;
        }
    }

    /// Says in the worker's log how far the run in progress is.
    fn progress(&mut self, fraction: f64) {
        self.announce_run();
        let Some(run) = &self.run else { return };
        let mark = live::progress(run.id, Utc::now(), fraction);
        if let Some(worker) = self.worker[1].as_mut() {
            let _ = worker.write_all(mark.as_bytes());
        }
    }

    /// Says in the worker's log that the run in progress started, once.
    fn announce_run(&mut self) {
        let Some(run) = self.run.as_mut().filter(|run| !run.announced) else { return };
        let Some((at, _)) = run.running else { return };
        run.announced = true;
        let mark = live::started(run.id, at);
        if let Some(worker) = self.worker[1].as_mut() {
            let _ = worker.write_all(mark.as_bytes());
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

/// Records `tracing` events of the running task, up to the level the program asks for
/// (`PREFECT_LOGGING_LEVEL`, info by default).
pub(super) struct RecordEvents(pub(super) Output);

impl<S: Subscriber> Layer<S> for RecordEvents {
    fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        // The level may change from run to run: ask each time.
        if metadata.is_span() {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::sometimes()
        }
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.is_span()
            || metadata.target() == prefect::logging::PROGRESS_TARGET
            || metadata.target() == prefect::artifacts::ARTIFACT_TARGET
            || level_number(*metadata.level()) <= self.0.0.level.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if let Some(fraction) = prefect::logging::progress_of(event) {
            self.0.lock().progress(fraction);
            return;
        }
        if let Some(artifact) = prefect::artifacts::artifact_of(event) {
            // In the report, for the program to send: the worker needs no route to the server.
            let json = serde_json::to_string(&artifact).expect("an artifact always serializes");
            self.0.record(Stream::Artifact, json);
            return;
        }
        let level = level_number(*event.metadata().level());
        self.0.record(Stream::Log(level), prefect::logging::event_message(event));
    }
}

fn level_number(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 1,
        tracing::Level::WARN => 2,
        tracing::Level::INFO => 3,
        tracing::Level::DEBUG => 4,
        tracing::Level::TRACE => 5,
    }
}
