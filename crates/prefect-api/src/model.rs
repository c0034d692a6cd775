//! The bodies that Prefect 3's API takes and gives, as far as this client uses them.
//!
//! The server forbids fields it does not know (`422 extra_forbidden`), so these structs
//! carry exactly the fields of its schema, and no more.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// A state to propose for a flow run, or to create a run in (the API's `StateCreate`).
///
/// The server stamps states it receives this way with its own clock; there is no time field.
///
/// # Examples
///
/// ```
/// let state = prefect_api::StateCreate::new("FAILED", "TimedOut").message("too slow");
/// assert_eq!(serde_json::to_value(&state).unwrap()["type"], "FAILED");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateCreate {
    /// `SCHEDULED`, `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, `CRASHED`, ...
    #[serde(rename = "type")]
    pub state_type: String,
    /// The name shown in the UI, such as `Retrying` for a `RUNNING` state.
    pub name: String,
    /// Why the run is in this state.
    pub message: Option<String>,
    /// Details such as `scheduled_time` for a `SCHEDULED` state.
    pub state_details: Map<String, Value>,
    /// The state's data: for a persisted result, its record's metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl StateCreate {
    /// A state of `state_type` (as the API spells it) named `name`.
    pub fn new(state_type: &str, name: &str) -> Self {
        Self {
            state_type: state_type.to_owned(),
            name: name.to_owned(),
            message: None,
            state_details: Map::new(),
            data: None,
        }
    }

    /// The same state with a message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The same state, due at `at` (for `SCHEDULED` states).
    pub fn scheduled_time(mut self, at: DateTime<Utc>) -> Self {
        self.state_details.insert("scheduled_time".into(), json!(at));
        self
    }
}

/// A state as the server keeps it: what it answers with.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StateRead {
    /// The state's type, such as `COMPLETED`.
    #[serde(rename = "type")]
    pub state_type: String,
    /// Its name, such as `Completed`.
    pub name: String,
    /// Its message, if any.
    #[serde(default)]
    pub message: Option<String>,
    /// When the server entered it.
    pub timestamp: DateTime<Utc>,
    /// Details, such as `scheduled_time`.
    #[serde(default)]
    pub state_details: Map<String, Value>,
}

/// The server's decision on a proposed state (`OrchestrationResult`).
#[derive(Clone, Debug, PartialEq)]
pub enum Orchestration {
    /// The run is now in the proposed state.
    Accept(StateRead),
    /// The proposed state was refused; the run is in this one instead.
    Reject {
        /// The state the server put the run in.
        state: Option<StateRead>,
        /// Why.
        reason: String,
    },
    /// Ask again after `delay_seconds`.
    Wait {
        /// How long to wait before asking again.
        delay_seconds: f64,
        /// Why.
        reason: String,
    },
    /// Stop the run: the server will not let it go on.
    Abort {
        /// Why.
        reason: String,
    },
}

#[derive(Deserialize)]
struct RawOrchestration {
    state: Option<StateRead>,
    status: String,
    #[serde(default)]
    details: Map<String, Value>,
}

impl Orchestration {
    /// Reads the server's answer to `POST /flow_runs/{id}/set_state`.
    pub(crate) fn from_json(value: Value) -> Result<Self, String> {
        let raw: RawOrchestration = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let reason = raw.details.get("reason").and_then(Value::as_str).unwrap_or_default().to_owned();
        Ok(match raw.status.as_str() {
            "ACCEPT" => Self::Accept(raw.state.ok_or("an ACCEPT without a state")?),
            "REJECT" => Self::Reject { state: raw.state, reason },
            "WAIT" => Self::Wait {
                delay_seconds: raw.details.get("delay_seconds").and_then(Value::as_f64).unwrap_or(1.0),
                reason,
            },
            "ABORT" => Self::Abort { reason },
            other => return Err(format!("unknown orchestration status {other:?}")),
        })
    }
}

/// A new flow run (`FlowRunCreate`). The server chooses its id.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRunCreate {
    /// The run's name; the server makes one up when it is `None`.
    pub name: Option<String>,
    /// The flow it is a run of (from [`Client::create_flow`](crate::Client::create_flow)).
    pub flow_id: Uuid,
    /// The call's arguments.
    pub parameters: Value,
    /// For a subflow: the task run that stands for it in its parent flow run.
    pub parent_task_run_id: Option<Uuid>,
    /// Retries and their delay.
    pub empirical_policy: FlowRunPolicy,
    /// Tags.
    pub tags: Vec<String>,
    /// The state it is created in, normally `PENDING`.
    pub state: StateCreate,
}

/// How often a flow run may be retried.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlowRunPolicy {
    /// How many retries it may use.
    pub retries: u32,
    /// Seconds between attempts.
    pub retry_delay: f64,
}

/// A new task run created through REST (`TaskRunCreate`); its id is the client's.
#[derive(Clone, Debug, Serialize)]
pub struct TaskRunCreate {
    /// The run's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The flow run it belongs to.
    pub flow_run_id: Option<Uuid>,
    /// Which task it runs.
    pub task_key: String,
    /// Which run of that task within the flow run.
    pub dynamic_key: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Upstream runs per parameter, as [`task_inputs`] makes them.
    pub task_inputs: Value,
    /// Retries and their delays.
    pub empirical_policy: Value,
    /// The state it is created in.
    pub state: StateCreate,
}

/// A log line (`LogCreate`).
#[derive(Clone, Debug, Serialize)]
pub struct LogCreate {
    /// The logger's name, such as `prefect.task_runs`.
    pub name: String,
    /// Python's level numbers: 10 debug, 20 info, 30 warning, 40 error.
    pub level: u8,
    /// The text.
    pub message: String,
    /// When it was written.
    pub timestamp: DateTime<Utc>,
    /// The flow run it belongs to.
    pub flow_run_id: Option<Uuid>,
    /// The task run it belongs to.
    pub task_run_id: Option<Uuid>,
}

/// An artifact for `POST /artifacts/` (`ArtifactCreate`).
#[derive(Clone, Debug, Serialize)]
pub struct ArtifactCreate<'a> {
    /// `markdown`, `table`, `progress`, ...
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The key the UI keeps its history under, if any.
    pub key: Option<&'a str>,
    /// The content: markdown text, or a table as JSON text.
    pub data: &'a str,
    /// A markdown description.
    pub description: Option<&'a str>,
    /// The flow run it belongs to (the server's id).
    pub flow_run_id: Option<Uuid>,
    /// The task run it belongs to.
    pub task_run_id: Option<Uuid>,
}

/// An event for `POST /events` (Prefect's `Event`).
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// The event's id.
    pub id: Uuid,
    /// When it happened: for a state change, the time the run entered the state.
    pub occurred: DateTime<Utc>,
    /// What happened, such as `prefect.task-run.Completed`.
    pub event: String,
    /// What it happened to: `prefect.resource.id` and labels.
    pub resource: Map<String, Value>,
    /// Related resources, each with a `prefect.resource.role`.
    pub related: Vec<Map<String, Value>>,
    /// Anything else.
    pub payload: Value,
}

/// `task_inputs` for a task run: each parameter's upstream task runs, so the UI draws the
/// graph. A parameter fed by no run is listed with no inputs, as Prefect does.
///
/// # Examples
///
/// ```
/// let upstream = uuid::Uuid::new_v4();
/// let inputs = prefect_api::task_inputs(&[("x", vec![upstream]), ("n", vec![])]);
/// assert_eq!(inputs["x"][0]["input_type"], "task_run");
/// assert_eq!(inputs["n"], serde_json::json!([]));
/// ```
pub fn task_inputs(inputs: &[(impl AsRef<str>, Vec<Uuid>)]) -> Value {
    let map: Map<String, Value> = inputs
        .iter()
        .map(|(name, ids)| {
            let edges = ids.iter().map(|id| json!({"input_type": "task_run", "id": id})).collect();
            (name.as_ref().to_owned(), Value::Array(edges))
        })
        .collect();
    Value::Object(map)
}

/// A task run's retry policy as Prefect writes it: `retry_delay` is one number, or a list
/// when the delays differ per attempt.
pub fn task_run_policy(retries: u32, retry_delay_seconds: &[f64]) -> Value {
    let retry_delay = match retry_delay_seconds {
        [] => json!(0),
        [one] => json!(one),
        many => json!(many),
    };
    json!({"max_retries": 0, "retry_delay_seconds": 0.0, "retries": retries, "retry_delay": retry_delay})
}
