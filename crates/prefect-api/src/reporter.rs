//! Reporting to a Prefect server from a program that must never wait on it.
//!
//! A [`Reporter`] owns one background thread that does every request, in the order the
//! program asked for them, one at a time (a Prefect server on SQLite answers `503` to
//! concurrent writers). Events and log lines queue up while a request is in flight and go
//! out together, up to 500 events or 1,000 log lines a request. The few calls whose answers
//! matter to the program (a flow run's state, which the server's orchestration decides) wait
//! for their turn and their answer, but never longer than the caller says.
//!
//! A request that fails because the server is unreachable or busy is tried again with
//! exponential backoff. If it still fails, the server is taken to be down: one warning is
//! logged, nothing waits on it, and what could not be sent (events, logs, flow run states)
//! is kept in a bounded backlog, the oldest dropped first. Every 2 seconds the backlog is
//! tried again; once the server answers, it is sent in order and reporting goes on.
//!
//! The server chooses flow run ids itself, so callers name flow runs by ids of their own
//! ("local" ids) and the reporter keeps the mapping. Work for a flow run the server does not
//! know (its creation failed, or happened during an outage) is dropped: a task-run event for
//! an unknown flow run would make the server drop every event recorded with it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::backlog::{Backlog, Batch, Deferred};
use crate::client::Client;
use crate::error::ApiError;
use crate::model::{Event, FlowRunCreate, FlowRunPolicy, LogCreate, Orchestration, StateCreate, TaskRunCreate};

/// How long requests are retried while the server cannot be reached at all.
const UNREACHABLE_BUDGET: Duration = Duration::from_secs(3);
/// How long requests are retried while the server answers that it is busy.
const BUSY_BUDGET: Duration = Duration::from_secs(15);
/// How long requests are not even tried after the server was found down.
const COOLDOWN: Duration = Duration::from_secs(2);
/// How often the backlog is tried again while the server is down.
const RETRY_BACKLOG: Duration = Duration::from_secs(2);
/// How much work (events, log lines, states) is kept while the server is down.
const MAX_BACKLOG: usize = 100_000;
/// How long the worker waits for more work before sending a small batch.
const LINGER: Duration = Duration::from_millis(20);
const MAX_EVENTS_PER_REQUEST: usize = 500;
const MAX_LOGS_PER_REQUEST: usize = 1000;
/// Log lines longer than this are cut, as Prefect's client does.
const MAX_LOG_BYTES: usize = 1_000_000;
/// Queued jobs beyond this are dropped, so a stalled server cannot eat the program's memory.
const MAX_QUEUED: usize = 200_000;
/// How many finished flow runs keep their server ids for [`Reporter::server_flow_run_id`].
const REMEMBERED_RUNS: usize = 4096;

/// A flow run to create on the server.
#[derive(Clone, Debug)]
pub struct NewFlowRun {
    /// The caller's id for the run; the server gives it another.
    pub local_id: Uuid,
    /// The flow's name; the flow is created when the server does not know it yet.
    pub flow_name: String,
    /// The run's name.
    pub name: String,
    /// Its arguments, as JSON.
    pub parameters: Value,
    /// How many retries it may use.
    pub retries: u32,
    /// Seconds between its attempts.
    pub retry_delay_seconds: f64,
    /// Tags.
    pub tags: Vec<String>,
    /// For a subflow: the local id of the parent flow run, and the task run that stands for
    /// the subflow in it (created first; its `flow_run_id` is filled in). The server then
    /// mirrors the subflow's states onto that task run.
    pub parent: Option<(Uuid, TaskRunCreate)>,
}

type Reply<T> = mpsc::Sender<Option<T>>;

enum Job {
    CreateFlowRun(Box<NewFlowRun>, Reply<Uuid>),
    SetFlowRunState(Uuid, StateCreate, Reply<Orchestration>),
    Event(Option<Uuid>, Box<Event>),
    Log(Option<Uuid>, LogCreate),
    Flush(Option<Uuid>, Reply<()>),
}

impl Job {
    fn is_waited_for(&self) -> bool {
        !matches!(self, Job::Event(..) | Job::Log(..))
    }
}

/// Whether the server is up, as far as the reporter knows.
#[derive(Default)]
struct Health {
    /// Until when requests are not tried.
    down_until: Option<Instant>,
    /// Whether the last request failed for want of a server.
    down: bool,
    /// Whether it was ever reached.
    reached: bool,
}

struct Shared {
    client: Client,
    health: Mutex<Health>,
    runs: Mutex<Runs>,
    queued: AtomicUsize,
    dropped: AtomicUsize,
}

/// Local flow run ids and the server's.
#[derive(Default)]
struct Runs {
    ids: HashMap<Uuid, Uuid>,
    finished: VecDeque<Uuid>,
}

impl Shared {
    fn is_down(&self) -> bool {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.down_until.is_some_and(|until| Instant::now() < until)
    }

    fn server_id(&self, local: Uuid) -> Option<Uuid> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).ids.get(&local).copied()
    }
}

/// Reports flow runs, task-run events and logs to one Prefect server from a background
/// thread, so the program never waits on the server for long.
///
/// The thread does every request, in the order the program asked for them, one at a time
/// (a Prefect server on SQLite answers `503` to concurrent writers). Events and log lines
/// queue up while a request is in flight and go out together, up to 500 events or 1,000 log
/// lines a request. The calls whose answers matter (a flow run's creation and states) wait
/// for their turn and their answer, never longer than the caller says.
///
/// A request that fails because the server is unreachable or busy (408, 429, 502, 503, 504)
/// is tried again with exponential backoff, for up to 3 s (unreachable) or 15 s (busy). If it
/// still fails, the server is taken to be down: one warning is logged, calls that wait for an
/// answer get `None` at once, and events, logs and flow run states are kept (up to 100,000,
/// the oldest dropped first) and sent in order once the server answers again, which the
/// reporter checks every 2 s.
///
/// The server chooses flow run ids itself, so callers name flow runs by ids of their own
/// ("local" ids) and the reporter keeps the mapping. Work for a flow run the server does not
/// know (its creation failed, or happened during an outage) is dropped: a task-run event for
/// an unknown flow run would make the server drop every event recorded with it.
///
/// # Examples
///
/// A reporter for a server that is not running gives up quickly and answers `None`:
///
/// ```
/// use std::time::{Duration, Instant};
/// use prefect_api::{Client, NewFlowRun, Reporter};
///
/// let reporter = Reporter::new(Client::new("http://127.0.0.1:9/api"));
/// let started = Instant::now();
/// let run = NewFlowRun {
///     local_id: uuid::Uuid::new_v4(),
///     flow_name: "nowhere".into(),
///     name: "lost-run".into(),
///     parameters: serde_json::json!({}),
///     retries: 0,
///     retry_delay_seconds: 0.0,
///     tags: vec![],
///     parent: None,
/// };
/// assert_eq!(reporter.create_flow_run(run, Duration::from_secs(10)), None);
/// assert!(started.elapsed() < Duration::from_secs(5));
/// assert!(!reporter.is_reachable());
/// ```
pub struct Reporter {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").field("client", &self.shared.client).finish()
    }
}

impl Reporter {
    /// A reporter sending through `client`, with its worker thread started.
    ///
    /// # Panics
    ///
    /// If the operating system cannot start a thread.
    pub fn new(client: Client) -> Self {
        let shared = Arc::new(Shared {
            client,
            health: Mutex::default(),
            runs: Mutex::default(),
            queued: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
        });
        let (jobs, receiver) = mpsc::channel();
        let worker = Worker {
            shared: shared.clone(),
            flows: HashMap::new(),
            rejected_paths: HashSet::new(),
            backlog: Backlog::new(MAX_BACKLOG),
        };
        std::thread::Builder::new()
            .name("prefect-reporter".into())
            .spawn(move || worker.run(receiver))
            .expect("could not start the Prefect reporter's thread");
        Self { shared, jobs }
    }

    /// The client it sends through.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Whether the server answered the last request (or none was made yet).
    pub fn is_reachable(&self) -> bool {
        !self.shared.health.lock().unwrap_or_else(|p| p.into_inner()).down
    }

    /// How many events and log lines were dropped: because the server refused them, the
    /// flow run was unknown to it, too much was queued, or an outage outlasted the backlog.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The server's id of the flow run the caller calls `local_id`, once it was created.
    pub fn server_flow_run_id(&self, local_id: Uuid) -> Option<Uuid> {
        self.shared.server_id(local_id)
    }

    /// Creates the flow (if new) and the flow run, in state `Pending`; waits at most `wait`
    /// for the server's id of the run. Work queued for the run after this call is sent once
    /// the run exists, so callers need not wait.
    pub fn create_flow_run(&self, run: NewFlowRun, wait: Duration) -> Option<Uuid> {
        self.ask(|reply| Job::CreateFlowRun(Box::new(run), reply), wait).flatten()
    }

    /// Reports for a flow run that exists on the server already (a deployment's run, created
    /// by the server): work for `server_id` is sent to it from now on.
    pub fn adopt_flow_run(&self, server_id: Uuid) {
        self.shared.runs.lock().unwrap_or_else(|p| p.into_inner()).ids.insert(server_id, server_id);
    }

    /// Proposes a state for a flow run, after everything queued before it has been sent,
    /// and returns the server's decision; `None` if the server is down, does not know the
    /// run, or did not answer within `wait` (the caller goes on as if it had accepted).
    /// While the server is down the state is kept and proposed once it is back.
    pub fn set_flow_run_state(&self, local_id: Uuid, state: StateCreate, wait: Duration) -> Option<Orchestration> {
        if self.shared.is_down() {
            let (reply, _) = mpsc::channel();
            self.send(Job::SetFlowRunState(local_id, state, reply));
            return None;
        }
        self.ask(|reply| Job::SetFlowRunState(local_id, state, reply), wait).flatten()
    }

    /// Queues an event. For an event about a run in a flow run, `flow_run` is the local id of
    /// that flow run: a related resource with role `flow-run` is added for it, and the event
    /// is dropped if the server does not know the flow run.
    pub fn emit(&self, flow_run: Option<Uuid>, event: Event) {
        self.send(Job::Event(flow_run, Box::new(event)));
    }

    /// Queues a log line; its `flow_run_id` is the local id, replaced by the server's.
    pub fn log(&self, mut log: LogCreate) {
        if log.message.len() > MAX_LOG_BYTES {
            let mut end = MAX_LOG_BYTES;
            while !log.message.is_char_boundary(end) {
                end -= 1;
            }
            log.message.truncate(end);
            log.message.push_str("... [truncated]");
        }
        self.send(Job::Log(log.flow_run_id, log));
    }

    /// Waits at most `wait` until everything queued so far has been sent (or dropped);
    /// returns whether it was. Returns at once while the server is down.
    pub fn flush(&self, wait: Duration) -> bool {
        self.ask(|reply| Job::Flush(None, reply), wait).is_some()
    }

    /// [`flush`](Self::flush), for the end of a flow run: afterwards its id mapping is kept
    /// only among the last few thousand finished runs.
    pub fn flush_flow_run(&self, local_id: Uuid, wait: Duration) -> bool {
        self.ask(|reply| Job::Flush(Some(local_id), reply), wait).is_some()
    }

    /// Sends a job that expects an answer, and waits for it; `None` when the server is down
    /// or the answer takes longer than `wait`.
    fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job, wait: Duration) -> Option<Option<T>> {
        if self.shared.is_down() {
            return None;
        }
        let (reply, answer) = mpsc::channel();
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        if self.jobs.send(job(reply)).is_err() {
            return None;
        }
        answer.recv_timeout(wait).ok()
    }

    fn send(&self, job: Job) {
        if self.shared.queued.load(Ordering::Relaxed) >= MAX_QUEUED {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.jobs.send(job);
    }
}

/// The background thread's state.
struct Worker {
    shared: Arc<Shared>,
    /// Flow ids by name.
    flows: HashMap<String, Uuid>,
    /// Paths whose requests the server refused for good, warned about once each.
    rejected_paths: HashSet<String>,
    /// What could not be sent while the server was down, oldest first.
    backlog: Backlog,
}

/// Why a request was not answered.
enum Failure {
    /// The server is down (or was found down a moment ago): try again later.
    Down,
    /// The server refused it for good.
    Rejected,
}

impl Worker {
    fn run(mut self, receiver: mpsc::Receiver<Job>) {
        loop {
            // While work is held back, wake up now and then to try the server again.
            let first = if self.backlog.is_empty() {
                receiver.recv().map_err(|_| ())
            } else {
                match receiver.recv_timeout(RETRY_BACKLOG) {
                    Ok(job) => Ok(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.send_backlog(true);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
                }
            };
            let Ok(first) = first else { return };
            let mut batch = vec![first];
            let deadline = Instant::now() + LINGER;
            while !batch.last().is_some_and(Job::is_waited_for) && batch.len() < 10 * MAX_EVENTS_PER_REQUEST {
                let now = Instant::now();
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(mpsc::TryRecvError::Empty) if now < deadline => match receiver.recv_timeout(deadline - now) {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    },
                    Err(_) => break,
                }
            }
            self.shared.queued.fetch_sub(batch.len(), Ordering::Relaxed);
            self.process(batch);
        }
    }

    fn process(&mut self, batch: Vec<Job>) {
        if !self.backlog.is_empty() {
            self.send_backlog(false);
        }
        let mut events = Vec::new();
        let mut logs = Vec::new();
        for job in batch {
            match job {
                Job::Event(flow_run, mut event) => {
                    if let Some(local) = flow_run {
                        let Some(server) = self.shared.server_id(local) else {
                            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let mut related = Map::new();
                        related.insert("prefect.resource.id".into(), json!(format!("prefect.flow-run.{server}")));
                        related.insert("prefect.resource.role".into(), json!("flow-run"));
                        event.related.insert(0, related);
                    }
                    events.push(*event);
                    if events.len() >= MAX_EVENTS_PER_REQUEST {
                        self.send_events(&mut events);
                    }
                }
                Job::Log(flow_run, mut log) => {
                    log.flow_run_id = flow_run.and_then(|local| self.shared.server_id(local));
                    if log.flow_run_id.is_none() {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    logs.push(log);
                    if logs.len() >= MAX_LOGS_PER_REQUEST {
                        self.send_logs(&mut logs);
                    }
                }
                Job::CreateFlowRun(run, reply) => {
                    self.send_events(&mut events);
                    let _ = reply.send(self.create_flow_run(*run));
                }
                Job::SetFlowRunState(local, state, reply) => {
                    self.send_events(&mut events);
                    self.send_logs(&mut logs);
                    let answer = self.shared.server_id(local).and_then(|server| self.set_state(server, state));
                    let _ = reply.send(answer);
                }
                Job::Flush(finished, reply) => {
                    self.send_events(&mut events);
                    self.send_logs(&mut logs);
                    if let Some(local) = finished {
                        let mut runs = self.shared.runs.lock().unwrap_or_else(|p| p.into_inner());
                        runs.finished.push_back(local);
                        while runs.finished.len() > REMEMBERED_RUNS {
                            if let Some(old) = runs.finished.pop_front()
                                && let Some(server) = runs.ids.remove(&old)
                            {
                                // The run's other name goes too.
                                runs.ids.retain(|_, id| *id != server);
                            }
                        }
                    }
                    let _ = reply.send(Some(()));
                }
            }
        }
        self.send_events(&mut events);
        self.send_logs(&mut logs);
    }

    fn create_flow_run(&mut self, run: NewFlowRun) -> Option<Uuid> {
        let flow_id = match self.flows.get(&run.flow_name) {
            Some(id) => *id,
            None => {
                let id = self.call("/flows/", false, |c| c.create_flow(&run.flow_name)).ok()?;
                self.flows.insert(run.flow_name.clone(), id);
                id
            }
        };
        let mut parent_task_run_id = None;
        if let Some((parent_local, mut task_run)) = run.parent {
            task_run.flow_run_id = Some(self.shared.server_id(parent_local)?);
            parent_task_run_id = Some(self.call("/task_runs/", false, |c| c.create_task_run(&task_run)).ok()?);
        }
        let create = FlowRunCreate {
            name: Some(run.name),
            flow_id,
            parameters: run.parameters,
            parent_task_run_id,
            empirical_policy: FlowRunPolicy { retries: run.retries, retry_delay: run.retry_delay_seconds },
            tags: run.tags,
            state: StateCreate::new("PENDING", "Pending"),
        };
        let server = self.call("/flow_runs/", false, |c| c.create_flow_run(&create)).ok()?;
        let mut runs = self.shared.runs.lock().unwrap_or_else(|p| p.into_inner());
        // Callers may go on naming the run by the server's id, once they know it.
        runs.ids.insert(run.local_id, server);
        runs.ids.insert(server, server);
        Some(server)
    }

    fn send_events(&mut self, events: &mut Vec<Event>) {
        if !events.is_empty() {
            self.send_now_or_keep(Batch::Events(std::mem::take(events)));
        }
    }

    fn send_logs(&mut self, logs: &mut Vec<LogCreate>) {
        if !logs.is_empty() {
            self.send_now_or_keep(Batch::Logs(std::mem::take(logs)));
        }
    }

    /// Proposes a flow run's state; kept for later if the server is down.
    fn set_state(&mut self, server: Uuid, state: StateCreate) -> Option<Orchestration> {
        if !self.backlog.is_empty() {
            self.keep(Batch::State(server, Box::new(state)));
            return None;
        }
        let path = format!("/flow_runs/{server}/set_state");
        match self.call(&path, false, |c| c.set_flow_run_state(server, &state, false)) {
            Ok(answer) => Some(answer),
            Err(Failure::Down) => {
                self.keep(Batch::State(server, Box::new(state)));
                None
            }
            Err(Failure::Rejected) => None,
        }
    }

    /// Sends a batch, unless work is held back already (it then waits its turn) or the
    /// server is down (it is kept).
    fn send_now_or_keep(&mut self, batch: Batch) {
        if !self.backlog.is_empty() {
            self.keep(batch);
            return;
        }
        if let Err((failure, batch)) = self.send_batch(batch, false) {
            match failure {
                Failure::Down => self.keep(batch),
                Failure::Rejected => self.drop_batch(&batch),
            }
        }
    }

    /// One request for a batch; the batch back if it failed.
    fn send_batch(&mut self, batch: Batch, probe: bool) -> Result<(), (Failure, Batch)> {
        let sent = match &batch {
            Batch::Events(events) => self.call("/events", probe, |c| c.emit_events(events)),
            Batch::Logs(logs) => self.call("/logs/", probe, |c| c.create_logs(logs)),
            Batch::State(server, state) => self
                .call(&format!("/flow_runs/{server}/set_state"), probe, |c| c.set_flow_run_state(*server, state, false))
                .map(|_| ()),
        };
        sent.map_err(|failure| (failure, batch))
    }

    fn keep(&mut self, batch: Batch) {
        match batch {
            Batch::Events(events) => events.into_iter().for_each(|e| self.backlog.push(Deferred::Event(Box::new(e)))),
            Batch::Logs(logs) => logs.into_iter().for_each(|l| self.backlog.push(Deferred::Log(l))),
            Batch::State(server, state) => self.backlog.push(Deferred::State(server, state)),
        }
    }

    fn drop_batch(&self, batch: &Batch) {
        let count = match batch {
            Batch::Events(events) => events.len(),
            Batch::Logs(logs) => logs.len(),
            Batch::State(..) => 1,
        };
        self.shared.dropped.fetch_add(count, Ordering::Relaxed);
    }

    /// Sends what was held back, in order, until the server fails again. `probe`: try even
    /// though the server was found down a moment ago.
    fn send_backlog(&mut self, probe: bool) {
        let held = self.backlog.len();
        let mut probe = probe;
        while let Some(batch) = self.backlog.take_batch(MAX_EVENTS_PER_REQUEST, MAX_LOGS_PER_REQUEST) {
            match self.send_batch(batch, probe) {
                Ok(()) => probe = false,
                Err((Failure::Down, batch)) => {
                    self.backlog.put_back(batch);
                    return;
                }
                Err((Failure::Rejected, batch)) => self.drop_batch(&batch),
            }
        }
        let dropped = self.backlog.take_dropped();
        self.shared.dropped.fetch_add(dropped, Ordering::Relaxed);
        let lost = if dropped > 0 {
            format!("; {dropped} older ones did not fit in the backlog and were dropped")
        } else {
            String::new()
        };
        tracing::info!(target: "prefect_api", "Prefect reporting: sent the {held} events, logs and states held while the server was down{lost}");
    }

    /// Makes one request, retrying transient failures with backoff. While the server is
    /// down it is not tried at all, or, after the cooldown or when `probe` says so, once.
    fn call<T>(
        &mut self,
        path: &str,
        probe: bool,
        request: impl Fn(&Client) -> Result<T, ApiError>,
    ) -> Result<T, Failure> {
        let probing = {
            let health = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
            match health.down_until {
                Some(until) if Instant::now() < until && !probe => return Err(Failure::Down),
                Some(_) => true,
                None => false,
            }
        };
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let error = match request(&self.shared.client) {
                Ok(value) => {
                    self.mark_up();
                    return Ok(value);
                }
                Err(error) => error,
            };
            if !error.is_transient() {
                if self.rejected_paths.insert(path.split('/').take(2).collect::<Vec<_>>().join("/")) {
                    tracing::warn!(target: "prefect_api", "Prefect reporting: {error}");
                }
                return Err(Failure::Rejected);
            }
            let budget = if matches!(error, ApiError::Unreachable { .. }) { UNREACHABLE_BUDGET } else { BUSY_BUDGET };
            let pause = error.retry_after().unwrap_or(delay).min(Duration::from_secs(5));
            if probing || started.elapsed() + pause > budget {
                self.mark_down(&error, probing);
                return Err(Failure::Down);
            }
            std::thread::sleep(pause);
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    fn mark_up(&self) {
        let mut health = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health.down = false;
        if health.down_until.take().is_some() {
            tracing::info!(target: "prefect_api", "The Prefect server at {} is reachable again; reporting goes on", self.shared.client.api_url());
        }
        health.reached = true;
    }

    fn mark_down(&self, error: &ApiError, was_down: bool) {
        let mut health = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health.down_until = Some(Instant::now() + COOLDOWN);
        health.down = true;
        if !was_down {
            tracing::warn!(
                target: "prefect_api",
                "{error}. Flows go on; what they report is kept (up to {MAX_BACKLOG} events, logs and states) and sent once the server is back"
            );
        }
    }
}

/// A state-change event for a task run whose states the client decides, the way
/// Prefect's own client reports task runs (`prefect.task-run.<state name>`); the server
/// records the run from `task_run`, which must carry every field cumulatively (run count,
/// start and end times), and the state's time from `occurred`.
pub fn task_run_state_event(
    task_run_id: Uuid,
    task_run_name: &str,
    occurred: chrono::DateTime<chrono::Utc>,
    state: &StateCreate,
    task_run: Value,
    tags: &[String],
) -> Event {
    let mut resource = Map::new();
    resource.insert("prefect.resource.id".into(), json!(format!("prefect.task-run.{task_run_id}")));
    resource.insert("prefect.resource.name".into(), json!(task_run_name));
    resource.insert("prefect.state-name".into(), json!(state.name));
    resource.insert("prefect.state-type".into(), json!(state.state_type));
    resource.insert("prefect.state-message".into(), json!(state.message.clone().unwrap_or_default()));
    resource.insert("prefect.state-timestamp".into(), json!(occurred));
    resource.insert("prefect.run-count".into(), json!(task_run["run_count"].to_string()));
    resource.insert("prefect.orchestration".into(), json!("client"));
    let related = tags
        .iter()
        .map(|tag| {
            let mut related = Map::new();
            related.insert("prefect.resource.id".into(), json!(format!("prefect.tag.{tag}")));
            related.insert("prefect.resource.role".into(), json!("tag"));
            related
        })
        .collect();
    Event {
        id: Uuid::new_v4(),
        occurred,
        event: format!("prefect.task-run.{}", state.name),
        resource,
        related,
        payload: json!({
            "validated_state": {
                "type": state.state_type,
                "name": state.name,
                "message": state.message.clone().unwrap_or_default(),
                "state_details": state.state_details,
                "data": state.data,
            },
            "task_run": task_run,
        }),
    }
}
