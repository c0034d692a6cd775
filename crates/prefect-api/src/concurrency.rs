//! Concurrency limits through the server's lease API, as Prefect's client uses it: slots are
//! taken with a lease that the holder renews while it works and gives back when done, so a
//! holder that dies frees its slots when the lease expires.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::Client;
use crate::error::ApiError;

/// Whether slots are held until given back (`Concurrency`), or taken and left to decay at
/// the limit's `slot_decay_per_second` (`RateLimit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotMode {
    /// Held until the lease is given back.
    Concurrency,
    /// Taken for good; the limit frees them at its decay rate.
    RateLimit,
}

/// The answer to a request for slots.
#[derive(Clone, Debug, PartialEq)]
pub enum SlotAnswer {
    /// Taken, from the limits named (none if no limit of those names exists).
    Taken {
        /// The lease to renew and give back; none for a rate limit, whose slots decay.
        lease: Option<Uuid>,
        /// The names of the limits the slots were taken from.
        limits: Vec<String>,
    },
    /// Every slot is taken: ask again after this long (the server's `Retry-After`).
    Wait(Duration),
}

/// A global concurrency limit as the server has it.
#[derive(Clone, Debug, PartialEq)]
pub struct ConcurrencyLimit {
    /// Its name; a tag's limit is named `tag:<tag>`.
    pub name: String,
    /// How many slots it has.
    pub limit: u64,
    /// Whether it is enforced.
    pub active: bool,
}

/// Who holds a lease, for the server's records: a task run or a flow run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseHolder {
    /// A task run, by id.
    Task(Uuid),
    /// A flow run, by id.
    Flow(Uuid),
}

impl Client {
    /// Takes `slots` slots of each limit in `names`: for [`SlotMode::Concurrency`] with a
    /// lease of `lease` (at least 60 s), for [`SlotMode::RateLimit`] for good.
    ///
    /// # Errors
    ///
    /// If the request fails other than with "every slot is taken" (423).
    pub fn take_concurrency_slots(
        &self,
        names: &[String],
        slots: u32,
        mode: SlotMode,
        lease: Duration,
        holder: Option<LeaseHolder>,
    ) -> Result<SlotAnswer, ApiError> {
        let holder = holder.map(|holder| match holder {
            LeaseHolder::Task(id) => json!({"type": "task_run", "id": id}),
            LeaseHolder::Flow(id) => json!({"type": "flow_run", "id": id}),
        });
        let (path, body) = match mode {
            SlotMode::Concurrency => (
                "/v2/concurrency_limits/increment-with-lease",
                json!({
                    "names": names,
                    "slots": slots,
                    "mode": "concurrency",
                    "lease_duration": lease.as_secs_f64().max(60.0),
                    "holder": holder,
                }),
            ),
            SlotMode::RateLimit => {
                ("/v2/concurrency_limits/increment", json!({"names": names, "slots": slots, "mode": "rate_limit"}))
            }
        };
        match self.post(path, &body) {
            Ok(answer) => {
                let (lease, limits) = match mode {
                    SlotMode::Concurrency => {
                        let lease = answer["lease_id"].as_str().and_then(|id| id.parse().ok()).ok_or_else(|| {
                            ApiError::Decode { path: path.to_owned(), message: format!("no lease_id in {answer}") }
                        })?;
                        (Some(lease), &answer["limits"])
                    }
                    SlotMode::RateLimit => (None, &answer),
                };
                let limits = limits
                    .as_array()
                    .map(|limits| limits.iter().filter_map(|l| l["name"].as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                Ok(SlotAnswer::Taken { lease, limits })
            }
            Err(ApiError::Status { status: 423, retry_after, .. }) => {
                Ok(SlotAnswer::Wait(retry_after.unwrap_or(Duration::from_secs(1))))
            }
            Err(error) => Err(error),
        }
    }

    /// Gives back the slots of `lease`.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn give_back_concurrency_slots(&self, lease: Uuid) -> Result<(), ApiError> {
        self.post("/v2/concurrency_limits/decrement-with-lease", &json!({"lease_id": lease})).map(drop)
    }

    /// Extends `lease` to `duration` from now (at least 60 s).
    ///
    /// # Errors
    ///
    /// If the request fails, or the lease has expired (404).
    pub fn renew_concurrency_lease(&self, lease: Uuid, duration: Duration) -> Result<(), ApiError> {
        let body = json!({"lease_duration": duration.as_secs_f64().max(60.0)});
        self.post(&format!("/v2/concurrency_limits/leases/{lease}/renew"), &body).map(drop)
    }

    /// Every global concurrency limit (tags' limits included, as `tag:<tag>`).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn concurrency_limits(&self) -> Result<Vec<ConcurrencyLimit>, ApiError> {
        let mut limits = Vec::new();
        loop {
            let page = self.post("/v2/concurrency_limits/filter", &json!({"offset": limits.len(), "limit": 200}))?;
            let page = page.as_array().cloned().unwrap_or_default();
            let full = page.len() == 200;
            limits.extend(page.iter().filter_map(limit_of));
            if !full {
                return Ok(limits);
            }
        }
    }

    /// Creates (or updates) the global concurrency limit `name`: `limit` slots, freed at
    /// `slot_decay_per_second` when it is used as a rate limit (0 for none).
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn create_concurrency_limit(&self, name: &str, limit: u64, slot_decay_per_second: f64) -> Result<(), ApiError> {
        let body = json!({"name": name, "limit": limit, "slot_decay_per_second": slot_decay_per_second});
        match self.post("/v2/concurrency_limits/", &body) {
            Err(ApiError::Status { status: 409, .. }) => {
                let update = json!({"limit": limit, "slot_decay_per_second": slot_decay_per_second});
                self.patch(&format!("/v2/concurrency_limits/{name}"), &update).map(drop)
            }
            answer => answer.map(drop),
        }
    }

    /// Deletes the global concurrency limit `name`, if it exists.
    ///
    /// # Errors
    ///
    /// If the request fails.
    pub fn delete_concurrency_limit(&self, name: &str) -> Result<(), ApiError> {
        match self.delete(&format!("/v2/concurrency_limits/{name}")) {
            Err(ApiError::Status { status: 404, .. }) => Ok(()),
            answer => answer.map(drop),
        }
    }
}

fn limit_of(value: &Value) -> Option<ConcurrencyLimit> {
    Some(ConcurrencyLimit {
        name: value["name"].as_str()?.to_owned(),
        limit: value["limit"].as_u64()?,
        active: value["active"].as_bool().unwrap_or(true),
    })
}
