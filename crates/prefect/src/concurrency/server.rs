//! Slots from a Prefect server, through its lease API.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use prefect_api::{ApiError, Client, LeaseHolder, SlotAnswer, SlotMode};
use uuid::Uuid;

use super::{Holder, LimitError, Limiter, Mode, Take};

/// How long a lease lasts without renewal: Prefect's own for task runs' tags.
const LEASE: Duration = Duration::from_secs(60);
/// How often held leases are renewed.
const RENEW_EVERY: Duration = Duration::from_secs(20);
/// How old the list of limits may be: a limit created meanwhile applies within this long.
const KNOWN_FOR: Duration = Duration::from_secs(1);

/// The limiter of the server runs report to, else of `PREFECT_API_URL`, one per address.
pub(super) fn limiter() -> Option<Arc<dyn Limiter>> {
    static LIMITERS: Mutex<Vec<Arc<ServerLimiter>>> = Mutex::new(Vec::new());
    let client = match crate::reporting::current() {
        Some(reporting) => reporting.client().clone(),
        None => {
            let url = std::env::var("PREFECT_API_URL").ok().filter(|url| !url.trim().is_empty())?;
            let key = std::env::var("PREFECT_API_KEY").ok();
            key.into_iter().fold(Client::new(url), Client::api_key)
        }
    };
    let mut limiters = LIMITERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(limiter) = limiters.iter().find(|l| l.client.api_url() == client.api_url()) {
        return Some(limiter.clone());
    }
    let limiter =
        Arc::new(ServerLimiter { client, known: Mutex::default(), leases: Arc::default(), renewing: Once::new() });
    limiters.push(limiter.clone());
    Some(limiter)
}

#[derive(Debug)]
struct ServerLimiter {
    client: Client,
    /// The names of the active limits, and when the server was last asked.
    known: Mutex<Option<(Instant, HashSet<String>)>>,
    /// The leases held, renewed by a thread of their own.
    leases: Arc<Mutex<HashSet<Uuid>>>,
    renewing: Once,
}

impl ServerLimiter {
    fn leases(&self) -> MutexGuard<'_, HashSet<Uuid>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews every held lease every [`RENEW_EVERY`], for as long as the program runs.
    fn keep_renewing(&self) {
        let (client, leases) = (self.client.clone(), self.leases.clone());
        self.renewing.call_once(|| {
            std::thread::Builder::new()
                .name("prefect-concurrency-leases".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(RENEW_EVERY);
                        let held: Vec<Uuid> = leases.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
                        for lease in held {
                            match client.renew_concurrency_lease(lease, LEASE) {
                                Ok(()) => {}
                                Err(ApiError::Status { status: 404, .. }) => {
                                    tracing::warn!(target: "prefect::concurrency", "a concurrency lease expired before it was renewed; its slots were freed");
                                    leases.lock().unwrap_or_else(|p| p.into_inner()).remove(&lease);
                                }
                                Err(error) => {
                                    tracing::warn!(target: "prefect::concurrency", "could not renew a concurrency lease: {error}");
                                }
                            }
                        }
                    }
                })
                .expect("the OS starts a thread");
        });
    }
}

impl Limiter for ServerLimiter {
    fn limits_any(&self, names: &[String]) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.as_ref().is_none_or(|(at, _)| at.elapsed() > KNOWN_FOR) {
            let active = match self.client.concurrency_limits() {
                Ok(limits) => limits.into_iter().filter(|l| l.active).map(|l| l.name).collect(),
                // Keep what was known, and ask again only a while later: a server that is
                // down must not hold up every submission. With nothing known, nothing is
                // limited until the server answers.
                Err(error) => {
                    tracing::warn!(target: "prefect::concurrency", "could not read the concurrency limits: {error}");
                    known.take().map(|(_, active)| active).unwrap_or_default()
                }
            };
            *known = Some((Instant::now(), active));
        }
        known.as_ref().is_some_and(|(_, active)| names.iter().any(|name| active.contains(name)))
    }

    fn take(&self, names: &[String], slots: u32, mode: Mode, holder: Option<Holder>) -> Result<Take, LimitError> {
        let mode = match mode {
            Mode::Concurrency => SlotMode::Concurrency,
            Mode::RateLimit => SlotMode::RateLimit,
        };
        let holder = holder.map(|Holder::Task(id)| LeaseHolder::Task(id));
        match self.client.take_concurrency_slots(names, slots, mode, LEASE, holder) {
            Ok(SlotAnswer::Taken { lease, limits }) => {
                if let Some(lease) = lease {
                    self.leases().insert(lease);
                    self.keep_renewing();
                }
                Ok(Take::Taken { lease, limits })
            }
            Ok(SlotAnswer::Wait(wait)) => Ok(Take::Wait(wait)),
            Err(error @ ApiError::Status { status: 400..=499, .. }) => Err(LimitError::Refused(error.into())),
            Err(error) => Err(LimitError::Unreachable(error.into())),
        }
    }

    fn give_back(&self, lease: Uuid) {
        self.leases().remove(&lease);
        if let Err(error) = self.client.give_back_concurrency_slots(lease) {
            tracing::warn!(target: "prefect::concurrency", "could not give back concurrency slots (the server frees them when the lease expires): {error}");
        }
    }
}
