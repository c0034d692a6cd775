//! Flow runs: what calling a `#[flow]` function does.
//!
//! # How a flow run's final state is decided
//!
//! Following Prefect 3:
//! - the flow function returns `Err`, panics, or overruns its timeout: **Failed**, with that
//!   error as the message;
//! - it returns normally, but a future it returned (any future still alive once the function
//!   has returned) belongs to a run that did not complete: **Failed**, naming that run;
//! - otherwise **Completed**, even if task runs whose futures the flow dropped failed; resolve
//!   or return a future to make its failure the flow's.
//! - an option is out of range: **Failed**, before the runner starts;
//! - the task runner cannot start: **Crashed**.
//!
//! A flow run waits for every task run it submitted before it ends, so no run is left
//! behind; then values that returned futures still refer to are copied into this process,
//! and the runner is stopped. A failed flow run with `retries` left runs the function again.
//!
//! One loop, [`drive`], does all of this for every kind of flow function; what differs
//! between a sync function, a sync function with a timeout and an async function is how one
//! attempt runs, which [`attempt`] holds.

mod attempt;
mod live;

pub(crate) use live::{cancel, pause};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;

use crate::context::{self, FlowRunContext};
use crate::error::{FlowError, TaskError};
use crate::observe::{self, FlowRunInfo, Orchestration, SubflowParent, TaskRunInfo};
use crate::options::FlowOptions;
use crate::runner::TaskRunner;
use crate::state::{State, StateType};
use crate::{logging, names, task_engine};

use attempt::{AsyncAttempts, Attempts, SyncAttempts, TimedAttempts};

/// A flow's name and key; `#[flow]` generates one per flow function.
#[derive(Debug)]
pub struct FlowDefinition {
    /// The flow's name: the function's, with `_` turned into `-`, unless `#[flow(name = ...)]` says otherwise.
    pub name: &'static str,
    /// The function's path: `module::path::function`.
    pub key: &'static str,
    /// What to call when a run ends, per final state.
    pub hooks: crate::hooks::StateHooks<crate::hooks::FlowHook>,
}

thread_local! {
    /// The id and name of a flow run that exists already, for the next flow called on this
    /// thread outside any flow: a served deployment's run.
    static ADOPT: std::cell::RefCell<Option<(Uuid, String)>> = const { std::cell::RefCell::new(None) };
}

/// Makes the next flow called on this thread (outside any flow) run as the flow run `id`
/// named `name`, which exists already where runs are observed.
pub(crate) fn adopt_next(id: Uuid, name: String) {
    ADOPT.set(Some((id, name)));
}

/// Runs a sync flow function without a timeout as a flow run, on this thread; the function
/// returns `Err(message)` for a failure.
pub fn run_flow<R>(
    flow: &'static FlowDefinition,
    options: FlowOptions,
    parameters: Value,
    runner: impl TaskRunner,
    body: impl FnMut() -> Result<R, String>,
) -> Result<R, FlowError> {
    let run = FlowRun::begin(flow, options, parameters, Arc::new(runner))?;
    pollster::block_on(drive(run, SyncAttempts(body)))
}

/// [`run_flow`] with a timeout: each attempt runs on a thread of its own, abandoned when it
/// overruns (it runs on until its code returns, but the flow run fails at once, and task
/// runs it has not started yet are cancelled).
pub fn run_flow_timed<R: Send + 'static>(
    flow: &'static FlowDefinition,
    options: FlowOptions,
    parameters: Value,
    runner: impl TaskRunner,
    body: impl FnMut() -> Result<R, String> + Send + 'static,
) -> Result<R, FlowError> {
    let run = FlowRun::begin(flow, options, parameters, Arc::new(runner))?;
    let limit = run.options.timeout();
    pollster::block_on(drive(run, TimedAttempts::new(body, limit)))
}

/// Runs an async flow function as a flow run. The runner starts and stops on the calling
/// thread (starting a Ray cluster blocks for a few seconds); everything else awaits.
pub async fn run_flow_async<R, F>(
    flow: &'static FlowDefinition,
    options: FlowOptions,
    parameters: Value,
    runner: impl TaskRunner,
    body: impl FnMut() -> F,
) -> Result<R, FlowError>
where
    F: Future<Output = Result<R, String>>,
{
    let run = FlowRun::begin(flow, options, parameters, Arc::new(runner))?;
    let limit = run.options.timeout();
    drive(run, AsyncAttempts { body, limit }).await
}

/// How one attempt of the flow function ended without a value.
#[derive(Debug)]
enum AttemptFailure {
    /// It returned `Err` (the message says so) or panicked.
    Failed(String),
    /// It overran the flow's timeout.
    TimedOut(Duration),
    /// A future it returned belongs to a run that did not complete.
    ReturnedRunFailed { message: String, source: Box<TaskError> },
}

impl AttemptFailure {
    fn message(&self) -> String {
        match self {
            Self::Failed(message) | Self::ReturnedRunFailed { message, .. } => message.clone(),
            Self::TimedOut(limit) => timeout_message(*limit),
        }
    }
}

/// The one retry loop of every flow run: runs attempts until one succeeds or retries run
/// out, waiting for the task runs each attempt submitted, then ends the run.
async fn drive<R>(run: FlowRun, mut attempts: impl Attempts<R>) -> Result<R, FlowError> {
    let mut attempt = 0;
    loop {
        let outcome = attempts.attempt(&run.context).await;
        attempts.wait_idle(&run.context).await;
        let outcome = run.check_returned_futures(outcome);
        match run.retry_delay(&outcome, &mut attempt) {
            Some(delay) => {
                if let Err(error) = run.propose(State::awaiting_retry(Utc::now() + delay)) {
                    return Err(run.abort(error));
                }
                attempts.pause(delay).await;
                if let Err(error) = run.propose(State::retrying()) {
                    return Err(run.abort(error));
                }
            }
            None => match run.ask_to_fail(&outcome) {
                FinalAnswer::Retry(delay) => {
                    attempts.pause(delay).await;
                    if let Err(error) = run.propose(State::retrying()) {
                        return Err(run.abort(error));
                    }
                }
                FinalAnswer::Decided(state) => return run.finish(outcome, Some(state)),
                FinalAnswer::NotAsked => return run.finish(outcome, None),
            },
        }
    }
}

/// The server's answer to a failed run's final state.
enum FinalAnswer {
    /// Run the flow again after this long.
    Retry(Duration),
    /// The run is in this final state on the server.
    Decided(State),
    /// Nothing was proposed: the run ends as usual.
    NotAsked,
}

/// The final state of a failed attempt.
fn failure_state(failure: &AttemptFailure) -> State {
    match failure {
        AttemptFailure::TimedOut(limit) => State::timed_out(timeout_message(*limit)),
        failure => State::failed(failure.message()),
    }
}

fn timeout_message(limit: Duration) -> String {
    format!("Flow run exceeded timeout of {} second(s)", task_engine::seconds_text(limit))
}

/// A flow run between its start and its end. It ends exactly once: through `finish` or
/// `abort`, which consume it, or, if the engine loses it to a panic, `Crashed` on drop.
struct FlowRun {
    flow: &'static FlowDefinition,
    options: FlowOptions,
    info: FlowRunInfo,
    context: Arc<FlowRunContext>,
    ended: bool,
}

impl FlowRun {
    fn begin(
        flow: &'static FlowDefinition,
        options: FlowOptions,
        parameters: Value,
        runner: Arc<dyn TaskRunner>,
    ) -> Result<Self, FlowError> {
        logging::init();
        crate::progress::init();
        crate::reporting::init();
        let parent = context::current().filter(|parent| parent.info.is_some());
        let adopted = if parent.is_none() { ADOPT.take() } else { None };
        let (id, name) = adopted.clone().unwrap_or_else(|| (Uuid::new_v4(), names::generate()));
        let parent_link = parent.as_ref().and_then(|parent| {
            let parent_info = parent.info.as_ref()?;
            let task_run_id = Uuid::new_v4();
            Some(SubflowParent {
                flow_run_id: parent_info.id,
                task_run: TaskRunInfo {
                    id: task_run_id,
                    name: format!("{}-{}", flow.name, &task_run_id.simple().to_string()[..3]),
                    task_name: flow.name,
                    task_key: flow.key,
                    dynamic_key: parent.next_dynamic_key(flow.key),
                    flow_run_id: Some(parent_info.id),
                    tags: Vec::new(),
                    inputs: Vec::new(),
                    retries: 0,
                    retry_delay_seconds: Vec::new(),
                    created: Utc::now(),
                },
            })
        });
        let mut info = FlowRunInfo {
            id,
            name: name.clone(),
            flow_name: flow.name.to_owned(),
            parameters,
            parent: parent_link,
            retries: options.retries,
        };
        if adopted.is_some() {
            observe::adopt_flow_run(&info);
        } else if let Some(named) = observe::create_flow_run(&info) {
            // With a Prefect server, the run's id is the one the server gave it.
            info.id = named;
        }
        let id = info.id;
        let span = match &parent {
            Some(parent) => {
                tracing::info_span!(parent: &*parent.span, "flow_run", name = %name, id = %id)
            }
            None => tracing::info_span!(parent: None, "flow_run", name = %name, id = %id),
        };
        let runner = crate::concurrency::gate(runner);
        let mut context = FlowRunContext::new(Some(info.clone()), span, runner);
        context.persist_result = options.persist_result.or(parent.as_ref().and_then(|p| p.persist_result));
        let context = Arc::new(context);
        // Ctrl-C from now on ends this run and its task runs Crashed where they are observed.
        crate::interrupt::install();
        live::register(&context);
        observe::flow_run_created(&info);
        let mut run = Self { flow, options, info, context, ended: false };
        run.context.span.in_scope(|| {
            tracing::info!(target: "prefect::flow_run", "Beginning flow run '{}' for flow '{}'", run.info.name, flow.name);
        });
        if let Err(source) = run.options.validate() {
            run.end(State::failed(source.to_string()));
            return Err(FlowError::InvalidOptions {
                flow: flow.name.to_owned(),
                flow_run: run.info.name.clone(),
                source,
            });
        }
        if let Err(source) = run.context.span.in_scope(|| run.context.runner.start(&run.info)) {
            let runner = run.context.runner.name();
            run.end(State::crashed(format!("{runner} could not start: {source}")));
            return Err(FlowError::RunnerStart {
                flow: flow.name.to_owned(),
                flow_run: run.info.name.clone(),
                runner,
                source,
            });
        }
        if let Err(error) = run.propose(State::running()) {
            return Err(run.abort(error));
        }
        Ok(run)
    }

    /// Asks the observers (a Prefect server) to let the run enter `state`.
    fn propose(&self, state: State) -> Result<State, FlowError> {
        match self.ask(&state) {
            Orchestration::Accept | Orchestration::Wait(_) => Ok(state),
            Orchestration::Reject(server_state) if server_state.state_type == state.state_type => Ok(server_state),
            Orchestration::Reject(server_state) => Err(self.error_for(
                &server_state,
                format!("the Prefect server put the run in state {server_state} instead of {state}"),
            )),
            Orchestration::Abort(reason) => Err(FlowError::Cancelled {
                flow: self.flow.name.to_owned(),
                flow_run: self.info.name.clone(),
                message: format!("the Prefect server aborted the run: {reason}"),
            }),
        }
    }

    /// The observers' answer to `state`, after waiting as long as they ask (at most 10
    /// minutes in all); a wait beyond that counts as accepted.
    fn ask(&self, state: &State) -> Orchestration {
        let mut waited = Duration::ZERO;
        loop {
            match observe::propose_flow_run_state(&self.info, state) {
                Orchestration::Wait(delay) if waited < Duration::from_secs(600) => {
                    waited += delay;
                    std::thread::sleep(delay);
                }
                answer => return answer,
            }
        }
    }

    /// For a failed attempt with no retries of its own left: proposes the final state
    /// before the run ends, because the server may answer with a retry of its own (a
    /// deployment's run with retries set on the server is rejected into `AwaitingRetry`).
    fn ask_to_fail<R>(&self, outcome: &Result<R, AttemptFailure>) -> FinalAnswer {
        let Err(failure) = outcome else { return FinalAnswer::NotAsked };
        if self.context.cancellation().is_some() || !observe::active() {
            return FinalAnswer::NotAsked;
        }
        let state = failure_state(failure);
        match self.ask(&state) {
            Orchestration::Reject(server) if server.state_type == StateType::Scheduled => {
                let at = server.scheduled_time.unwrap_or_else(Utc::now);
                let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                self.context.span.in_scope(|| {
                    tracing::warn!(
                        target: "prefect::flow_run",
                        "{} - the Prefect server retries the flow run {} second(s) from now",
                        failure.message(),
                        task_engine::seconds_text(delay)
                    );
                });
                FinalAnswer::Retry(delay)
            }
            Orchestration::Reject(server) => FinalAnswer::Decided(server),
            Orchestration::Accept | Orchestration::Wait(_) | Orchestration::Abort(_) => FinalAnswer::Decided(state),
        }
    }

    fn error_for(&self, state: &State, message: String) -> FlowError {
        let (flow, flow_run) = (self.flow.name.to_owned(), self.info.name.clone());
        match state.state_type {
            StateType::Cancelled => FlowError::Cancelled { flow, flow_run, message },
            StateType::Crashed => FlowError::Crashed { flow, flow_run, message },
            _ => FlowError::Failed { flow, flow_run, message },
        }
    }

    /// A flow that returned futures of runs that did not complete has failed.
    fn check_returned_futures<R>(&self, outcome: Result<R, AttemptFailure>) -> Result<R, AttemptFailure> {
        let value = outcome?;
        let returned = self.context.tracker.live_runs();
        let failed: Vec<_> = returned.iter().filter(|run| !run.state().is_completed()).collect();
        match failed.first() {
            Some(first) => {
                let state = first.state();
                let message = format!(
                    "{}/{} returned task run(s) did not complete; '{}' ended in state {state}",
                    failed.len(),
                    returned.len(),
                    first.name(),
                );
                let source = Box::new(TaskError::from_state(first.name(), &state).expect("the run did not complete"));
                Err(AttemptFailure::ReturnedRunFailed { message, source })
            }
            None => Ok(value),
        }
    }

    /// How long to wait before running the function again, if the attempt failed and
    /// retries are left.
    fn retry_delay<R>(&self, outcome: &Result<R, AttemptFailure>, attempt: &mut u32) -> Option<Duration> {
        let failure = outcome.as_ref().err()?;
        if *attempt >= self.options.retries || self.context.cancellation().is_some() {
            return None;
        }
        *attempt += 1;
        self.context.span.in_scope(|| {
            tracing::warn!(
                target: "prefect::flow_run",
                "{} - Retry {}/{} will start {} second(s) from now",
                failure.message(),
                attempt,
                self.options.retries,
                self.options.retry_delay_seconds
            );
        });
        Some(self.options.retry_delay())
    }

    /// Ends a run that the server stopped: releases the runner and says why.
    fn abort(mut self, error: FlowError) -> FlowError {
        self.ended = true;
        live::forget(self.info.id);
        self.context.runner.stop();
        self.context.span.in_scope(|| tracing::warn!(target: "prefect::flow_run", "Aborted: {}", error.message()));
        observe::flow_run_finished(&self.info);
        error
    }

    /// Keeps the values of returned futures, stops the runner, and enters the final state
    /// (unless the server has `decided` it already).
    fn finish<R>(mut self, outcome: Result<R, AttemptFailure>, decided: Option<State>) -> Result<R, FlowError> {
        for run in self.context.tracker.live_runs() {
            run.materialize();
        }
        self.context.runner.stop();
        if let Some(reason) = self.context.cancellation() {
            let message = reason.to_owned();
            self.end(State::cancelled(message.clone()));
            return Err(FlowError::Cancelled {
                flow: self.flow.name.to_owned(),
                flow_run: self.info.name.clone(),
                message,
            });
        }
        let state = match (&outcome, decided) {
            (_, Some(decided)) => self.ended_in(decided),
            (Ok(_), None) => self.end(State::completed()),
            (Err(failure), None) => self.end(failure_state(failure)),
        };
        let (flow, flow_run) = (self.flow.name.to_owned(), self.info.name.clone());
        match (outcome, state.is_completed()) {
            (Ok(value), true) => Ok(value),
            (Err(AttemptFailure::Failed(message)), _) => Err(FlowError::Failed { flow, flow_run, message }),
            (Err(AttemptFailure::TimedOut(timeout)), _) => {
                Err(FlowError::TimedOut { flow, flow_run, message: timeout_message(timeout), timeout })
            }
            (Err(AttemptFailure::ReturnedRunFailed { message, source }), _) => {
                Err(FlowError::TaskFailed { flow, flow_run, message, source })
            }
            (Ok(_), false) => Err(self.error_for(&state, state.message.clone().unwrap_or_else(|| state.to_string()))),
        }
    }

    /// Enters the final state and logs it.
    fn end(&mut self, state: State) -> State {
        let state = self.propose(state.clone()).unwrap_or(state);
        self.ended_in(state)
    }

    /// The run is in its final state `state`: logs it, and lets the observers deliver.
    fn ended_in(&mut self, state: State) -> State {
        self.ended = true;
        live::forget(self.info.id);
        self.context.span.in_scope(|| {
            tracing::info!(target: "prefect::flow_run", "Finished in state {state}");
            crate::hooks::call_each(self.flow.hooks.for_state(&state), |hook| hook(&self.info, &state));
        });
        observe::flow_run_finished(&self.info);
        state
    }
}

impl Drop for FlowRun {
    fn drop(&mut self) {
        if !self.ended {
            self.context.runner.stop();
            self.end(State::crashed("the engine lost the flow run: a panic unwound the thread that ran it"));
        }
    }
}
