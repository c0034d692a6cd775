//! The child side of serving: a process the serving program started to execute one run of
//! one deployment, named by the environment as Prefect's Runner names it.

use prefect_api::{Client, StateCreate};
use uuid::Uuid;

use super::{Deployment, ServeError};

/// The flow run the child executes (Prefect's own name for it).
pub(super) const FLOW_RUN_ID_ENV: &str = "PREFECT__FLOW_RUN_ID";
/// Which deployment the run belongs to: `flow-name/deployment-name`.
pub(super) const DEPLOYMENT_ENV: &str = "PREFECT__DEPLOYMENT_NAME";

/// The run this process was started for, if it was.
#[derive(Debug)]
pub(super) struct Assigned {
    flow_run_id: Uuid,
    deployment: String,
}

pub(super) fn assigned() -> Option<Assigned> {
    let flow_run_id = std::env::var(FLOW_RUN_ID_ENV).ok()?.parse().ok()?;
    let deployment = std::env::var(DEPLOYMENT_ENV).ok()?;
    Some(Assigned { flow_run_id, deployment })
}

/// Executes the assigned run and exits: 0 if it completed, 1 otherwise.
pub(super) fn execute(deployments: &[Deployment], assigned: Assigned) -> Result<(), ServeError> {
    crate::logging::init();
    crate::reporting::init();
    let Some(deployment) = deployments.iter().find(|d| d.full_name() == assigned.deployment) else {
        return Err(ServeError::UnknownDeployment(assigned.deployment));
    };
    let reporting = crate::reporting::current().ok_or(ServeError::NoServer)?;
    let client: &Client = reporting.client();
    let run = client
        .read_flow_run(assigned.flow_run_id)
        .map_err(|source| ServeError::Api { doing: format!("read flow run {}", assigned.flow_run_id), source })?;
    crate::flow::adopt_next(run.id, run.name.clone());
    let code = match (deployment.run)(&run.parameters) {
        Ok(Ok(())) => 0,
        Ok(Err(_)) => 1,
        Err(error) => {
            // The flow never started: the run fails here, saying which parameter.
            tracing::error!(target: "prefect::serve", "flow run '{}': {error}", run.name);
            let failed = StateCreate::new("FAILED", "Failed").message(error.to_string());
            if let Err(source) = client.set_flow_run_state(run.id, &failed, false) {
                tracing::error!(target: "prefect::serve", "could not fail flow run '{}': {source}", run.name);
            }
            1
        }
    };
    reporting.flush(std::time::Duration::from_secs(15));
    std::process::exit(code)
}
