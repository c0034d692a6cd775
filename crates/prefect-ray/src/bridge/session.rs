//! A connected bridge: the runs submitted through it, the replies that end them, the values
//! it holds, and its shutdown.
//!
//! Every run submitted is in `dispatch.runs` until a reply ends it. When the bridge dies or
//! shuts down, the session closes under the same lock that admits runs, and every run in it
//! (and any submitted later) ends `Crashed`: no run outlives its session unended.

use std::collections::HashMap;
use std::io::BufReader;
use std::process::{Child, ChildStdout, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prefect::runner::{RemoteResult, ResultData};
use serde_bytes::ByteBuf;
use serde_json::{Map, Value};

use super::handshake::Connected;
use super::launch::kill_group;
use super::outbox::Outbox;
use super::output::Output;
use crate::error::RayError;
use uuid::Uuid;

use crate::protocol::MAX_COMMAND;
use crate::protocol::envelope;
use crate::protocol::frame::read_message;
use crate::protocol::{
    BatchDone, BridgeStats, Cancel, ClusterInfo, Command, Define, Dependencies, Done, FILE_LIMIT, Failed, Get, Live,
    LiveLine, MANY_RUNS, NoValue, ONE_RUN, Release, Reply, Stats, StatsReply, Submit, SubmitBatch, ValueReply,
};
use crate::report::{self, PendingRun};
use crate::shared_memory::{self, Blob};

/// A remote function of the bridge: a task's options, and the function's number.
type RemoteFunction = (Map<String, Value>, u32);

/// The state of one bridge process, shared by its runners, its reader thread and the
/// handles of the values it holds.
pub(crate) struct Shared {
    commands: Outbox,
    child: Mutex<Child>,
    dispatch: Mutex<Dispatch>,
    room: Condvar,
    /// The remote functions defined so far: per task, its options and the function's number.
    functions: Mutex<HashMap<&'static str, Vec<RemoteFunction>>>,
    next_key: AtomicU64,
    pub(crate) info: ClusterInfo,
    max_in_flight: usize,
    alive: AtomicBool,
    /// Held while the processes and files are being ended: whoever comes second waits
    /// until they are gone (a program must not exit while its reader thread is halfway).
    stopping: Mutex<()>,
    releases: Mutex<Vec<u64>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    output: Output,
    temp_dir: Mutex<Option<tempfile::TempDir>>,
    /// Shared-memory files of large calls sent to the bridge, which unlinks each when it maps
    /// it: what is left when the session ends was never taken.
    handed_over: Mutex<Vec<std::path::PathBuf>>,
}

#[derive(Default)]
struct Dispatch {
    runs: HashMap<u64, PendingRun>,
    requests: HashMap<u64, mpsc::Sender<Result<Answer, String>>>,
    next_request: u64,
    /// Why the session ended, once it has: set under the same lock that admits runs, so no
    /// run is admitted after its runs were failed.
    closed: Option<String>,
    /// Runs that ended without completing, for what they wrote just before.
    recent: report::Recent,
}

/// The bridge's answer to a request.
enum Answer {
    Value(Blob),
    Stats(BridgeStats),
}

/// A run ready for Ray: its header (encoded [`CallHeader`](envelope::CallHeader)) and the
/// keys of the Ray objects it depends on: values it takes, and runs it waits for.
pub(crate) struct Call {
    pub(crate) pending: PendingRun,
    pub(crate) header: Vec<u8>,
    pub(crate) value_keys: Vec<u64>,
    pub(crate) report_keys: Vec<u64>,
    /// The objects those keys name, held until the call is sent: one that goes sooner is
    /// released in the bridge, which must not happen before the call that uses it arrives.
    pub(crate) objects: Vec<Arc<RayObject>>,
}

/// A task run's value in Ray's object store; released when the last handle goes.
pub(crate) struct RayObject {
    pub(crate) key: u64,
    shared: Weak<Shared>,
}

impl RayObject {
    /// Whether this object lives in `shared`'s Ray session.
    pub(crate) fn belongs_to(&self, shared: &Arc<Shared>) -> bool {
        self.shared.as_ptr() == Arc::as_ptr(shared)
    }
}

impl Drop for RayObject {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.release(self.key);
        }
    }
}

impl RemoteResult for RayObject {
    fn fetch(&self) -> Result<Vec<u8>, String> {
        let shared = self.shared.upgrade().ok_or_else(|| {
            "the Ray session that held it has ended; call .result() inside the flow, or return the future from the flow".to_owned()
        })?;
        let blob = shared.fetch(self.key)?;
        envelope::decode_value(&blob).map(<[u8]>::to_vec)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// The session of a bridge that has just connected; starts the thread that reads its
    /// replies.
    pub(super) fn open(connected: Connected, max_in_flight: usize) -> Result<Arc<Shared>, RayError> {
        let Connected { info, commands, replies, launched } = connected;
        let commands = Outbox::new(commands).map_err(RayError::setup("could not start a thread"))?;
        let shared = Arc::new(Shared {
            commands,
            child: Mutex::new(launched.child),
            dispatch: Mutex::new(Dispatch::default()),
            room: Condvar::new(),
            functions: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            info,
            max_in_flight: max_in_flight.max(1),
            alive: AtomicBool::new(true),
            stopping: Mutex::new(()),
            releases: Mutex::new(Vec::new()),
            threads: Mutex::new(vec![launched.stderr.thread]),
            output: launched.stderr.output,
            temp_dir: Mutex::new(Some(launched.temp_dir)),
            handed_over: Mutex::new(Vec::new()),
        });
        let reader_shared = Arc::downgrade(&shared);
        let reader = std::thread::Builder::new()
            .name("prefect-ray-replies".into())
            .spawn(move || read_replies(replies, reader_shared))
            .map_err(RayError::setup("could not start a thread"))?;
        lock(&shared.threads).push(reader);
        Ok(shared)
    }

    /// Whether the bridge is up and was not asked to stop.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    fn send(&self, command: &Command) -> Result<(), String> {
        let releases = std::mem::take(&mut *lock(&self.releases));
        self.commands
            .send(|frames| {
                // After the configuration, commands go as a plain stream of MessagePack values.
                if !releases.is_empty() {
                    rmp_serde::encode::write(frames, &Command::Release(Release { keys: releases }))
                        .map_err(std::io::Error::other)?;
                }
                rmp_serde::encode::write(frames, command).map_err(std::io::Error::other)
            })
            .map_err(|error| {
                // The pipe breaks when the bridge is gone: say why, as the reader thread will.
                tracing::debug!(target: "prefect_ray", "could not reach the Ray bridge: {error}");
                self.death()
            })
    }

    /// Why the bridge is gone: how it exited, and what it said last.
    fn death(&self) -> String {
        let status = self.exit_status(Duration::from_secs(2));
        format!("the Ray bridge process exited unexpectedly ({}){}", describe(status), self.last_words())
    }

    /// Why the bridge stopped, as far as it said: " (cause)", or nothing.
    fn last_words(&self) -> String {
        match self.output.cause() {
            Some(cause) => format!(" ({cause})"),
            None => String::new(),
        }
    }

    /// The number of the remote function for this task with these options, defined on
    /// first use.
    pub(crate) fn function(
        &self,
        task_key: &'static str,
        task_name: &str,
        options: &Map<String, Value>,
    ) -> Result<u32, String> {
        let mut functions = lock(&self.functions);
        if let Some((_, id)) = functions.get(task_key).into_iter().flatten().find(|(known, _)| known == options) {
            return Ok(*id);
        }
        let function = functions.values().map(Vec::len).sum::<usize>() as u32;
        let options_json = serde_json::to_string(options).expect("JSON values serialize");
        self.send(&Command::Define(Define { function, task_name: task_name.to_owned(), options_json }))?;
        functions.entry(task_key).or_default().push((options.clone(), function));
        Ok(function)
    }

    /// Submits a run; its dependencies' values and reports are Ray objects of this bridge.
    /// Blocks while `max_in_flight` runs are unfinished.
    pub(crate) fn submit(self: &Arc<Self>, function: u32, call: Call) {
        let Call { pending, header, value_keys, report_keys, objects: _held_until_sent } = call;
        let Some(key) = self.admit(vec![pending]).pop() else { return };
        let call = match self.call_part(&[&[ONE_RUN], &header]) {
            Ok(call) => call,
            Err(message) => return self.fail_submitted(&[key], &message),
        };
        let submit = Submit { key, function, call: ByteBuf::from(call), value_keys, report_keys };
        if let Err(message) = self.send(&Command::Submit(submit)) {
            self.fail_submitted(&[key], &message);
        }
    }

    /// Submits the runs of `calls` as one Ray task, which runs them one after the other.
    pub(crate) fn submit_batch(self: &Arc<Self>, function: u32, calls: Vec<Call>) {
        let mut headers = Vec::with_capacity(calls.len());
        let mut dependencies = Vec::with_capacity(calls.len());
        let mut pendings = Vec::with_capacity(calls.len());
        let mut held_until_sent = Vec::new();
        for Call { pending, header, value_keys, report_keys, objects } in calls {
            held_until_sent.push(objects);
            headers.push(ByteBuf::from(header));
            dependencies.push(Dependencies { value_keys, report_keys });
            pendings.push(pending);
        }
        let mut blob = vec![MANY_RUNS];
        if let Err(error) = rmp_serde::encode::write(&mut blob, &headers) {
            pendings.into_iter().for_each(|p| p.run.crash(format!("could not encode the calls: {error}")));
            return;
        }
        let keys = self.admit(pendings);
        if keys.is_empty() {
            return;
        }
        let call = match self.call_part(&[&blob]) {
            Ok(call) => call,
            Err(message) => return self.fail_submitted(&keys, &message),
        };
        let batch = SubmitBatch { keys: keys.clone(), function, call: ByteBuf::from(call), dependencies };
        if let Err(message) = self.send(&Command::SubmitBatch(batch)) {
            self.fail_submitted(&keys, &message);
        }
    }

    /// A call as the bridge takes it: in the command, or, when large, in a shared-memory file
    /// that the bridge maps and hands to Ray without decoding it (or copying it first). A
    /// large call that no file can take and the pipe cannot either fails its runs.
    fn call_part(&self, slices: &[&[u8]]) -> Result<Vec<u8>, String> {
        let size: usize = slices.iter().map(|slice| slice.len()).sum();
        if size > FILE_LIMIT {
            match shared_memory::write_shared(slices) {
                Ok(part) => {
                    let mut handed = lock(&self.handed_over);
                    handed.retain(|path| path.exists());
                    handed.push(shared_memory::path_of(&part));
                    return Ok(part);
                }
                Err(error) if size > MAX_COMMAND - (1 << 20) => {
                    return Err(format!(
                        "could not hand this run's call ({} MB) to the Ray bridge in shared memory ({error}), and it is too large for the pipe; free space in /dev/shm",
                        size >> 20
                    ));
                }
                Err(error) => tracing::debug!(target: "prefect_ray", "a large call goes through the pipe: {error}"),
            }
        }
        Ok(slices.concat())
    }

    /// Registers runs as submitted, once `max_in_flight` leaves room; returns their keys
    /// (none if the session has ended: then the runs end `Crashed`).
    fn admit(self: &Arc<Self>, pendings: Vec<PendingRun>) -> Vec<u64> {
        let mut dispatch = lock(&self.dispatch);
        while dispatch.runs.len() >= self.max_in_flight && dispatch.closed.is_none() {
            dispatch = self.room.wait(dispatch).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(reason) = dispatch.closed.clone() {
            drop(dispatch);
            for pending in pendings {
                pending.run.crash(format!("the run could not be submitted: {reason}"));
            }
            return Vec::new();
        }
        pendings
            .into_iter()
            .map(|pending| {
                let key = self.next_key.fetch_add(1, Ordering::Relaxed);
                pending.run.set_runner_data(Arc::new(RayObject { key, shared: Arc::downgrade(self) }));
                dispatch.runs.insert(key, pending);
                key
            })
            .collect()
    }

    fn fail_submitted(&self, keys: &[u64], message: &str) {
        for key in keys {
            if let Some(pending) = self.take_run(*key) {
                pending.run.crash(message);
            }
        }
    }

    fn take_run(&self, key: u64) -> Option<PendingRun> {
        let taken = lock(&self.dispatch).runs.remove(&key);
        if taken.is_some() {
            self.room.notify_all();
        }
        taken
    }

    /// Sends the command that `make` builds around a new request number, and waits for
    /// the answer.
    fn request(&self, make: impl FnOnce(u64) -> Command) -> Result<Answer, String> {
        let (sender, receiver) = mpsc::channel();
        let request = {
            let mut dispatch = lock(&self.dispatch);
            if let Some(reason) = &dispatch.closed {
                return Err(reason.clone());
            }
            dispatch.next_request += 1;
            let request = dispatch.next_request;
            dispatch.requests.insert(request, sender);
            request
        };
        if let Err(error) = self.send(&make(request)) {
            lock(&self.dispatch).requests.remove(&request);
            return Err(error);
        }
        receiver
            .recv()
            .unwrap_or_else(|_| Err(format!("the Ray bridge stopped before it answered{}", self.last_words())))
    }

    /// Fetches a value blob.
    fn fetch(&self, key: u64) -> Result<Blob, String> {
        match self.request(|request| Command::Get(Get { request, key }))? {
            Answer::Value(blob) => Ok(blob),
            Answer::Stats(_) => Err("the Ray bridge answered out of turn".to_owned()),
        }
    }

    /// The bridge process's own figures.
    pub(crate) fn stats(&self) -> Result<BridgeStats, String> {
        match self.request(|request| Command::Stats(Stats { request }))? {
            Answer::Stats(stats) => Ok(stats),
            Answer::Value(_) => Err("the Ray bridge answered out of turn".to_owned()),
        }
    }

    fn release(&self, key: u64) {
        let mut releases = lock(&self.releases);
        releases.push(key);
        if releases.len() >= 1024 {
            let keys = std::mem::take(&mut *releases);
            drop(releases);
            let _ = self.send(&Command::Release(Release { keys }));
        }
    }

    /// Asks Ray to cancel every unfinished run (once each); they end `Cancelled` with
    /// `reason` unless they complete first.
    pub(crate) fn cancel_all(&self, reason: &str) {
        let keys: Vec<u64> = lock(&self.dispatch)
            .runs
            .iter_mut()
            .filter(|(_, pending)| pending.cancelled.is_none())
            .map(|(key, pending)| {
                pending.cancelled = Some(reason.to_owned());
                *key
            })
            .collect();
        for key in keys {
            let _ = self.send(&Command::Cancel(Cancel { key }));
        }
    }

    /// Ends the bridge: Ray shuts down (the temporary instance with it), unfinished runs end
    /// `Crashed`, the temporary directory goes. Safe to call more than once.
    pub(crate) fn shut_down(&self) {
        if self.stop_processes() {
            self.fail_everything("the Ray session ended before the run finished");
        }
    }

    /// Ends the bridge's processes and files without touching its runs, for a process that
    /// is about to exit on a signal. Returns whether this call did the work; a second caller
    /// waits until the first is done.
    fn stop_processes(&self) -> bool {
        let stopping = lock(&self.stopping);
        self.stop_processes_locked(stopping)
    }

    /// What the reader thread does when the bridge died: the work, unless another thread is
    /// doing it already (which joins the reader thread: waiting for it would deadlock).
    fn stop_processes_if_idle(&self) {
        if let Ok(stopping) = self.stopping.try_lock() {
            self.stop_processes_locked(stopping);
        }
    }

    fn stop_processes_locked(&self, _stopping: MutexGuard<'_, ()>) -> bool {
        if !self.alive.swap(false, Ordering::AcqRel) {
            return false;
        }
        let _ = self.send(&Command::Shutdown);
        self.commands.close();
        let mut child = lock(&self.child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let exited = loop {
            match child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => break false,
            }
        };
        if !exited {
            tracing::warn!(target: "prefect_ray", "the Ray bridge did not stop within 60 s; killing its process group");
        }
        // Whatever the bridge started that is still alive goes with its process group.
        kill_group(child.id());
        let _ = child.wait();
        drop(child);
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
        lock(&self.temp_dir).take();
        // Calls handed over in files that the bridge never took.
        for path in std::mem::take(&mut *lock(&self.handed_over)) {
            let _ = std::fs::remove_file(path);
        }
        true
    }

    /// The bridge's exit status, once it has exited (within `wait`).
    fn exit_status(&self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        let mut child = lock(&self.child);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => return None,
            }
        }
    }

    /// Ends the session's runs and requests: every run not finished yet ends `Crashed`, and
    /// any run submitted from now on too. Only the first reason counts.
    fn fail_everything(&self, message: &str) {
        let (runs, requests) = {
            let mut dispatch = lock(&self.dispatch);
            dispatch.closed.get_or_insert_with(|| message.to_owned());
            (std::mem::take(&mut dispatch.runs), std::mem::take(&mut dispatch.requests))
        };
        self.room.notify_all();
        for (_, pending) in runs {
            pending.run.crash(message);
        }
        for (_, request) in requests {
            let _ = request.send(Err(message.to_owned()));
        }
    }

    fn on_reply(&self, reply: Reply) {
        match reply {
            Reply::Done(Done { key, report }) => self.done(key, &report),
            Reply::BatchDone(BatchDone { keys, reports }) => match rmp_serde::from_slice::<Vec<ByteBuf>>(&reports) {
                Ok(reports) if reports.len() == keys.len() => {
                    keys.iter().zip(&reports).for_each(|(key, report)| self.done(*key, report));
                }
                _ => self.fail_submitted(&keys, "the executor sent reports this driver cannot read"),
            },
            Reply::Failed(Failed { key, kind, message }) => {
                if let Some(pending) = self.take_run(key) {
                    let ended = report::Ended::of(&pending);
                    report::fail(pending, kind, message);
                    lock(&self.dispatch).recent.keep(ended);
                }
            }
            Reply::Value(ValueReply { request, blob }) => {
                // A large value comes as the name of a shared-memory file, mapped here.
                let answer = Blob::open(blob.into_vec())
                    .map(Answer::Value)
                    .map_err(|error| format!("could not map the value the Ray bridge handed over: {error}"));
                self.answer(request, answer);
            }
            Reply::ValueError(NoValue { request, message }) => self.answer(request, Err(message)),
            Reply::Stats(StatsReply { request, stats }) => self.answer(request, Ok(Answer::Stats(stats))),
            Reply::Log(record) => self.output.log(record),
            Reply::Live(Live { lines }) => self.live(lines),
            Reply::Died(died) => self.output.died(died),
            Reply::Ready(_) | Reply::Fatal(..) | Reply::Bye => {}
        }
    }

    /// Shows what runs still running wrote, under their names, and moves those that
    /// started to `Running`. Lines of runs that have ended were in their reports already.
    fn live(&self, lines: Vec<LiveLine>) {
        let mut dispatch = lock(&self.dispatch);
        // Lines come in runs of one run: the run is looked up when the id changes (a scan,
        // so that runs that print nothing cost nothing).
        let mut last: Option<(String, Option<u64>)> = None;
        for line in lines {
            let key = match &last {
                Some((run, key)) if *run == line.run => *key,
                _ => {
                    let id = Uuid::parse_str(&line.run).ok();
                    let key = id.and_then(|id| dispatch.runs.iter().find(|(_, p)| p.run.id() == id).map(|(k, _)| *k));
                    last = Some((line.run.clone(), key));
                    key
                }
            };
            match key.and_then(|key| dispatch.runs.get_mut(&key)) {
                Some(pending) => report::live(pending, line),
                None => {
                    if let Ok(id) = Uuid::parse_str(&line.run) {
                        dispatch.recent.show(id, &line);
                    }
                }
            }
        }
    }

    fn done(&self, key: u64, report: &[u8]) {
        if let Some(pending) = self.take_run(key) {
            let value = pending.run.runner_data::<RayObject>().map(|object| ResultData::Remote(object));
            let ended = report::Ended::of(&pending);
            report::apply(pending, report, value);
            if !ended.completed() {
                lock(&self.dispatch).recent.keep(ended);
            }
        }
    }

    fn answer(&self, request: u64, answer: Result<Answer, String>) {
        if let Some(sender) = lock(&self.dispatch).requests.remove(&request) {
            let _ = sender.send(answer);
        }
    }
}

impl prefect::runner::StopOnInterrupt for Shared {
    fn stop_on_interrupt(&self) {
        self.stop_processes();
    }
}

/// An exit status in words: "killed by signal 9", "exit status 1".
fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(status) => match (status.signal(), status.code()) {
            (Some(signal), _) => format!("killed by signal {signal}"),
            (None, Some(code)) => format!("exit status {code}"),
            (None, None) => status.to_string(),
        },
        None => "still exiting".to_owned(),
    }
}

fn read_replies(mut replies: BufReader<ChildStdout>, shared: Weak<Shared>) {
    loop {
        let reply = read_message::<Reply>(&mut replies);
        let Some(shared) = shared.upgrade() else { return };
        match reply {
            Ok(Some(Reply::Bye)) | Ok(None) | Err(_) => {
                // A bridge stopped on purpose has its runs ended by whoever stopped it (or,
                // on a signal, left as they are while the process goes).
                if shared.is_alive() {
                    let reason = shared.death();
                    tracing::error!(target: "prefect_ray", "{reason}");
                    shared.fail_everything(&reason);
                    // What it started (a temporary instance's processes) and its files go
                    // now, not when the runner ends: the program may never get that far.
                    shared.stop_processes_if_idle();
                }
                return;
            }
            Ok(Some(reply)) => shared.on_reply(reply),
        }
    }
}
