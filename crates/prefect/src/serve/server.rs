//! The serving side: registers deployments, polls the server for their due runs, starts a
//! child process for each, and keeps every run it started in a true final state.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::Utc;
use prefect_api::{Client, DeploymentCreate, FINAL_STATE_TYPES, Orchestration, ScheduleCreate, StateCreate};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use uuid::Uuid;

use super::served_run::{DEPLOYMENT_ENV, FLOW_RUN_ID_ENV};
use super::{Deployment, Schedule, ServeError};

/// How often the server is asked for due runs unless `PREFECT_RUNNER_POLL_FREQUENCY` says.
const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// How long a cancelled run's process has to end its run itself before it is terminated.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// How long a terminated process has before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How many due runs one poll takes.
const RUNS_PER_POLL: usize = 16;

/// A run executing in a child process.
struct ServedRun {
    process: std::process::Child,
    flow_run_id: Uuid,
    name: String,
    cancelling_since: Option<Instant>,
    terminated_at: Option<Instant>,
}

pub(super) fn serve(deployments: &[Deployment]) -> Result<(), ServeError> {
    crate::logging::init();
    let url = std::env::var("PREFECT_API_URL").ok().filter(|url| !url.trim().is_empty()).ok_or(ServeError::NoServer)?;
    let reporting = crate::reporting::connect(&url, std::env::var("PREFECT_API_KEY").ok().as_deref())?;
    let client = reporting.client().clone();
    let stop = stop_signals()?;
    let mut ids = Vec::with_capacity(deployments.len());
    for deployment in deployments {
        let id = register(&client, deployment)?;
        tracing::info!(
            target: "prefect::serve",
            "Serving deployment '{}': run it with `prefect deployment run '{}'`, or from {}/deployments/deployment/{id}",
            deployment.full_name(),
            deployment.full_name(),
            client.ui_url(),
        );
        ids.push(id);
    }
    let poll = poll_interval();
    let mut runs: Vec<ServedRun> = Vec::new();
    loop {
        reap(&client, &mut runs);
        follow_cancellations(&client, &mut runs);
        start_due_runs(&client, deployments, &ids, &mut runs);
        match stop.recv_timeout(poll) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::info!(target: "prefect::serve", "Stopping: ending {} run(s) in progress", runs.len());
    shut_down(&client, runs);
    Ok(())
}

fn poll_interval() -> Duration {
    std::env::var("PREFECT_RUNNER_POLL_FREQUENCY")
        .ok()
        .and_then(|seconds| seconds.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .map_or(DEFAULT_POLL, Duration::from_secs_f64)
}

/// A channel that receives once on Ctrl-C or SIGTERM.
fn stop_signals() -> Result<mpsc::Receiver<()>, ServeError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|source| ServeError::Io { doing: "watch for Ctrl-C".into(), source })?;
    let (sender, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("prefect-serve-signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = sender.send(());
            }
        })
        .map_err(|source| ServeError::Io { doing: "watch for Ctrl-C".into(), source })?;
    Ok(receiver)
}

fn register(client: &Client, deployment: &Deployment) -> Result<Uuid, ServeError> {
    let api = |doing: String| move |source| ServeError::Api { doing, source };
    let flow_id =
        client.create_flow(deployment.flow_name).map_err(api(format!("register flow '{}'", deployment.flow_name)))?;
    let program = std::env::current_exe().map(|path| path.display().to_string()).unwrap_or_default();
    let create = DeploymentCreate {
        name: deployment.name.clone(),
        flow_id,
        paused: deployment.paused,
        schedules: deployment
            .schedules
            .iter()
            .map(|schedule| ScheduleCreate { active: true, schedule: api_schedule(schedule) })
            .collect(),
        concurrency_limit: deployment.concurrency_limit,
        enforce_parameter_schema: deployment.enforce_parameter_schema,
        parameter_openapi_schema: deployment.parameter_schema(),
        parameters: deployment.parameters.clone(),
        tags: deployment.tags.clone(),
        description: deployment.description.clone(),
        version: deployment.version.clone(),
        entrypoint: Some(format!("{program}:{}", deployment.flow_key)),
    };
    client.create_deployment(&create).map_err(api(format!("register deployment '{}'", deployment.full_name())))
}

fn api_schedule(schedule: &Schedule) -> prefect_api::Schedule {
    match schedule {
        Schedule::Cron { expression, timezone } => {
            prefect_api::Schedule::Cron { cron: expression.clone(), timezone: timezone.clone() }
        }
        Schedule::Interval(every) => prefect_api::Schedule::Interval { interval: every.as_secs_f64() },
    }
}

/// Takes the deployments' due runs: each one whose move to `Pending` the server accepts
/// (a deployment at its concurrency limit refuses) starts in a process of its own.
fn start_due_runs(client: &Client, deployments: &[Deployment], ids: &[Uuid], runs: &mut Vec<ServedRun>) {
    let due = match client.scheduled_flow_runs(ids, Utc::now(), RUNS_PER_POLL) {
        Ok(due) => due,
        Err(error) => {
            tracing::warn!(target: "prefect::serve", "could not ask for due runs: {error}");
            return;
        }
    };
    for run in due {
        if runs.iter().any(|served| served.flow_run_id == run.id) {
            continue;
        }
        let Some(deployment) =
            run.deployment_id.and_then(|id| ids.iter().position(|known| *known == id)).map(|i| &deployments[i])
        else {
            continue;
        };
        match client.set_flow_run_state(run.id, &StateCreate::new("PENDING", "Pending"), false) {
            Ok(Orchestration::Accept(_)) => {}
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(target: "prefect::serve", "could not take flow run '{}': {error}", run.name);
                continue;
            }
        }
        match spawn(deployment, run.id) {
            Ok(process) => {
                tracing::info!(
                    target: "prefect::serve",
                    "Flow run '{}' of '{}' started in process {}",
                    run.name,
                    deployment.full_name(),
                    process.id()
                );
                runs.push(ServedRun {
                    process,
                    flow_run_id: run.id,
                    name: run.name,
                    cancelling_since: None,
                    terminated_at: None,
                });
            }
            Err(error) => {
                tracing::error!(target: "prefect::serve", "could not start flow run '{}': {error}", run.name);
                end_run(client, run.id, "CRASHED", "Crashed", &format!("its process could not start: {error}"));
            }
        }
    }
}

/// This program again, told which run to execute; it dies with this process.
fn spawn(deployment: &Deployment, flow_run_id: Uuid) -> std::io::Result<std::process::Child> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(std::env::args_os().skip(1))
        .env(FLOW_RUN_ID_ENV, flow_run_id.to_string())
        .env(DEPLOYMENT_ENV, deployment.full_name());
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command.spawn()
}

/// Ends the runs whose processes have exited, in a final state if they did not reach one.
fn reap(client: &Client, runs: &mut Vec<ServedRun>) {
    runs.retain_mut(|run| match run.process.try_wait() {
        Ok(Some(status)) => {
            settle(client, run, status);
            false
        }
        Ok(None) => true,
        Err(error) => {
            tracing::warn!(target: "prefect::serve", "could not check the process of '{}': {error}", run.name);
            true
        }
    });
}

/// After a run's process exited: a run it left unfinished ends `Cancelled` if it was being
/// cancelled, and `Crashed` otherwise, with its unfinished task runs.
fn settle(client: &Client, run: &ServedRun, status: ExitStatus) {
    let state = client.read_flow_run(run.flow_run_id).ok().map(|read| read.state_type().to_owned());
    if state.as_deref().is_some_and(|state| FINAL_STATE_TYPES.contains(&state)) {
        tracing::info!(target: "prefect::serve", "Flow run '{}' ended ({})", run.name, describe(status));
        return;
    }
    if run.cancelling_since.is_some() {
        tracing::warn!(target: "prefect::serve", "Flow run '{}' cancelled: its process {}", run.name, describe(status));
        end_run(client, run.flow_run_id, "CANCELLED", "Cancelled", "the flow run was cancelled; its process was ended");
    } else {
        let message = format!("the flow run's process {}", describe(status));
        tracing::error!(target: "prefect::serve", "Flow run '{}' crashed: {message}", run.name);
        end_run(client, run.flow_run_id, "CRASHED", "Crashed", &message);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".to_owned(),
    }
}

/// Forces a flow run and its unfinished task runs into a final state.
fn end_run(client: &Client, flow_run_id: Uuid, state_type: &str, name: &str, message: &str) {
    let state = StateCreate::new(state_type, name).message(message);
    if let Ok(task_runs) = client.unfinished_task_runs(flow_run_id) {
        for task_run in task_runs {
            let _ = client.set_task_run_state(task_run.id, &state, true);
        }
    }
    if let Err(error) = client.set_flow_run_state(flow_run_id, &state, true) {
        tracing::error!(target: "prefect::serve", "could not end flow run {flow_run_id} {name}: {error}");
    }
}

/// Runs cancelled on the server cancel themselves (their engine watches the server); a
/// process that has not ended [`CANCEL_GRACE`] later is terminated, and killed if it still
/// runs [`KILL_GRACE`] after that.
fn follow_cancellations(client: &Client, runs: &mut [ServedRun]) {
    if runs.is_empty() {
        return;
    }
    let ids: Vec<Uuid> = runs.iter().map(|run| run.flow_run_id).collect();
    let filter = json!({"flow_runs": {"id": {"any_": ids}, "state": {"type": {"any_": ["CANCELLING"]}}}});
    let Ok(cancelling) = client.read_flow_runs(&filter) else { return };
    let now = Instant::now();
    for run in runs.iter_mut() {
        if cancelling.iter().any(|c| c.id == run.flow_run_id) {
            run.cancelling_since.get_or_insert(now);
        }
        let Some(since) = run.cancelling_since else { continue };
        match run.terminated_at {
            None if now.duration_since(since) >= CANCEL_GRACE => {
                tracing::warn!(target: "prefect::serve", "Flow run '{}' did not stop when cancelled: terminating its process", run.name);
                signal(&run.process, libc::SIGTERM);
                run.terminated_at = Some(now);
            }
            Some(at) if now.duration_since(at) >= KILL_GRACE => {
                let _ = run.process.kill();
            }
            _ => {}
        }
    }
}

fn signal(process: &std::process::Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(process.id()) {
        // SAFETY: sends a signal to a child this process started and has not reaped.
        unsafe { libc::kill(pid, signal) };
    }
}

/// On Ctrl-C: every run's process is asked to stop (its runs end `Crashed` there, as an
/// interrupted program's do), killed if it has not within [`KILL_GRACE`], and whatever it
/// left unfinished ends `Crashed`.
fn shut_down(client: &Client, mut runs: Vec<ServedRun>) {
    for run in &runs {
        signal(&run.process, libc::SIGTERM);
    }
    let deadline = Instant::now() + KILL_GRACE;
    for run in &mut runs {
        let status = loop {
            match run.process.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Ok(None) | Err(_) => {
                    let _ = run.process.kill();
                    break run.process.wait().ok();
                }
            }
        };
        if let Some(status) = status {
            settle(client, run, status);
        }
    }
}
