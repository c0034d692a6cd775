//! A small client for the API of a Prefect 3 server (`prefect server start`, or Prefect
//! Cloud), and a [`Reporter`] that sends it flow runs, task runs and logs from a background
//! thread without ever stalling the program that reports.
//!
//! It knows Prefect, not any engine: the `prefect` crate's `reporting` module translates its
//! runs into the calls here.
//!
//! How runs are reported, following Prefect's own client (3.9):
//! - flows and flow runs through REST; a flow run's states through `set_state`, so the
//!   server's orchestration decides (accept, reject, wait or abort);
//! - task runs as client-orchestrated `prefect.task-run.<State>` events, sent in batches
//!   to `POST /events`. The server's task-run recorder builds the runs from them, with the
//!   times the client gives, which is how a run on a remote worker gets its real times;
//! - logs in batches to `POST /logs/`.
//!
//! # Examples
//!
//! ```no_run
//! use prefect_api::Client;
//!
//! let client = Client::new("http://127.0.0.1:4200/api");
//! let flow = client.create_flow("my-flow")?;
//! # Ok::<(), prefect_api::ApiError>(())
//! ```

#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

mod backlog;
mod client;
mod concurrency;
mod deployment;
mod error;
mod model;
mod reporter;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::Client;
pub use concurrency::{ConcurrencyLimit, LeaseHolder, SlotAnswer, SlotMode};
pub use deployment::{DeploymentCreate, FINAL_STATE_TYPES, FlowRunRead, Schedule, ScheduleCreate, TaskRunRead};
pub use error::ApiError;
pub use model::{
    ArtifactCreate, Event, FlowRunCreate, FlowRunPolicy, LogCreate, Orchestration, StateCreate, StateRead,
    TaskRunCreate, task_inputs, task_run_policy,
};
pub use reporter::{NewFlowRun, Reporter, task_run_state_event};
