//! Serving flows as Prefect deployments: runs started from the UI, the CLI, the REST API or
//! a schedule execute in this program.
//!
#![doc = include_str!("../../docs/serve.md")]

mod schema;
#[cfg(feature = "reporting")]
mod served_run;
#[cfg(feature = "reporting")]
mod server;

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

pub use schema::{ParameterSchema, ServedParameter};

use crate::error::FlowError;

/// The runs of a deployment start at these times, created by the server.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// A cron expression, such as `0 * * * *`, in a time zone (an IANA name; UTC if `None`).
    Cron {
        /// The expression.
        expression: String,
        /// The time zone.
        timezone: Option<String>,
    },
    /// Every so often.
    Interval(Duration),
}

/// How the code `#[flow]` generates runs a served flow with the server's parameters.
#[doc(hidden)]
pub type RunWithParameters = fn(&Map<String, Value>) -> Result<Result<(), FlowError>, ParameterError>;

/// A served run's parameter that does not fit the flow's parameter type. The run fails with
/// this message; the program goes on serving.
#[derive(Debug, thiserror::Error)]
#[error(
    "parameter '{parameter}' does not fit the flow's type `{expected}`: {source}; start the run with a value of that type"
)]
pub struct ParameterError {
    /// The parameter's name.
    pub parameter: String,
    /// The Rust type it must fit.
    pub expected: &'static str,
    /// Why it does not.
    #[source]
    pub source: serde_json::Error,
}

/// Why serving could not start or go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// No Prefect server to serve to.
    #[error(
        "PREFECT_API_URL is not set: serving needs a Prefect server. Start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )]
    NoServer,
    /// Nothing to serve.
    #[error("no deployments to serve: pass at least one, such as `my_flow::to_deployment(\"my-deployment\")`")]
    NoDeployments,
    /// Two deployments with one flow and name.
    #[error("deployment '{0}' is given twice; give each deployment of a flow its own name")]
    Duplicate(String),
    /// `PREFECT_API_URL` is not an http(s) address.
    #[cfg(feature = "reporting")]
    #[error(transparent)]
    InvalidUrl(#[from] crate::reporting::ReportingError),
    /// The server refused or did not answer a request.
    #[cfg(feature = "reporting")]
    #[error("could not {doing}: {source}")]
    Api {
        /// What was being done.
        doing: String,
        /// Why it failed.
        #[source]
        source: prefect_api::ApiError,
    },
    /// A run's process could not be started, or a signal handler installed.
    #[error("could not {doing}: {source}")]
    Io {
        /// What was being done.
        doing: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// This process was started to execute a served run of a deployment that the program no
    /// longer serves.
    #[error(
        "this process was started to run deployment '{0}', which the program does not serve; serve the same deployments in every process of the program"
    )]
    UnknownDeployment(String),
}

/// A flow offered to a Prefect server as a deployment; [`serve`] serves it.
///
/// Made by the `to_deployment` function that `#[flow]` gives every flow whose parameters
/// implement [`ServedParameter`]; the builder methods mirror Python's `flow.serve(...)`.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub(crate) name: String,
    pub(crate) flow_name: &'static str,
    pub(crate) flow_key: &'static str,
    pub(crate) schema: fn() -> Value,
    pub(crate) run: RunWithParameters,
    pub(crate) description: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) tags: Vec<String>,
    pub(crate) parameters: Map<String, Value>,
    pub(crate) schedules: Vec<Schedule>,
    pub(crate) concurrency_limit: Option<u32>,
    pub(crate) paused: bool,
    pub(crate) enforce_parameter_schema: bool,
}

impl Deployment {
    /// What `#[flow]` generates: not a public API.
    #[doc(hidden)]
    pub fn __new(
        name: String,
        flow_name: &'static str,
        flow_key: &'static str,
        description: &'static str,
        schema: fn() -> Value,
        run: RunWithParameters,
    ) -> Self {
        let description = description.trim();
        Self {
            name,
            flow_name,
            flow_key,
            schema,
            run,
            description: (!description.is_empty()).then(|| description.to_owned()),
            version: None,
            tags: Vec::new(),
            parameters: Map::new(),
            schedules: Vec::new(),
            concurrency_limit: None,
            paused: false,
            enforce_parameter_schema: true,
        }
    }

    /// `flow-name/deployment-name`, as the CLI names it.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.flow_name, self.name)
    }

    /// The deployment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OpenAPI schema of the flow's parameters, which the UI's run form is drawn from.
    pub fn parameter_schema(&self) -> Value {
        (self.schema)()
    }

    /// Adds a cron schedule, in UTC: the server creates a run at each time it names.
    pub fn cron(self, expression: impl Into<String>) -> Self {
        self.schedule(Schedule::Cron { expression: expression.into(), timezone: None })
    }

    /// Adds a cron schedule in a time zone, such as `Europe/Berlin`.
    pub fn cron_in(self, expression: impl Into<String>, timezone: impl Into<String>) -> Self {
        self.schedule(Schedule::Cron { expression: expression.into(), timezone: Some(timezone.into()) })
    }

    /// Adds a schedule that creates a run every `every`.
    pub fn interval(self, every: Duration) -> Self {
        self.schedule(Schedule::Interval(every))
    }

    /// Adds a schedule.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Creates the deployment with its schedules paused.
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// Tags of the deployment and of its runs.
    pub fn tags<S: Into<String>>(mut self, tags: impl IntoIterator<Item = S>) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// The description shown in the UI; the flow function's doc comment unless set here.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The version shown in the UI.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// A default for the parameter `name`: runs that do not give it take this value.
    ///
    /// # Panics
    ///
    /// If `value` cannot be serialized to JSON (a map with non-string keys, say).
    #[track_caller]
    pub fn parameter(mut self, name: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value)
            .unwrap_or_else(|error| panic!("the default of parameter '{name}' is not JSON: {error}"));
        self.parameters.insert(name.to_owned(), value);
        self
    }

    /// At most `limit` runs of the deployment at once; the server holds the others in
    /// `AwaitingConcurrencySlot` until a slot frees.
    pub fn concurrency_limit(mut self, limit: u32) -> Self {
        self.concurrency_limit = Some(limit);
        self
    }

    /// Whether the server refuses runs whose parameters do not fit the schema (the default,
    /// as in Prefect). Without it, a parameter that does not fit fails its run, which says
    /// which parameter.
    pub fn enforce_parameter_schema(mut self, enforce: bool) -> Self {
        self.enforce_parameter_schema = enforce;
        self
    }

    /// Serves this deployment alone: see [`serve`].
    ///
    /// # Errors
    ///
    /// As [`serve`].
    #[cfg(feature = "reporting")]
    pub fn serve(self) -> Result<(), ServeError> {
        serve([self])
    }
}

/// Serves `deployments` until Ctrl-C or SIGTERM, like Python's `prefect.serve(...)`.
///
/// Registers each flow and deployment with the Prefect server at `PREFECT_API_URL`, then
/// asks the server every `PREFECT_RUNNER_POLL_FREQUENCY` seconds (2 unless set) for their
/// due runs, and executes each in a child process of this program: the child runs `main`
/// again up to this call, which then executes that one run with the server's parameters and
/// exits. A run whose process dies is marked `Crashed`; a run cancelled on the server is
/// cancelled in its process, which is ended if it does not stop within 10 s.
///
/// # Errors
///
/// If there is no server (`PREFECT_API_URL` is unset), it refuses a deployment, two
/// deployments share a name, or a run's process cannot be started.
#[cfg(feature = "reporting")]
pub fn serve(deployments: impl IntoIterator<Item = Deployment>) -> Result<(), ServeError> {
    let deployments: Vec<Deployment> = deployments.into_iter().collect();
    if deployments.is_empty() {
        return Err(ServeError::NoDeployments);
    }
    for (index, deployment) in deployments.iter().enumerate() {
        if deployments[..index].iter().any(|d| d.full_name() == deployment.full_name()) {
            return Err(ServeError::Duplicate(deployment.full_name()));
        }
    }
    match served_run::assigned() {
        Some(assigned) => served_run::execute(&deployments, assigned),
        None => server::serve(&deployments),
    }
}

/// The value of the parameter `name` in a served run's `parameters`: what the code
/// `#[flow]` generates uses. A parameter the run does not give is `null`, which an `Option`
/// takes as `None`.
#[doc(hidden)]
pub fn __parameter<T: ServedParameter>(parameters: &Map<String, Value>, name: &str) -> Result<T, ParameterError> {
    let value = parameters.get(name).cloned().unwrap_or(Value::Null);
    serde_json::from_value(value).map_err(|source| ParameterError {
        parameter: name.to_owned(),
        expected: std::any::type_name::<T>(),
        source,
    })
}

/// Runs an async flow's future to its end, for a served run.
#[doc(hidden)]
pub fn __block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(future),
        Err(_) => pollster::block_on(future),
    }
}
