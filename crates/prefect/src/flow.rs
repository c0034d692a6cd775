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
//! - the task runner cannot start: **Crashed**.
//!
//! A flow run waits for every task run it submitted before it ends, so no run is left
//! behind; then values that returned futures still refer to are copied into this process,
//! and the runner is stopped. A failed flow run with `retries` left runs the function again.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;

use crate::context::{self, FlowRunContext, WithContext};
use crate::error::FlowError;
use crate::observe::{self, FlowRunInfo, Orchestration, SubflowParent, TaskRunInfo};
use crate::options::FlowOptions;
use crate::runner::TaskRunner;
use crate::state::State;
use crate::task_engine::{self, InTask};
use crate::{logging, names};

/// A flow's name and key; `#[flow]` generates one per flow function.
#[derive(Debug)]
pub struct FlowDefinition {
    /// The flow's name: the function's, with `_` turned into `-`, unless `#[flow(name = ...)]` says otherwise.
    pub name: &'static str,
    /// The function's path: `module::path::function`.
    pub key: &'static str,
}

/// Runs a flow function as a flow run on this thread; the function returns `Err(message)`
/// for a failure. `#[flow]` calls this for a sync flow without a timeout.
pub fn run_flow<R>(
    flow: &'static FlowDefinition,
    options: FlowOptions,
    parameters: Value,
    runner: impl TaskRunner,
    mut body: impl FnMut() -> Result<R, String>,
) -> Result<R, FlowError> {
    let run = FlowRun::begin(flow, options, parameters, Arc::new(runner))?;
    let mut attempt = 0;
    loop {
        let outcome = {
            let _entered = context::enter(run.context.clone());
            let _span = run.context.span.clone().entered();
            task_engine::catch_panic(&mut body).unwrap_or_else(|panic| Err(format!("Flow run panicked: {panic}")))
        };
        run.context.tracker.wait_idle();
        let outcome = run.check_returned_futures(outcome);
        match run.retry_delay(&outcome, &mut attempt) {
            Some(delay) => {
                if let Err(error) = run.propose(State::awaiting_retry(Utc::now() + delay)) {
                    return Err(run.abort(error));
                }
                std::thread::sleep(delay);
                if let Err(error) = run.propose(State::retrying()) {
                    return Err(run.abort(error));
                }
            }
            None => return run.finish(outcome),
        }
    }
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
    let limit = Duration::from_secs_f64(options.timeout_seconds.unwrap_or(f64::MAX / 4.0).max(0.0));
    let run = FlowRun::begin(flow, options, parameters, Arc::new(runner))?;
    let body = Arc::new(Mutex::new(body));
    let mut attempt = 0;
    loop {
        let (sender, receiver) = mpsc::channel();
        let (context, body) = (run.context.clone(), body.clone());
        let spawned = std::thread::Builder::new().name("prefect-flow".into()).spawn(move || {
            let _entered = context::enter(context.clone());
            let _span = context.span.clone().entered();
            let mut body = body.lock().unwrap_or_else(|p| p.into_inner());
            let outcome =
                task_engine::catch_panic(&mut *body).unwrap_or_else(|panic| Err(format!("Flow run panicked: {panic}")));
            let _ = sender.send(outcome);
        });
        let outcome = match spawned {
            Err(error) => Err(format!("could not start a thread for the flow: {error}")),
            Ok(_) => match receiver.recv_timeout(limit) {
                Ok(outcome) => outcome,
                Err(_) => {
                    run.context.runner.cancel_pending("the flow run timed out");
                    Err(timeout_message(limit))
                }
            },
        };
        run.context.tracker.wait_idle();
        let outcome = run.check_returned_futures(outcome);
        match run.retry_delay(&outcome, &mut attempt) {
            Some(delay) => {
                if let Err(error) = run.propose(State::awaiting_retry(Utc::now() + delay)) {
                    return Err(run.abort(error));
                }
                std::thread::sleep(delay);
                if let Err(error) = run.propose(State::retrying()) {
                    return Err(run.abort(error));
                }
            }
            None => return run.finish(outcome),
        }
    }
}

/// Runs an async flow function as a flow run. The runner starts and stops on the calling
/// thread (starting a Ray cluster blocks for a few seconds); everything else awaits.
pub async fn run_flow_async<R, F>(
    flow: &'static FlowDefinition,
    options: FlowOptions,
    parameters: Value,
    runner: impl TaskRunner,
    mut body: impl FnMut() -> F,
) -> Result<R, FlowError>
where
    F: Future<Output = Result<R, String>>,
{
    let timeout = options.timeout_seconds.map(|s| Duration::from_secs_f64(s.max(0.0)));
    let run = FlowRun::begin(flow, options, parameters, Arc::new(runner))?;
    let mut attempt = 0;
    loop {
        let attempt_future =
            WithContext { context: run.context.clone(), future: Box::pin(CatchUnwind(Box::pin(body()))) };
        let outcome = match timeout {
            None => attempt_future.await,
            Some(limit) => match (Deadline {
                future: attempt_future,
                timer: task_engine::runtime().spawn(tokio::time::sleep(limit)),
            })
            .await
            {
                Some(outcome) => outcome,
                None => {
                    run.context.runner.cancel_pending("the flow run timed out");
                    Err(timeout_message(limit))
                }
            },
        };
        run.context.tracker.wait_idle_async().await;
        let outcome = run.check_returned_futures(outcome);
        match run.retry_delay(&outcome, &mut attempt) {
            Some(delay) => {
                if let Err(error) = run.propose(State::awaiting_retry(Utc::now() + delay)) {
                    return Err(run.abort(error));
                }
                let _ = task_engine::runtime().spawn(tokio::time::sleep(delay)).await;
                if let Err(error) = run.propose(State::retrying()) {
                    return Err(run.abort(error));
                }
            }
            None => return run.finish(outcome),
        }
    }
}

fn timeout_message(limit: Duration) -> String {
    format!("Flow run exceeded timeout of {} second(s)", task_engine::seconds_text(limit))
}

/// A flow run between its start and its end.
struct FlowRun {
    flow: &'static FlowDefinition,
    options: FlowOptions,
    info: FlowRunInfo,
    context: Arc<FlowRunContext>,
}

impl FlowRun {
    fn begin(
        flow: &'static FlowDefinition,
        options: FlowOptions,
        parameters: Value,
        runner: Arc<dyn TaskRunner>,
    ) -> Result<Self, FlowError> {
        logging::init();
        crate::reporting::init();
        let parent = context::current().filter(|parent| parent.info.is_some());
        let id = Uuid::new_v4();
        let name = names::generate();
        let parent_link = parent.as_ref().and_then(|parent| {
            let parent_info = parent.info.as_ref()?;
            let task_run_id = Uuid::new_v4();
            Some(SubflowParent {
                flow_run_id: parent_info.id,
                task_run: TaskRunInfo {
                    id: task_run_id,
                    name: format!("{}-{}", flow.name, &task_run_id.simple().to_string()[..3]),
                    task_name: flow.name.to_owned(),
                    task_key: flow.key.to_owned(),
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
        let info = FlowRunInfo {
            id,
            name: name.clone(),
            flow_name: flow.name.to_owned(),
            parameters,
            parent: parent_link,
            retries: options.retries,
        };
        let span = match &parent {
            Some(parent) => {
                tracing::info_span!(parent: &parent.span, "flow_run", name = %name, id = %id)
            }
            None => tracing::info_span!(parent: None, "flow_run", name = %name, id = %id),
        };
        let context = Arc::new(FlowRunContext::new(Some(info.clone()), span, runner));
        observe::flow_run_created(&info);
        let run = Self { flow, options, info, context };
        run.context.span.in_scope(|| {
            tracing::info!(target: "prefect::flow_run", "Beginning flow run '{}' for flow '{}'", run.info.name, flow.name);
        });
        if let Err(error) = run.context.span.in_scope(|| run.context.runner.start(&run.info)) {
            let message = format!("{} could not start: {error}", run.context.runner.name());
            run.end(State::crashed(message.clone()));
            return Err(FlowError::Crashed { flow: flow.name.to_owned(), flow_run: run.info.name.clone(), message });
        }
        if let Err(error) = run.propose(State::running()) {
            return Err(run.abort(error));
        }
        Ok(run)
    }

    /// Asks the observers (a Prefect server) to let the run enter `state`.
    fn propose(&self, state: State) -> Result<State, FlowError> {
        let mut waited = Duration::ZERO;
        loop {
            match observe::propose_flow_run_state(&self.info, &state) {
                Orchestration::Accept => return Ok(state),
                Orchestration::Wait(delay) if waited < Duration::from_secs(600) => {
                    waited += delay;
                    std::thread::sleep(delay);
                }
                Orchestration::Wait(_) => return Ok(state),
                Orchestration::Reject(server_state) if server_state.state_type == state.state_type => {
                    return Ok(server_state);
                }
                Orchestration::Reject(server_state) => {
                    return Err(self.error_for(
                        &server_state,
                        format!("the Prefect server put the run in state {server_state} instead of {state}"),
                    ));
                }
                Orchestration::Abort(reason) => {
                    return Err(FlowError::Cancelled {
                        flow: self.flow.name.to_owned(),
                        flow_run: self.info.name.clone(),
                        message: format!("the Prefect server aborted the run: {reason}"),
                    });
                }
            }
        }
    }

    fn error_for(&self, state: &State, message: String) -> FlowError {
        let (flow, flow_run) = (self.flow.name.to_owned(), self.info.name.clone());
        match state.state_type {
            crate::StateType::Cancelled => FlowError::Cancelled { flow, flow_run, message },
            crate::StateType::Crashed => FlowError::Crashed { flow, flow_run, message },
            _ => FlowError::Failed { flow, flow_run, message },
        }
    }

    /// A flow that returned futures of runs that did not complete has failed.
    fn check_returned_futures<R>(&self, outcome: Result<R, String>) -> Result<R, String> {
        let value = outcome?;
        let returned = self.context.tracker.live_runs();
        let failed: Vec<_> = returned.iter().filter(|run| !run.state().is_completed()).collect();
        match failed.first() {
            Some(first) => Err(format!(
                "{}/{} returned task run(s) did not complete; '{}' ended in state {}",
                failed.len(),
                returned.len(),
                first.name(),
                first.state()
            )),
            None => Ok(value),
        }
    }

    /// How long to wait before running the function again, if the attempt failed and
    /// retries are left.
    fn retry_delay<R>(&self, outcome: &Result<R, String>, attempt: &mut u32) -> Option<Duration> {
        let message = outcome.as_ref().err()?;
        if *attempt >= self.options.retries {
            return None;
        }
        *attempt += 1;
        self.context.span.in_scope(|| {
            tracing::warn!(
                target: "prefect::flow_run",
                "{message} - Retry {}/{} will start {} second(s) from now",
                attempt,
                self.options.retries,
                self.options.retry_delay_seconds
            );
        });
        Some(Duration::from_secs_f64(self.options.retry_delay_seconds.max(0.0)))
    }

    /// Ends a run that the server stopped: releases the runner and says why.
    fn abort(self, error: FlowError) -> FlowError {
        self.context.runner.stop();
        self.context.span.in_scope(|| tracing::warn!(target: "prefect::flow_run", "Aborted: {}", error.message()));
        observe::flow_run_finished(&self.info);
        error
    }

    /// Keeps the values of returned futures, stops the runner, and enters the final state.
    fn finish<R>(self, outcome: Result<R, String>) -> Result<R, FlowError> {
        for run in self.context.tracker.live_runs() {
            run.materialize();
        }
        self.context.runner.stop();
        let state = match &outcome {
            Ok(_) => State::completed(),
            Err(message) if message.starts_with("Flow run exceeded timeout") => State::timed_out(message.clone()),
            Err(message) => State::failed(message.clone()),
        };
        let state = self.end(state);
        match (outcome, state.is_completed()) {
            (Ok(value), true) => Ok(value),
            (Err(message), _) => {
                Err(FlowError::Failed { flow: self.flow.name.to_owned(), flow_run: self.info.name.clone(), message })
            }
            (Ok(_), false) => Err(self.error_for(&state, state.message.clone().unwrap_or_else(|| state.to_string()))),
        }
    }

    /// Enters the final state and logs it.
    fn end(&self, state: State) -> State {
        let state = self.propose(state.clone()).unwrap_or(state);
        self.context.span.in_scope(|| tracing::info!(target: "prefect::flow_run", "Finished in state {state}"));
        observe::flow_run_finished(&self.info);
        state
    }
}

/// Turns a panic while polling into the flow's failure message.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<R, F: Future<Output = Result<R, String>>> Future for CatchUnwind<F> {
    type Output = Result<R, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.0.as_mut();
        let polled = {
            let _in_task = InTask::enter();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || future.poll(cx)))
        };
        match polled {
            Ok(poll) => poll,
            Err(payload) => Poll::Ready(Err(format!("Flow run panicked: {}", task_engine::panic_message(payload)))),
        }
    }
}

/// Resolves to `None` if the timer finishes first.
struct Deadline<F> {
    future: F,
    timer: tokio::task::JoinHandle<()>,
}

impl<F: Future + Unpin> Future for Deadline<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = Pin::new(&mut self.future).poll(cx) {
            return Poll::Ready(Some(output));
        }
        match Pin::new(&mut self.timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
