//! Cache policies: what a run's cache key is made of.

use std::ops::Add;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What a task run's cache key is made of: Prefect's cache policies, combined with `+`.
///
/// Two runs with the same key share one stored value: the second ends `Cached` without
/// running. The key always includes the task's name and module, so two tasks never share a
/// value (in Prefect, `INPUTS` alone is shared by every task with the same inputs; a value of
/// one Rust task's type means nothing to another).
///
/// # Examples
///
/// ```
/// use prefect::results::CachePolicy;
///
/// let policy = CachePolicy::INPUTS + CachePolicy::TASK_SOURCE;
/// assert!(policy.caches());
/// assert!(!CachePolicy::NO_CACHE.caches());
/// // Every input but `verbose` decides the key.
/// let lenient = CachePolicy::INPUTS.excluding(["verbose"]);
/// assert_ne!(lenient, CachePolicy::INPUTS);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePolicy {
    inputs: bool,
    task_source: bool,
    flow_parameters: bool,
    run_id: bool,
    excluded: Vec<String>,
}

impl CachePolicy {
    /// The run's arguments.
    pub const INPUTS: Self = Self::of(true, false, false, false);
    /// The task's source code (its fingerprint): changing the task's code changes the key.
    pub const TASK_SOURCE: Self = Self::of(false, true, false, false);
    /// The parameters of the flow run the task runs in.
    pub const FLOW_PARAMETERS: Self = Self::of(false, false, true, false);
    /// The id of the flow run the task runs in: values are shared within one flow run only.
    pub const RUN_ID: Self = Self::of(false, false, false, true);
    /// No key: every run runs (its value is still persisted when asked).
    pub const NO_CACHE: Self = Self::of(false, false, false, false);
    /// Prefect's default: `INPUTS + TASK_SOURCE + RUN_ID`.
    pub const DEFAULT: Self = Self::of(true, true, false, true);

    const fn of(inputs: bool, task_source: bool, flow_parameters: bool, run_id: bool) -> Self {
        Self { inputs, task_source, flow_parameters, run_id, excluded: Vec::new() }
    }

    /// The same policy, with these parameters left out of `INPUTS` (Prefect's `INPUTS - "x"`).
    pub fn excluding<'a>(mut self, parameters: impl IntoIterator<Item = &'a str>) -> Self {
        self.excluded.extend(parameters.into_iter().map(str::to_owned));
        self
    }

    /// Whether runs under this policy have a key at all (every policy but `NO_CACHE`).
    pub fn caches(&self) -> bool {
        self.inputs || self.task_source || self.flow_parameters || self.run_id
    }

    /// The key of one run under this policy, or `None` for `NO_CACHE`.
    pub(crate) fn key(&self, parts: &KeyParts<'_>) -> Option<String> {
        if !self.caches() {
            return None;
        }
        let mut hash = Sha256::new();
        let mut feed = |label: &str, bytes: &[u8]| {
            hash.update((label.len() as u64).to_le_bytes());
            hash.update(label);
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        feed("task", parts.task.as_bytes());
        if self.inputs {
            for (name, bytes) in parts.parameters.iter().zip(parts.arguments) {
                if !self.excluded.iter().any(|excluded| excluded == name) {
                    feed(name, bytes);
                }
            }
        }
        if self.task_source {
            feed("task_source", parts.fingerprint.as_bytes());
        }
        if self.flow_parameters {
            feed("flow_parameters", parts.flow_parameters.unwrap_or_default().as_bytes());
        }
        if self.run_id {
            feed("run_id", parts.flow_run_id.map(|id| id.to_string()).unwrap_or_default().as_bytes());
        }
        Some(hex(&hash.finalize()))
    }
}

/// `a + b`: a key made of what either policy's is (Prefect's compound policy).
impl Add for CachePolicy {
    type Output = Self;

    fn add(mut self, other: Self) -> Self {
        self.inputs |= other.inputs;
        self.task_source |= other.task_source;
        self.flow_parameters |= other.flow_parameters;
        self.run_id |= other.run_id;
        self.excluded.extend(other.excluded);
        self
    }
}

/// The policies by their Prefect names, for `#[task(cache_policy = INPUTS + TASK_SOURCE)]`.
pub mod policies {
    use super::CachePolicy;

    /// [`CachePolicy::INPUTS`].
    pub const INPUTS: CachePolicy = CachePolicy::INPUTS;
    /// [`CachePolicy::TASK_SOURCE`].
    pub const TASK_SOURCE: CachePolicy = CachePolicy::TASK_SOURCE;
    /// [`CachePolicy::FLOW_PARAMETERS`].
    pub const FLOW_PARAMETERS: CachePolicy = CachePolicy::FLOW_PARAMETERS;
    /// [`CachePolicy::RUN_ID`].
    pub const RUN_ID: CachePolicy = CachePolicy::RUN_ID;
    /// [`CachePolicy::NO_CACHE`].
    pub const NO_CACHE: CachePolicy = CachePolicy::NO_CACHE;
    /// [`CachePolicy::DEFAULT`].
    pub const DEFAULT: CachePolicy = CachePolicy::DEFAULT;
}

/// What a run's key can be made of.
pub(crate) struct KeyParts<'a> {
    /// The task's name and module, without its place in the file.
    pub(crate) task: &'a str,
    pub(crate) fingerprint: &'a str,
    pub(crate) parameters: &'a [&'a str],
    /// One MessagePack value per parameter.
    pub(crate) arguments: &'a [&'a [u8]],
    pub(crate) flow_run_id: Option<Uuid>,
    /// A hash of the flow run's parameters.
    pub(crate) flow_parameters: Option<&'a str>,
}

/// A task's own cache key, instead of a policy's: `#[task(cache_key_fn = f)]`. `None` means
/// "do not cache this run" (it still runs, and its value is persisted under a fresh key).
pub type CacheKeyFn = fn(&CacheKeyContext<'_>) -> Option<String>;

/// What a [`CacheKeyFn`] sees of a run: the task, the flow run, and the arguments.
///
/// # Examples
///
/// ```
/// use prefect::results::CacheKeyContext;
///
/// /// One value per day and city, whatever else the run is given.
/// fn per_city(context: &CacheKeyContext<'_>) -> Option<String> {
///     let city: String = context.argument("city").ok()?;
///     Some(format!("weather-{city}"))
/// }
/// # let _ = per_city;
/// ```
#[derive(Debug)]
pub struct CacheKeyContext<'a> {
    pub(crate) task_name: &'a str,
    pub(crate) flow_run_id: Option<Uuid>,
    pub(crate) parameters: &'a [&'a str],
    pub(crate) arguments: &'a [&'a [u8]],
}

/// Why [`CacheKeyContext::argument`] has no value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArgumentError {
    /// The task has no parameter of this name.
    #[error("the task has no parameter '{0}'")]
    NoSuchParameter(String),
    /// The argument is not of the asked type.
    #[error("parameter '{parameter}' is not of the asked type: {source}")]
    WrongType {
        /// The parameter.
        parameter: String,
        /// Why it did not decode.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

impl CacheKeyContext<'_> {
    /// The task's name.
    pub fn task_name(&self) -> &str {
        self.task_name
    }

    /// The id of the flow run the task runs in, if any.
    pub fn flow_run_id(&self) -> Option<Uuid> {
        self.flow_run_id
    }

    /// The argument of `parameter`, as a `T` (the parameter's own type, or any type that
    /// reads the same serialized form).
    ///
    /// # Errors
    ///
    /// If the task has no such parameter, or the argument does not read as a `T`.
    pub fn argument<T: DeserializeOwned>(&self, parameter: &str) -> Result<T, ArgumentError> {
        let bytes =
            self.argument_bytes(parameter).ok_or_else(|| ArgumentError::NoSuchParameter(parameter.to_owned()))?;
        rmp_serde::from_slice(bytes)
            .map_err(|source| ArgumentError::WrongType { parameter: parameter.to_owned(), source })
    }

    /// The argument of `parameter` as the engine carries it (MessagePack), to hash or compare.
    pub fn argument_bytes(&self, parameter: &str) -> Option<&[u8]> {
        let index = self.parameters.iter().position(|name| *name == parameter)?;
        self.arguments.get(index).copied()
    }
}

/// Lower-case hex, as Prefect writes its keys.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A stable hash of `text`, in hex.
pub(crate) fn hash_text(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(arguments: &'a [&'a [u8]], run: Option<Uuid>) -> KeyParts<'a> {
        KeyParts {
            task: "pipeline::step",
            fingerprint: "abc",
            parameters: &["x", "verbose"],
            arguments,
            flow_run_id: run,
            flow_parameters: Some("p"),
        }
    }

    #[test]
    fn keys_change_with_what_the_policy_is_made_of_and_nothing_else() {
        let (one, two, loud) = (&[1u8][..], &[2u8][..], &[9u8][..]);
        let (run_a, run_b) = (Some(Uuid::new_v4()), Some(Uuid::new_v4()));
        let key = |policy: &CachePolicy, args: &[&[u8]], run| policy.key(&parts(args, run)).unwrap();
        let inputs = CachePolicy::INPUTS;
        assert_eq!(key(&inputs, &[one, one], run_a), key(&inputs, &[one, one], run_b));
        assert_ne!(key(&inputs, &[one, one], run_a), key(&inputs, &[two, one], run_a));
        let lenient = CachePolicy::INPUTS.excluding(["verbose"]);
        assert_eq!(key(&lenient, &[one, one], run_a), key(&lenient, &[one, loud], run_a));
        let default = CachePolicy::DEFAULT;
        assert_ne!(key(&default, &[one, one], run_a), key(&default, &[one, one], run_b));
        assert_eq!(CachePolicy::NO_CACHE.key(&parts(&[one, one], run_a)), None);
        assert_eq!(CachePolicy::INPUTS + CachePolicy::TASK_SOURCE + CachePolicy::RUN_ID, CachePolicy::DEFAULT);
    }

    #[test]
    fn a_key_fn_reads_typed_arguments() {
        let city = rmp_serde::to_vec("Lyon").unwrap();
        let arguments: [&[u8]; 1] = [&city];
        let context =
            CacheKeyContext { task_name: "t", flow_run_id: None, parameters: &["city"], arguments: &arguments };
        assert_eq!(context.argument::<String>("city").unwrap(), "Lyon");
        assert!(matches!(context.argument::<u32>("city"), Err(ArgumentError::WrongType { .. })));
        assert!(matches!(context.argument::<u32>("town"), Err(ArgumentError::NoSuchParameter(_))));
    }
}
