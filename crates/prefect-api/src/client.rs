//! One blocking HTTP call at a time to a Prefect server: no queue, no retries. The
//! [`Reporter`](crate::Reporter) adds those.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::{ArtifactCreate, Event, FlowRunCreate, LogCreate, Orchestration, StateCreate, TaskRunCreate};

/// A client for one Prefect server's API, such as `http://127.0.0.1:4200/api`.
///
/// Every call is one HTTP request that waits at most the client's timeout (10 s unless
/// [`timeout`](Self::timeout) says otherwise). With an API key, as for Prefect Cloud, it is
/// sent as a bearer token.
///
/// # Examples
///
/// ```
/// let client = prefect_api::Client::new("http://127.0.0.1:4200/api/");
/// assert_eq!(client.api_url(), "http://127.0.0.1:4200/api");
/// assert_eq!(client.ui_url(), "http://127.0.0.1:4200");
/// ```
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    api_url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("api_url", &self.api_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Client {
    /// A client for the API at `api_url` (`PREFECT_API_URL`).
    pub fn new(api_url: impl Into<String>) -> Self {
        let api_url = api_url.into().trim_end_matches('/').to_owned();
        Self { agent: agent(Duration::from_secs(10)), api_url, api_key: None }
    }

    /// The same client, sending `api_key` as a bearer token (`PREFECT_API_KEY`).
    pub fn api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = Some(api_key.into()).filter(|key| !key.is_empty());
        self
    }

    /// The same client, giving up on a request after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.agent = agent(timeout);
        self
    }

    /// The API's address, without a trailing slash.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The address of the server's UI: `PREFECT_UI_URL` as Prefect derives it from the API's
    /// address (Prefect Cloud's `api.` host becomes `app.`).
    pub fn ui_url(&self) -> String {
        let url = &self.api_url;
        if let Some(rest) = url.strip_prefix("https://api.prefect.cloud/api/accounts/") {
            let rest = rest.replacen("/workspaces/", "/workspace/", 1);
            return format!("https://app.prefect.cloud/account/{rest}");
        }
        url.strip_suffix("/api").unwrap_or(url).to_owned()
    }

    /// The UI page of a flow run.
    pub fn flow_run_url(&self, flow_run_id: Uuid) -> String {
        format!("{}/runs/flow-run/{flow_run_id}", self.ui_url())
    }

    /// `GET {api}{path}`, as JSON.
    ///
    /// # Errors
    ///
    /// If the server cannot be reached, or answers with an error status.
    pub fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.request("GET", path, None)
    }

    /// `POST {api}{path}` with a JSON body; the answer as JSON (`null` for an empty one).
    ///
    /// # Errors
    ///
    /// If the server cannot be reached, or answers with an error status.
    pub fn post(&self, path: &str, body: &impl Serialize) -> Result<Value, ApiError> {
        let body = serde_json::to_string(body)
            .map_err(|e| ApiError::Encode { path: path.to_owned(), message: e.to_string() })?;
        self.request("POST", path, Some(body))
    }

    /// `DELETE {api}{path}`; the answer as JSON (`null` for an empty one).
    ///
    /// # Errors
    ///
    /// If the server cannot be reached, or answers with an error status.
    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        self.request("DELETE", path, None)
    }

    /// `PATCH {api}{path}` with a JSON body; the answer as JSON (`null` for an empty one).
    ///
    /// # Errors
    ///
    /// If the server cannot be reached, or answers with an error status.
    pub fn patch(&self, path: &str, body: &impl Serialize) -> Result<Value, ApiError> {
        let body = serde_json::to_string(body)
            .map_err(|e| ApiError::Encode { path: path.to_owned(), message: e.to_string() })?;
        self.request("PATCH", path, Some(body))
    }

    /// Creates a progress artifact of a task run, `percent` done (0 to 100); returns its id.
    /// The UI shows it in the run's Artifacts tab.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_progress_artifact(
        &self,
        task_run_id: Uuid,
        flow_run_id: Option<Uuid>,
        percent: f64,
    ) -> Result<Uuid, ApiError> {
        let body = json!({
            "type": "progress",
            "data": percent,
            "task_run_id": task_run_id,
            "flow_run_id": flow_run_id,
            "description": "How far the task run said it is (prefect::progress)",
        });
        let answer = self.post("/artifacts/", &body)?;
        id_of("/artifacts/", &answer)
    }

    /// Creates an artifact of `kind` (`markdown`, `table`, ...) for a task run or flow run;
    /// returns the id the server gave it.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_artifact(&self, artifact: &ArtifactCreate<'_>) -> Result<Uuid, ApiError> {
        let answer = self.post("/artifacts/", artifact)?;
        id_of("/artifacts/", &answer)
    }

    /// Sets a progress artifact's `percent`.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn update_progress_artifact(&self, artifact_id: Uuid, percent: f64) -> Result<(), ApiError> {
        self.patch(&format!("/artifacts/{artifact_id}"), &json!({"data": percent})).map(drop)
    }

    /// Whether the server answers `GET /health`.
    ///
    /// # Errors
    ///
    /// If it does not, with why.
    pub fn health(&self) -> Result<(), ApiError> {
        self.get("/health").map(drop)
    }

    /// The id of the flow named `name`, created if it is new (the server upserts by name).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_flow(&self, name: &str) -> Result<Uuid, ApiError> {
        let answer = self.post("/flows/", &json!({"name": name}))?;
        id_of("/flows/", &answer)
    }

    /// Creates a flow run; returns the id the server gave it.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_flow_run(&self, run: &FlowRunCreate) -> Result<Uuid, ApiError> {
        let answer = self.post("/flow_runs/", run)?;
        id_of("/flow_runs/", &answer)
    }

    /// Proposes a state for a flow run; the server's orchestration rules decide.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn set_flow_run_state(
        &self,
        flow_run_id: Uuid,
        state: &StateCreate,
        force: bool,
    ) -> Result<Orchestration, ApiError> {
        self.set_state(format!("/flow_runs/{flow_run_id}/set_state"), state, force)
    }

    /// `POST {path}` of a run's `set_state`, and the server's decision.
    pub(crate) fn set_state(&self, path: String, state: &StateCreate, force: bool) -> Result<Orchestration, ApiError> {
        let answer = self.post(&path, &json!({"state": state, "force": force}))?;
        Orchestration::from_json(answer).map_err(|message| ApiError::Decode { path, message })
    }

    /// Creates a task run with the client's id (or returns the existing run with the same
    /// flow run, task key and dynamic key).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_task_run(&self, run: &TaskRunCreate) -> Result<Uuid, ApiError> {
        let answer = self.post("/task_runs/", run)?;
        id_of("/task_runs/", &answer)
    }

    /// Sends events in one request (`POST /events`).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn emit_events(&self, events: &[Event]) -> Result<(), ApiError> {
        self.post("/events", &events).map(drop)
    }

    /// Sends log lines in one request (`POST /logs/`).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_logs(&self, logs: &[LogCreate]) -> Result<(), ApiError> {
        self.post("/logs/", &logs).map(drop)
    }

    /// One request, repeated up to [`BUSY_RETRIES`] times while the server says it is busy
    /// (429, 502, 503: a SQLite database locked by another writer answers 503), as Prefect's
    /// own client does.
    fn request(&self, method: &str, path: &str, body: Option<String>) -> Result<Value, ApiError> {
        let mut attempt = 0;
        loop {
            match self.request_once(method, path, body.clone()) {
                Err(ApiError::Status { status: 429 | 502 | 503, retry_after, .. }) if attempt < BUSY_RETRIES => {
                    attempt += 1;
                    let backoff = Duration::from_millis(200 << attempt);
                    std::thread::sleep(retry_after.unwrap_or(backoff).min(Duration::from_secs(5)));
                }
                answer => return answer,
            }
        }
    }

    fn request_once(&self, method: &str, path: &str, body: Option<String>) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.api_url);
        let unreachable = |error: ureq::Error| ApiError::Unreachable { url: url.clone(), message: error.to_string() };
        let response = match (method, body) {
            ("DELETE", _) => self.with_auth(self.agent.delete(&url)).call(),
            ("PATCH", Some(body)) => {
                self.with_auth(self.agent.patch(&url)).header("content-type", "application/json").send(body)
            }
            (_, None) => self.with_auth(self.agent.get(&url)).call(),
            (_, Some(body)) => {
                self.with_auth(self.agent.post(&url)).header("content-type", "application/json").send(body)
            }
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 60.0)));
        let text = response.into_body().with_config().limit(256 * 1024 * 1024).read_to_string().map_err(unreachable)?;
        if !(200..300).contains(&status) {
            let mut body = text;
            body.truncate(500);
            return Err(ApiError::Status {
                method: method.to_owned(),
                path: path.to_owned(),
                status,
                body,
                retry_after,
            });
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ApiError::Decode { path: path.to_owned(), message: e.to_string() })
    }

    fn with_auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.api_key {
            Some(key) => request.header("authorization", format!("Bearer {key}")),
            None => request,
        }
    }
}

/// How often a request is repeated while the server answers that it is busy.
const BUSY_RETRIES: u32 = 3;

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout.min(Duration::from_secs(3))))
        .user_agent(concat!("prefect-rs/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

pub(crate) fn id_of(path: &str, answer: &Value) -> Result<Uuid, ApiError> {
    answer["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| ApiError::Decode { path: path.to_owned(), message: format!("no id in {answer}") })
}
