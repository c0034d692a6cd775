//! Call-site conversions: what a task's `submit`, `map` and direct call accept for each
//! parameter (a value, a future, a list of futures, an `unmapped` constant), turned into
//! [`Arg`]s and the upstream runs they refer to.

use serde::Serialize;

use crate::future::PrefectFuture;
use crate::task_run::TaskRun;
use crate::wire::Arg;

/// An argument with the upstream task runs it refers to, before it joins a task run's list.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct ArgPiece {
    arg: Arg,
    upstreams: Vec<TaskRun>,
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

    fn upstream(run: &TaskRun) -> Self {
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
    #[doc(hidden)]
    fn into_arg(self) -> ArgPiece;

    /// Text for a task run name template: the value through `show`, or the upstream run's name.
    #[doc(hidden)]
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
        ArgPiece::upstream(self.task_run())
    }

    fn describe(&self, _: &dyn Fn(&T) -> String) -> String {
        self.task_run().name().to_owned()
    }
}

impl<T> IntoArg<T> for &PrefectFuture<T> {
    fn into_arg(self) -> ArgPiece {
        ArgPiece::upstream(self.task_run())
    }

    fn describe(&self, _: &dyn Fn(&T) -> String) -> String {
        self.task_run().name().to_owned()
    }
}

fn describe_futures<'a, T: 'a>(futures: impl IntoIterator<Item = &'a PrefectFuture<T>>) -> String {
    let names: Vec<_> = futures.into_iter().map(|f| f.task_run().name().to_owned()).collect();
    format!("[{}]", names.join(", "))
}

macro_rules! impl_future_lists {
    ($( [$($generics:tt)*] $ty:ty => |$it:ident| $iter:expr; )*) => {$(
        impl<$($generics)*> IntoArg<Vec<T>> for $ty {
            fn into_arg(self) -> ArgPiece {
                let $it = self;
                ArgPiece::list($iter.map(|future| ArgPiece::upstream(future.task_run())))
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

/// Marks an argument of `map` that every mapped run gets whole,
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
    #[doc(hidden)]
    fn into_map_arg(self, show: Option<&dyn Fn(&T) -> String>) -> MapArg;
}

/// What a `map` does with one parameter.
#[doc(hidden)]
#[derive(Debug)]
pub enum MapArg {
    /// One argument per run, with its text for the run name.
    Each(Column),
    /// The same argument for every run.
    Shared(ArgPiece, String),
}

/// A mapped parameter's arguments, one per run. Plain values (the usual case) are kept as
/// bytes end to end in one buffer rather than as pieces of their own, so a map of millions
/// holds a few bytes a run until it submits them, not a hundred.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Column {
    /// The plain values' bytes, in order.
    bytes: Vec<u8>,
    /// Where each run's bytes end in `bytes` (a run that is not a plain value adds none).
    ends: Vec<usize>,
    /// The runs that are not plain values (futures, lists, errors), by run index, in order.
    pieces: Vec<(usize, ArgPiece)>,
    /// Each run's text for the run name template; empty when the template does not use the
    /// parameter.
    descriptions: Vec<String>,
}

impl Column {
    fn push(&mut self, piece: ArgPiece, description: Option<String>) {
        match piece {
            ArgPiece { arg: Arg::Value(bytes), upstreams, error: None } if upstreams.is_empty() => {
                self.bytes.extend_from_slice(&bytes);
            }
            piece => self.pieces.push((self.ends.len(), piece)),
        }
        self.ends.push(self.bytes.len());
        self.descriptions.extend(description);
    }

    /// How many runs it has arguments for.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Each run's argument and text, in order.
    pub(crate) fn into_runs(self) -> ColumnRuns {
        ColumnRuns {
            next: 0,
            bytes: self.bytes,
            ends: self.ends,
            pieces: self.pieces.into_iter().peekable(),
            descriptions: self.descriptions.into_iter(),
        }
    }
}

/// The runs of a [`Column`], one argument and text at a time.
#[derive(Debug)]
pub(crate) struct ColumnRuns {
    next: usize,
    bytes: Vec<u8>,
    ends: Vec<usize>,
    pieces: std::iter::Peekable<std::vec::IntoIter<(usize, ArgPiece)>>,
    descriptions: std::vec::IntoIter<String>,
}

impl Iterator for ColumnRuns {
    type Item = (ArgPiece, String);

    fn next(&mut self) -> Option<(ArgPiece, String)> {
        let index = self.next;
        let end = *self.ends.get(index)?;
        let start = index.checked_sub(1).map_or(0, |previous| self.ends[previous]);
        self.next += 1;
        let piece = match self.pieces.next_if(|(at, _)| *at == index) {
            Some((_, piece)) => piece,
            None => ArgPiece { arg: Arg::Value(self.bytes[start..end].to_vec()), upstreams: Vec::new(), error: None },
        };
        Some((piece, self.descriptions.next().unwrap_or_default()))
    }
}

impl<T, I> IntoMapArg<T> for I
where
    I: IntoIterator,
    I::Item: IntoArg<T>,
{
    fn into_map_arg(self, show: Option<&dyn Fn(&T) -> String>) -> MapArg {
        let mut column = Column::default();
        for item in self {
            let description = show.map(|show| item.describe(show));
            column.push(item.into_arg(), description);
        }
        MapArg::Each(column)
    }
}

fn describe<T>(argument: &impl IntoArg<T>, show: Option<&dyn Fn(&T) -> String>) -> String {
    show.map(|show| argument.describe(show)).unwrap_or_default()
}

impl<T, A: IntoArg<T>> IntoMapArg<T> for Unmapped<A> {
    fn into_map_arg(self, show: Option<&dyn Fn(&T) -> String>) -> MapArg {
        let text = describe(&self.0, show);
        MapArg::Shared(self.0.into_arg(), text)
    }
}

/// Collects one task run's arguments and the upstream runs they refer to.
#[derive(Debug, Default)]
pub(crate) struct ArgsBuilder {
    pub(crate) args: Vec<Arg>,
    pub(crate) upstreams: Vec<TaskRun>,
    pub(crate) error: Option<String>,
}

impl ArgsBuilder {
    /// Adds the next parameter's argument.
    pub(crate) fn push(&mut self, parameter: &str, piece: ArgPiece) {
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

    fn upstream_index(&mut self, run: &TaskRun) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_gives_back_each_run_s_argument_and_text_in_order() {
        let list = ArgPiece::list([ArgPiece::value(&1u8), ArgPiece::value(&2u8)]);
        let refused = ArgPiece { arg: Arg::Value(Vec::new()), upstreams: Vec::new(), error: Some("no".into()) };
        let runs = [ArgPiece::value(&300u32), list, ArgPiece::value(&""), refused, ArgPiece::value("last")];
        let mut column = Column::default();
        for (index, piece) in runs.iter().enumerate() {
            column.push(piece.clone(), Some(format!("run {index}")));
        }
        assert_eq!(column.len(), 5);
        assert_eq!(column.pieces.len(), 2, "only the list and the refused value are kept as pieces");
        let back: Vec<(ArgPiece, String)> = column.into_runs().collect();
        assert_eq!(back.len(), 5);
        for (index, ((piece, text), expected)) in back.iter().zip(&runs).enumerate() {
            assert_eq!(piece.arg, expected.arg, "run {index}");
            assert_eq!(piece.error, expected.error, "run {index}");
            assert_eq!(text, &format!("run {index}"));
        }
    }

    #[test]
    fn a_column_without_texts_gives_empty_ones() {
        let mut column = Column::default();
        column.push(ArgPiece::value(&7u8), None);
        let back: Vec<(ArgPiece, String)> = column.into_runs().collect();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0.arg, Arg::Value(rmp_serde::to_vec_named(&7u8).unwrap()));
        assert_eq!(back[0].1, "");
    }
}
