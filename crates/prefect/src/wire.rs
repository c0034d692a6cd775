//! Task arguments on the wire: how a run's arguments and value travel to any process.
//!
//! Each argument is an [`Arg`]: a serialized value, a reference to an upstream task run
//! whose result fills the slot, or a list of those (a `Vec` of futures for a `Vec<T>`
//! parameter). A runner turns the arguments into the task's input with [`assemble`] once the
//! upstream results are at hand, wherever that is. MessagePack values concatenate, so
//! assembling is copying bytes: no value is decoded on the way.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::TaskFailure;
use crate::registry::TaskDefinition;

/// One parameter's argument, ready to travel to any process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Arg {
    /// A MessagePack-encoded value.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The result of upstream task run number `n` of the run's upstream list.
    Upstream(usize),
    /// A list whose elements are arguments themselves.
    List(Vec<Arg>),
}

/// An [`Arg`] that borrows its values from the bytes it was read from: an executor reads a
/// call's arguments as views into the call it received (shared memory, for a large one), so
/// a value is not copied before the task decodes it. It has the same wire form as `Arg`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Arg")]
pub enum ArgView<'a> {
    /// A MessagePack-encoded value.
    Value(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    /// The result of upstream task run number `n` of the run's upstream list.
    Upstream(usize),
    /// A list whose elements are arguments themselves.
    List(#[serde(borrow)] Vec<ArgView<'a>>),
}

impl Arg {
    /// This argument as a view of its bytes.
    pub fn view(&self) -> ArgView<'_> {
        match self {
            Arg::Value(bytes) => ArgView::Value(bytes),
            Arg::Upstream(index) => ArgView::Upstream(*index),
            Arg::List(items) => ArgView::List(items.iter().map(Arg::view).collect()),
        }
    }
}

/// A task's arguments, ready for its body: one MessagePack value per parameter, each
/// borrowed where it can be (a value, or a whole upstream result) and built only for lists
/// that hold upstream results.
pub type Arguments<'a> = Vec<Cow<'a, [u8]>>;

/// Builds a task's arguments, with each upstream slot filled by that upstream run's
/// serialized result. Arguments that are plain values or whole upstream results are not
/// copied: MessagePack values concatenate, so a list is its header and its elements' bytes.
///
/// # Panics
///
/// If an argument refers to an upstream run that `upstream_results` lacks.
///
/// # Examples
///
/// ```
/// use prefect::runner::{assemble, Arg};
///
/// let two = rmp_serde::to_vec(&2u32).unwrap();
/// let five = rmp_serde::to_vec(&5u32).unwrap();
/// let args = [Arg::Value(two), Arg::List(vec![Arg::Upstream(0), Arg::Upstream(0)])];
/// let built = assemble(args.iter().map(Arg::view), &[&five]);
/// let first: u32 = rmp_serde::from_slice(&built[0]).unwrap();
/// let second: Vec<u32> = rmp_serde::from_slice(&built[1]).unwrap();
/// assert_eq!((first, second), (2, vec![5, 5]));
/// ```
pub fn assemble<'a>(args: impl IntoIterator<Item = ArgView<'a>>, upstream_results: &[&'a [u8]]) -> Arguments<'a> {
    fn write(out: &mut Vec<u8>, arg: &ArgView<'_>, upstream_results: &[&[u8]]) {
        match arg {
            ArgView::Value(bytes) => out.extend_from_slice(bytes),
            ArgView::Upstream(index) => out.extend_from_slice(upstream_results[*index]),
            ArgView::List(items) => {
                rmp::encode::write_array_len(out, items.len() as u32).expect("writing to a Vec cannot fail");
                for item in items {
                    write(out, item, upstream_results);
                }
            }
        }
    }
    args.into_iter()
        .map(|arg| match arg {
            ArgView::Value(bytes) => Cow::Borrowed(bytes),
            ArgView::Upstream(index) => Cow::Borrowed(upstream_results[index]),
            list => {
                let mut out = Vec::new();
                write(&mut out, &list, upstream_results);
                Cow::Owned(out)
            }
        })
        .collect()
}

/// Decodes a task's arguments one parameter at a time, so an error names the parameter.
/// Used by the code `#[task]` generates.
#[derive(Debug)]
pub struct ArgDecoder<'a> {
    task: &'static TaskDefinition,
    args: std::slice::Iter<'a, &'a [u8]>,
}

impl<'a> ArgDecoder<'a> {
    /// Starts decoding `args` (one MessagePack value per parameter) for `task`.
    ///
    /// # Errors
    ///
    /// If there is not one argument per parameter.
    pub fn new(task: &'static TaskDefinition, args: &'a [&'a [u8]]) -> Result<Self, TaskFailure> {
        if args.len() != task.parameters.len() {
            return Err(TaskFailure::permanent(format!(
                "task '{}' takes {} parameter(s) but received {} argument(s); the caller was built from other code",
                task.name,
                task.parameters.len(),
                args.len()
            )));
        }
        Ok(Self { task, args: args.iter() })
    }

    /// Decodes the next parameter.
    ///
    /// # Errors
    ///
    /// If the bytes do not decode as a `T`; the message names the task and the parameter.
    pub fn next<T: DeserializeOwned>(&mut self, parameter: &str) -> Result<T, TaskFailure> {
        let bytes = self.args.next().copied().unwrap_or_default();
        rmp_serde::from_slice(bytes).map_err(|error| {
            TaskFailure::permanent(format!(
                "could not deserialize parameter '{parameter}' of task '{}' as `{}`: {error}",
                self.task.name,
                std::any::type_name::<T>()
            ))
        })
    }
}

/// Serializes a task's value; used by the code `#[task]` generates.
pub fn encode_value<T: Serialize>(task: &TaskDefinition, value: &T) -> Result<Vec<u8>, TaskFailure> {
    rmp_serde::to_vec_named(value).map_err(|error| {
        TaskFailure::permanent(format!("could not serialize the value returned by task '{}': {error}", task.name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_fills_upstream_slots_inside_lists_and_borrows_the_rest() {
        let value = |v: u32| Arg::Value(rmp_serde::to_vec(&v).unwrap());
        let upstream = [rmp_serde::to_vec(&7u32).unwrap(), rmp_serde::to_vec(&9u32).unwrap()];
        let refs: Vec<&[u8]> = upstream.iter().map(Vec::as_slice).collect();
        let args = [value(1), Arg::Upstream(0), Arg::List(vec![Arg::Upstream(1), value(3), Arg::Upstream(0)])];
        let built = assemble(args.iter().map(Arg::view), &refs);
        assert!(matches!(built[0], Cow::Borrowed(_)) && matches!(built[1], Cow::Borrowed(_)), "no copies");
        let decoded: (u32, u32, Vec<u32>) = (
            rmp_serde::from_slice(&built[0]).unwrap(),
            rmp_serde::from_slice(&built[1]).unwrap(),
            rmp_serde::from_slice(&built[2]).unwrap(),
        );
        assert_eq!(decoded, (1, 7, vec![9, 3, 7]));
    }

    #[test]
    fn args_round_trip_as_messagepack_with_binary_values() {
        let args = vec![Arg::Value(vec![1, 2, 3]), Arg::List(vec![Arg::Upstream(2)])];
        let bytes = rmp_serde::to_vec(&args).unwrap();
        assert!(bytes.windows(2).any(|w| w == [0xc4, 3]), "values travel as msgpack bin");
        let back: Vec<Arg> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, args);
    }

    #[test]
    fn views_have_the_wire_form_of_args_and_borrow_their_values() {
        let args = vec![Arg::Value(vec![7; 64]), Arg::List(vec![Arg::Upstream(1), Arg::Value(vec![1])])];
        let bytes = rmp_serde::to_vec_named(&args).unwrap();
        let views: Vec<ArgView<'_>> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(views, args.iter().map(Arg::view).collect::<Vec<_>>());
        let ArgView::Value(value) = views[0] else { panic!("{views:?}") };
        assert!(bytes.as_ptr_range().contains(&value.as_ptr()), "the value is read in place, not copied");
        assert_eq!(rmp_serde::to_vec_named(&views).unwrap(), bytes, "and written back the same");
    }
}
