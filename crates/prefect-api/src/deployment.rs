//! Deployments and the runs the server schedules for them: what a program that serves flows
//! (as Prefect's `Runner` does) asks of the server, and what it reads back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::client::{Client, id_of};
use crate::error::ApiError;
use crate::model::{Orchestration, StateCreate, StateRead};

/// A deployment to create or update (`DeploymentCreate`): the server upserts by flow and name.
#[derive(Clone, Debug, Serialize)]
pub struct DeploymentCreate {
    /// The deployment's name, such as `count-to`.
    pub name: String,
    /// The flow it runs (from [`Client::create_flow`]).
    pub flow_id: Uuid,
    /// Whether its schedules are paused.
    pub paused: bool,
    /// When the server creates runs for it by itself.
    pub schedules: Vec<ScheduleCreate>,
    /// How many of its runs may be active at once.
    pub concurrency_limit: Option<u32>,
    /// Whether the server refuses runs whose parameters do not fit the schema.
    pub enforce_parameter_schema: bool,
    /// The flow's parameters as an OpenAPI schema: the UI draws its form from it.
    pub parameter_openapi_schema: Value,
    /// Default parameters of its runs.
    pub parameters: Map<String, Value>,
    /// Tags of the deployment and its runs.
    pub tags: Vec<String>,
    /// Shown in the UI.
    pub description: Option<String>,
    /// Shown in the UI.
    pub version: Option<String>,
    /// Where the flow is: for a served Rust flow, the program and the flow's path.
    pub entrypoint: Option<String>,
}

/// One schedule of a deployment (`DeploymentScheduleCreate`).
#[derive(Clone, Debug, Serialize)]
pub struct ScheduleCreate {
    /// Whether the server creates runs from it.
    pub active: bool,
    /// When.
    pub schedule: Schedule,
}

/// When a schedule's runs are due.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Schedule {
    /// A cron expression (`CronSchedule`), such as `0 * * * *`.
    Cron {
        /// The expression.
        cron: String,
        /// An IANA time zone name; UTC when `None`.
        timezone: Option<String>,
    },
    /// Every `interval` seconds (`IntervalSchedule`).
    Interval {
        /// Seconds between runs.
        interval: f64,
    },
}

/// A flow run as the server answers with it (`FlowRun`), as far as a runner needs it.
#[derive(Clone, Debug, Deserialize)]
pub struct FlowRunRead {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its flow.
    pub flow_id: Uuid,
    /// The deployment it was created from, if any.
    #[serde(default)]
    pub deployment_id: Option<Uuid>,
    /// The parameters it runs with.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Its current state.
    #[serde(default)]
    pub state: Option<StateRead>,
    /// When it is due.
    #[serde(default)]
    pub next_scheduled_start_time: Option<DateTime<Utc>>,
}

impl FlowRunRead {
    /// Its state's type, such as `SCHEDULED`; empty if it has none.
    pub fn state_type(&self) -> &str {
        self.state.as_ref().map_or("", |state| state.state_type.as_str())
    }
}

/// A task run as the server answers with it (`TaskRun`), as far as a runner needs it.
#[derive(Clone, Debug, Deserialize)]
pub struct TaskRunRead {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its flow run.
    #[serde(default)]
    pub flow_run_id: Option<Uuid>,
    /// Its current state.
    #[serde(default)]
    pub state: Option<StateRead>,
}

/// The state types that end a run.
pub const FINAL_STATE_TYPES: [&str; 4] = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"];

impl Client {
    /// Creates the deployment, or updates the one with the same flow and name; returns its id.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_deployment(&self, deployment: &DeploymentCreate) -> Result<Uuid, ApiError> {
        let answer = self.post("/deployments/", deployment)?;
        id_of("/deployments/", &answer)
    }

    /// The runs of these deployments in a `SCHEDULED` state due before `before`, soonest
    /// first. Asking also tells the server the deployments are being served (their status
    /// becomes `READY` in the UI).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn scheduled_flow_runs(
        &self,
        deployment_ids: &[Uuid],
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<FlowRunRead>, ApiError> {
        let body = json!({"deployment_ids": deployment_ids, "scheduled_before": before, "limit": limit});
        decode("/deployments/get_scheduled_flow_runs", self.post("/deployments/get_scheduled_flow_runs", &body)?)
    }

    /// Creates a run of a deployment, with `parameters` over its defaults, as the UI's
    /// "Run" button and `prefect deployment run` do.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_deployment_flow_run(
        &self,
        deployment_id: Uuid,
        parameters: Map<String, Value>,
    ) -> Result<FlowRunRead, ApiError> {
        let path = format!("/deployments/{deployment_id}/create_flow_run");
        let answer = self.post(&path, &json!({"parameters": parameters}))?;
        decode(&path, answer)
    }

    /// One flow run.
    ///
    /// # Errors
    ///
    /// If the request fails (a run the server does not know answers 404).
    pub fn read_flow_run(&self, flow_run_id: Uuid) -> Result<FlowRunRead, ApiError> {
        let path = format!("/flow_runs/{flow_run_id}");
        decode(&path, self.get(&path)?)
    }

    /// The flow runs that `filter` selects (the body of `POST /flow_runs/filter`, such as
    /// `{"flow_runs": {"id": {"any_": [...]}}}`).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn read_flow_runs(&self, filter: &Value) -> Result<Vec<FlowRunRead>, ApiError> {
        decode("/flow_runs/filter", self.post("/flow_runs/filter", filter)?)
    }

    /// The task runs of a flow run that have not ended.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn unfinished_task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRunRead>, ApiError> {
        let filter = json!({
            "flow_runs": {"id": {"any_": [flow_run_id]}},
            "task_runs": {"state": {"type": {"not_any_": FINAL_STATE_TYPES}}},
            "limit": 200,
        });
        decode("/task_runs/filter", self.post("/task_runs/filter", &filter)?)
    }

    /// Sets a task run's state; with `force`, without the server's orchestration rules.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn set_task_run_state(
        &self,
        task_run_id: Uuid,
        state: &StateCreate,
        force: bool,
    ) -> Result<Orchestration, ApiError> {
        self.set_state(format!("/task_runs/{task_run_id}/set_state"), state, force)
    }
}

fn decode<T: serde::de::DeserializeOwned>(path: &str, answer: Value) -> Result<T, ApiError> {
    serde_json::from_value(answer).map_err(|e| ApiError::Decode { path: path.to_owned(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_serialize_as_the_api_takes_them() {
        let cron = Schedule::Cron { cron: "0 * * * *".into(), timezone: None };
        assert_eq!(serde_json::to_value(&cron).unwrap(), json!({"cron": "0 * * * *", "timezone": null}));
        let every = Schedule::Interval { interval: 60.0 };
        assert_eq!(serde_json::to_value(&every).unwrap(), json!({"interval": 60.0}));
    }
}
