//! Concurrency limits kept by a Prefect server: tag limits on task runs, and global
//! concurrency and rate limits taken inside task code.
//!
//! - **Tags.** After `prefect concurrency-limit create db 2`, at most two task runs tagged
//!   `db` run at once, across every flow and program that reports to the server. The engine
//!   takes a slot for a tagged run once the runs it depends on have finished, before it hands
//!   the run to its runner, and gives the slot back when the run ends: so on Ray a run that
//!   waits for a slot holds no Ray worker and no CPU.
//! - **[`concurrency`]** takes slots of global concurrency limits (`prefect gcl create`) for
//!   as long as the returned guard lives.
//! - **[`rate_limit`]** takes slots of a limit with `slot_decay_per_second`, which frees them
//!   over time: at most that many calls per second go past it.
//!
//! Slots are leased as Prefect's own client leases them: a lease of 60 s, renewed every 20 s
//! while held, so a program that dies frees its slots within a minute. A limit that does not
//! exist limits nothing. Without a server (`PREFECT_API_URL` unset, no
//! [`reporting::connect`](crate::reporting::connect)) nothing is limited. Inside a task on
//! Ray the executor reaches the server at the `PREFECT_API_URL` the program passes to the
//! workers.
//!
//! # Examples
//!
//! ```
//! #[prefect::task(tags = ["db"])]
//! fn load(table: String) -> usize {
//!     // At most as many as the limit `warehouse` allows, in every program at once.
//!     let _slot = prefect::concurrency("warehouse", 1).unwrap();
//!     // At most the calls per second that `api` allows.
//!     prefect::rate_limit("api", 1).unwrap();
//!     table.len()
//! }
//!
//! #[prefect::flow]
//! fn nightly() -> usize {
//!     let tables = ["users", "orders"].map(String::from);
//!     load.map(tables).into_iter().map(|f| f.result().unwrap()).sum()
//! }
//!
//! assert_eq!(nightly().unwrap(), 11);
//! ```

mod gate;
#[cfg(feature = "reporting")]
mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::BoxError;
pub(crate) use gate::gate;

/// Why slots were not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConcurrencyError {
    /// The server refused the request, such as for more slots than the limit has, or a rate
    /// limit on a limit without `slot_decay_per_second`.
    #[error("the Prefect server refused slots of {names:?}: {source}; check the limits with `prefect gcl ls`")]
    Refused {
        /// The limits asked for.
        names: Vec<String>,
        /// The server's answer.
        #[source]
        source: BoxError,
    },
    /// The server could not be reached for long enough that waiting on is pointless.
    #[error(
        "could not reach the Prefect server for {} s to take slots of {names:?}: {source}; check that it runs at PREFECT_API_URL",
        waited.as_secs()
    )]
    Unreachable {
        /// The limits asked for.
        names: Vec<String>,
        /// How long it was tried.
        waited: Duration,
        /// The last failure.
        #[source]
        source: BoxError,
    },
}

/// Names of limits: one (`"db"`) or several (`["db", "api"]`).
pub trait LimitNames {
    /// The names, in order.
    fn names(self) -> Vec<String>;
}

impl LimitNames for &str {
    fn names(self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl LimitNames for String {
    fn names(self) -> Vec<String> {
        vec![self]
    }
}

impl<S: AsRef<str>> LimitNames for &[S] {
    fn names(self) -> Vec<String> {
        self.iter().map(|name| name.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>, const N: usize> LimitNames for [S; N] {
    fn names(self) -> Vec<String> {
        self.iter().map(|name| name.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>> LimitNames for Vec<S> {
    fn names(self) -> Vec<String> {
        self.iter().map(|name| name.as_ref().to_owned()).collect()
    }
}

/// Slots of global concurrency limits, held until dropped.
#[must_use = "the slots are given back when the guard is dropped: bind it, as `let _slots = ...`"]
#[derive(Debug)]
pub struct ConcurrencyGuard {
    held: Option<(Arc<dyn Limiter>, Uuid)>,
    names: Vec<String>,
}

impl ConcurrencyGuard {
    /// The limits it holds slots of (none if no limit of the names asked for exists).
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        if let Some((limiter, lease)) = self.held.take() {
            limiter.give_back(lease);
        }
    }
}

/// Takes `occupy` slots of each global concurrency limit in `names`, waiting as long as
/// the server says to; they are given back when the guard is dropped. Python's
/// `with concurrency(names, occupy):`.
///
/// # Errors
///
/// If the server refuses (more slots than the limit has), or cannot be reached for 30 s.
pub fn concurrency(names: impl LimitNames, occupy: u32) -> Result<ConcurrencyGuard, ConcurrencyError> {
    let names = names.names();
    let Some(limiter) = limiter() else {
        return Ok(ConcurrencyGuard { held: None, names: Vec::new() });
    };
    let (lease, limits) = take_waiting(&*limiter, &names, occupy, Mode::Concurrency, None)?;
    Ok(ConcurrencyGuard { held: lease.map(|lease| (limiter, lease)), names: limits })
}

/// Takes `occupy` slots of each rate limit in `names` (limits with `slot_decay_per_second`),
/// waiting as long as the server says to; the slots free themselves at the decay rate.
/// Python's `rate_limit(names, occupy)`.
///
/// # Errors
///
/// If the server refuses (a limit without decay, more slots than the limit has), or cannot
/// be reached for 30 s.
pub fn rate_limit(names: impl LimitNames, occupy: u32) -> Result<(), ConcurrencyError> {
    let names = names.names();
    if let Some(limiter) = limiter() {
        take_waiting(&*limiter, &names, occupy, Mode::RateLimit, None)?;
    }
    Ok(())
}

/// How long a server that cannot be reached is asked again before a request for slots fails.
const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(30);

/// Takes slots, waiting while every slot is taken.
fn take_waiting(
    limiter: &dyn Limiter,
    names: &[String],
    slots: u32,
    mode: Mode,
    holder: Option<Holder>,
) -> Result<(Option<Uuid>, Vec<String>), ConcurrencyError> {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match limiter.take(names, slots, mode, holder) {
            Ok(Take::Taken { lease, limits }) => return Ok((lease, limits)),
            Ok(Take::Wait(wait)) => {
                unreachable_since = None;
                std::thread::sleep(wait);
            }
            Err(LimitError::Refused(source)) => {
                return Err(ConcurrencyError::Refused { names: names.to_vec(), source });
            }
            Err(LimitError::Unreachable(source)) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNREACHABLE_PATIENCE {
                    let waited = since.elapsed();
                    return Err(ConcurrencyError::Unreachable { names: names.to_vec(), waited, source });
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Whether slots are held until given back, or left to decay (a rate limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Concurrency,
    RateLimit,
}

/// Who holds slots, for the server's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    Task(Uuid),
}

/// The answer to a request for slots.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Take {
    /// Taken: under a lease (none for a rate limit), from these limits.
    Taken { lease: Option<Uuid>, limits: Vec<String> },
    /// Every slot is taken: ask again after this long.
    Wait(Duration),
}

/// Why a request for slots failed.
#[derive(Debug)]
pub(crate) enum LimitError {
    /// The server answered no: asking again will not help.
    Refused(BoxError),
    /// No answer: asking again later may.
    Unreachable(BoxError),
}

/// Where slots come from: a Prefect server, or a fake in unit tests. Leases it hands out
/// stay renewed until given back.
pub(crate) trait Limiter: Send + Sync + std::fmt::Debug {
    /// Whether any of `names` is a limit in force (from what the limiter last learned, a
    /// few seconds old at most).
    fn limits_any(&self, names: &[String]) -> bool;
    /// Asks for `slots` slots of each limit in `names`.
    fn take(&self, names: &[String], slots: u32, mode: Mode, holder: Option<Holder>) -> Result<Take, LimitError>;
    /// Gives back the slots of `lease` (and stops renewing it).
    fn give_back(&self, lease: Uuid);
}

/// The limiter of the server runs report to, or of `PREFECT_API_URL`; none without a server.
pub(crate) fn limiter() -> Option<Arc<dyn Limiter>> {
    #[cfg(feature = "reporting")]
    {
        server::limiter()
    }
    #[cfg(not(feature = "reporting"))]
    {
        None
    }
}

/// The Prefect server's API address (and key) that runs report to, or `PREFECT_API_URL`: for
/// a runner to hand to the processes that execute tasks elsewhere, so that
/// [`concurrency`] and [`rate_limit`] there reach the same server.
pub fn prefect_api() -> Option<(String, Option<String>)> {
    #[cfg(feature = "reporting")]
    if let Some(reporting) = crate::reporting::current() {
        return Some((reporting.client().api_url().to_owned(), std::env::var("PREFECT_API_KEY").ok()));
    }
    let url = std::env::var("PREFECT_API_URL").ok().filter(|url| !url.trim().is_empty())?;
    Some((url, std::env::var("PREFECT_API_KEY").ok()))
}

/// For a run executed on the calling thread (a direct call): takes a slot of each of its
/// tags' limits, waiting; the guard gives them back.
pub(crate) fn hold_tag_slots(spec: &crate::runner::TaskRunSpec) -> Result<ConcurrencyGuard, ConcurrencyError> {
    let names = tag_limit_names(&spec.options.tags);
    // Most runs have no tags: they need no limiter at all.
    let limiter = if names.is_empty() { None } else { limiter().filter(|limiter| limiter.limits_any(&names)) };
    let Some(limiter) = limiter else {
        return Ok(ConcurrencyGuard { held: None, names: Vec::new() });
    };
    let holder = Some(Holder::Task(spec.run.run().id()));
    let (lease, limits) = take_waiting(&*limiter, &names, 1, Mode::Concurrency, holder)?;
    Ok(ConcurrencyGuard { held: lease.map(|lease| (limiter, lease)), names: limits })
}

/// The names of the limits of a run's tags: `tag:<tag>`.
pub(crate) fn tag_limit_names(tags: &[String]) -> Vec<String> {
    tags.iter().map(|tag| format!("tag:{tag}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_one_or_many() {
        assert_eq!("db".names(), ["db"]);
        assert_eq!(["db", "api"].names(), ["db", "api"]);
        assert_eq!(vec!["a".to_owned()].names(), ["a"]);
        assert_eq!(tag_limit_names(&["db".to_owned()]), ["tag:db"]);
    }
}
