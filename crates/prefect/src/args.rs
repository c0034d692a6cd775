//! Task arguments: values or futures, serialized for a run that may happen in another process.
//!
//! Each argument becomes an [`Arg`]: a serialized value, a reference to an upstream task run
//! whose result fills the slot, or a list of those (a `Vec` of futures for a `Vec<T>`
//! parameter). A runner turns the arguments into the task's payload with [`assemble`] once the
//! upstream results are at hand, wherever that is. MessagePack values concatenate, so
//! assembling is copying bytes: no value is decoded on the way.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::TaskFailure;
use crate::future::PrefectFuture;
use crate::registry::TaskDefinition;
use crate::task_run::TaskRunHandle;

/// One parameter's argument, ready to travel to any process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Arg {
    /// A MessagePack-encoded value.
    Value(#[serde(with = "serde_bytes_compat")] Vec<u8>),
    /// The result of upstream task run number `n` of the run's upstream list.
    Upstream(usize),
    /// A list whose elements are arguments themselves.
    List(Vec<Arg>),
}

/// An argument with the upstream task runs it refers to, before it joins a task run's list.
#[derive(Clone)]
pub struct ArgPiece {
    arg: Arg,
    upstreams: Vec<TaskRunHandle>,
    error: Option<String>,
}

impl ArgPiece {
    fn value<T: Serialize + ?Sized>(value: &T) -> Self {
        match rmp_serde::to_vec_named(value) {
            Ok(bytes) => Self { arg: Arg::Value(bytes), upstreams: Vec::new(), error: None },
            Err(error) => Self {
                arg: Arg::Value(Vec::new()),
                upstreams: Vec::new(),
                error: Some(format!("could not serialize the argument: {error}")),
            },
        }
    }

    fn upstream(run: &TaskRunHandle) -> Self {
        Self { arg: Arg::Upstream(0), upstreams: vec![run.clone()], error: None }
    }

    fn list(pieces: impl IntoIterator<Item = ArgPiece>) -> Self {
        let mut args = ArgsBuilder::default();
        let items = pieces.into_iter().map(|piece| args.add_piece(piece)).collect();
        Self { arg: Arg::List(items), upstreams: args.upstreams, error: args.error }
    }
}

/// A value that can stand for a task parameter of type `T`: a `T` or `&T`, a
/// [`PrefectFuture<T>`] or a reference to one, and for `Vec<T>` parameters a `Vec`, slice or
/// array of futures.
///
/// # Examples
///
/// ```
/// use prefect::{flow, task};
///
/// #[task]
/// fn add(a: u32, b: u32) -> u32 {
///     a + b
/// }
///
/// #[task]
/// fn total(values: Vec<u32>) -> u32 {
///     values.iter().sum()
/// }
///
/// #[flow]
/// fn arithmetic() -> u32 {
///     let three = add.submit(1, 2);
///     let seven = add.submit(&three, 4);
///     let parts = vec![three, seven];
///     total.submit(parts).result().unwrap()
/// }
///
/// assert_eq!(arithmetic().unwrap(), 10);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be passed where the task expects `{T}`",
    label = "expected `{T}`, a `PrefectFuture<{T}>`, or a reference to one",
    note = "a task argument is a value of the parameter's type or a future of it; a `Vec` parameter also takes a `Vec` or slice of futures"
)]
pub trait IntoArg<T> {
    /// Serializes the argument, or notes the upstream run it refers to.
    fn into_arg(self) -> ArgPiece;

    /// Text for a task run name template: the value through `show`, or the upstream run's name.
    fn describe(&self, show: &dyn Fn(&T) -> String) -> String;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self) -> ArgPiece {
        ArgPiece::value(&self)
    }

    fn describe(&self, show: &dyn Fn(&T) -> String) -> String {
        show(self)
    }
}

impl<T: Serialize> IntoArg<T> for &T {
    fn into_arg(self) -> ArgPiece {
        ArgPiece::value(self)
    }

    fn describe(&self, show: &dyn Fn(&T) -> String) -> String {
        show(self)
    }
}

impl<T> IntoArg<T> for PrefectFuture<T> {
    fn into_arg(self) -> ArgPiece {
        ArgPiece::upstream(self.handle())
    }

    fn describe(&self, _: &dyn Fn(&T) -> String) -> String {
        self.handle().name().to_owned()
    }
}

impl<T> IntoArg<T> for &PrefectFuture<T> {
    fn into_arg(self) -> ArgPiece {
        ArgPiece::upstream(self.handle())
    }

    fn describe(&self, _: &dyn Fn(&T) -> String) -> String {
        self.handle().name().to_owned()
    }
}

fn describe_futures<'a, T: 'a>(futures: impl IntoIterator<Item = &'a PrefectFuture<T>>) -> String {
    let names: Vec<_> = futures.into_iter().map(|f| f.handle().name().to_owned()).collect();
    format!("[{}]", names.join(", "))
}

macro_rules! impl_future_lists {
    ($( [$($generics:tt)*] $ty:ty => |$it:ident| $iter:expr; )*) => {$(
        impl<$($generics)*> IntoArg<Vec<T>> for $ty {
            fn into_arg(self) -> ArgPiece {
                let $it = self;
                ArgPiece::list($iter.map(|future| ArgPiece::upstream(future.handle())))
            }

            fn describe(&self, _: &dyn Fn(&Vec<T>) -> String) -> String {
                let $it = self;
                describe_futures($iter)
            }
        }
    )*};
}

impl_future_lists! {
    [T] Vec<PrefectFuture<T>> => |list| list.iter();
    [T] &Vec<PrefectFuture<T>> => |list| list.iter();
    [T] &[PrefectFuture<T>] => |list| list.iter();
    [T, const N: usize] [PrefectFuture<T>; N] => |list| list.iter();
    [T, const N: usize] &[PrefectFuture<T>; N] => |list| list.iter();
    ['a, T] Vec<&'a PrefectFuture<T>> => |list| list.iter().copied();
}

/// Marks an argument of [`map`](crate::TaskHandle) that every mapped run gets whole,
/// instead of one element each.
///
/// # Examples
///
/// ```
/// use prefect::{flow, task, unmapped};
///
/// #[task]
/// fn scale(value: u32, factor: u32) -> u32 {
///     value * factor
/// }
///
/// #[flow]
/// fn scaled() -> Vec<u32> {
///     let futures = scale.map(vec![1, 2, 3], unmapped(10));
///     futures.iter().map(|f| f.result().unwrap()).collect()
/// }
///
/// assert_eq!(scaled().unwrap(), [10, 20, 30]);
/// ```
pub fn unmapped<A>(argument: A) -> Unmapped<A> {
    Unmapped(argument)
}

/// An argument passed whole to every run of a `map`; see [`unmapped`].
#[derive(Clone, Debug)]
pub struct Unmapped<A>(pub A);

/// One parameter's arguments for a `map`: an iterable with an element per run, or an
/// [`Unmapped`] value shared by every run.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be mapped over for a parameter of type `{T}`",
    note = "pass an iterable whose items are `{T}` or `PrefectFuture<{T}>`, or wrap a constant in `unmapped(...)`"
)]
pub trait IntoMapArg<T> {
    /// Serializes the arguments, each with its text for a run name template (through
    /// `show`, when the template uses the parameter).
    fn into_map_arg(self, show: Option<&dyn Fn(&T) -> String>) -> MapArg;
}

/// What a `map` does with one parameter.
pub enum MapArg {
    /// One argument per run, with its text for the run name.
    Each(Vec<(ArgPiece, String)>),
    /// The same argument for every run.
    Shared(ArgPiece, String),
}

fn describe<T>(argument: &impl IntoArg<T>, show: Option<&dyn Fn(&T) -> String>) -> String {
    show.map(|show| argument.describe(show)).unwrap_or_default()
}

impl<T, I> IntoMapArg<T> for I
where
    I: IntoIterator,
    I::Item: IntoArg<T>,
{
    fn into_map_arg(self, show: Option<&dyn Fn(&T) -> String>) -> MapArg {
        MapArg::Each(
            self.into_iter()
                .map(|item| {
                    let text = describe(&item, show);
                    (item.into_arg(), text)
                })
                .collect(),
        )
    }
}

impl<T, A: IntoArg<T>> IntoMapArg<T> for Unmapped<A> {
    fn into_map_arg(self, show: Option<&dyn Fn(&T) -> String>) -> MapArg {
        let text = describe(&self.0, show);
        MapArg::Shared(self.0.into_arg(), text)
    }
}

/// Collects one task run's arguments and the upstream runs they refer to.
#[derive(Default)]
pub struct ArgsBuilder {
    pub(crate) args: Vec<Arg>,
    pub(crate) upstreams: Vec<TaskRunHandle>,
    pub(crate) error: Option<String>,
}

impl ArgsBuilder {
    /// Adds the next parameter's argument.
    pub fn push(&mut self, parameter: &str, piece: ArgPiece) {
        if let Some(error) = &piece.error
            && self.error.is_none()
        {
            self.error = Some(format!("parameter '{parameter}': {error}"));
        }
        let arg = self.add_piece(piece);
        self.args.push(arg);
    }

    fn add_piece(&mut self, piece: ArgPiece) -> Arg {
        if self.error.is_none() {
            self.error = piece.error;
        }
        let offsets: Vec<usize> = piece.upstreams.iter().map(|run| self.upstream_index(run)).collect();
        renumber(piece.arg, &offsets)
    }

    fn upstream_index(&mut self, run: &TaskRunHandle) -> usize {
        match self.upstreams.iter().position(|known| known.id() == run.id()) {
            Some(index) => index,
            None => {
                self.upstreams.push(run.clone());
                self.upstreams.len() - 1
            }
        }
    }
}

fn renumber(arg: Arg, offsets: &[usize]) -> Arg {
    match arg {
        Arg::Value(bytes) => Arg::Value(bytes),
        Arg::Upstream(index) => Arg::Upstream(offsets[index]),
        Arg::List(items) => Arg::List(items.into_iter().map(|item| renumber(item, offsets)).collect()),
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
/// use prefect::args::{assemble, Arg};
///
/// let two = rmp_serde::to_vec(&2u32).unwrap();
/// let five = rmp_serde::to_vec(&5u32).unwrap();
/// let args = [Arg::Value(two), Arg::List(vec![Arg::Upstream(0), Arg::Upstream(0)])];
/// let built = assemble(&args, &[&five]);
/// let first: u32 = rmp_serde::from_slice(&built[0]).unwrap();
/// let second: Vec<u32> = rmp_serde::from_slice(&built[1]).unwrap();
/// assert_eq!((first, second), (2, vec![5, 5]));
/// ```
pub fn assemble<'a>(args: &'a [Arg], upstream_results: &[&'a [u8]]) -> Arguments<'a> {
    fn write(out: &mut Vec<u8>, arg: &Arg, upstream_results: &[&[u8]]) {
        match arg {
            Arg::Value(bytes) => out.extend_from_slice(bytes),
            Arg::Upstream(index) => out.extend_from_slice(upstream_results[*index]),
            Arg::List(items) => {
                rmp::encode::write_array_len(out, items.len() as u32).expect("writing to a Vec cannot fail");
                for item in items {
                    write(out, item, upstream_results);
                }
            }
        }
    }
    args.iter()
        .map(|arg| match arg {
            Arg::Value(bytes) => Cow::Borrowed(bytes.as_slice()),
            Arg::Upstream(index) => Cow::Borrowed(upstream_results[*index]),
            list => {
                let mut out = Vec::new();
                write(&mut out, list, upstream_results);
                Cow::Owned(out)
            }
        })
        .collect()
}

/// Decodes a task's arguments one parameter at a time, so an error names the parameter.
/// Used by the code `#[task]` generates.
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

/// Serde support that stores byte vectors as MessagePack binary rather than arrays of numbers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(byte) = seq.next_element()? {
                    out.push(byte);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
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
        let built = assemble(&args, &refs);
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
}
