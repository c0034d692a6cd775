//! What a task writes while it runs, recorded per run: stdout and stderr (through pipes
//! this process reads, and copies to the worker's own log), and `tracing` events.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use chrono::Utc;
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::protocol::envelope::{OutputLine, Stream};

/// How many lines of output one run keeps; the rest are counted and dropped.
pub(crate) const MAX_OUTPUT_LINES: usize = 10_000;

/// The lines a run writes, to stdout, stderr or `tracing`.
#[derive(Clone)]
pub(super) struct Output(Arc<Captured>);

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
    pub(super) fn capture() -> Self {
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

    pub(super) fn begin(&self) {
        let mut state = self.lock();
        state.lines.clear();
        state.dropped = 0;
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
pub(super) struct RecordEvents(pub(super) Output);

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
