//! What `#[task]` exposes: call a task, submit it, map it.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use crate::context::{self, FlowRunContext};
use crate::future::PrefectFuture;
use crate::into_arg::{ArgsBuilder, IntoArg, IntoMapArg, MapArg};
use crate::observe::TaskRunInfo;
use crate::options::TaskOptions;
use crate::registry::TaskDefinition;
use crate::results::ResultPlan;
use crate::runner::TaskRunSpec;
use crate::state::State;
use crate::task_engine;
use crate::task_run::{TaskRun, TaskRunWriter};
use crate::wire::Arg;

/// How many of a map's runs go to the runner at a time: enough for a runner to batch them
/// as it would the whole map (the Ray runner's batches of 256 stay whole up to 8 CPUs and
/// hold 64 runs at 32), few enough that their calls (about 850 bytes each, with their
/// options) are a small part of a map of millions.
const SUBMIT_CHUNK: usize = 16_384;
/// A task with the options its runs will use: what `#[task]` turns a function into, typed by
/// the value `V` its runs produce.
///
/// The code `#[task]` generates wraps one of these and adds typed `submit`, `map` and
/// `call` methods with the function's parameters; the methods here are shared by every task.
pub struct Task<V> {
    definition: &'static TaskDefinition,
    options: Option<Arc<TaskOptions>>,
    wait_for: Vec<TaskRun>,
    value: PhantomData<fn() -> V>,
}

impl<V> Clone for Task<V> {
    fn clone(&self) -> Self {
        Self {
            definition: self.definition,
            options: self.options.clone(),
            wait_for: self.wait_for.clone(),
            value: PhantomData,
        }
    }
}

impl<V> std::fmt::Debug for Task<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("name", &self.definition.name).field("key", &self.definition.key).finish()
    }
}

impl<V> Task<V> {
    /// The task defined by `definition`, whose body produces a `V`, with its attribute's options.
    pub const fn new(definition: &'static TaskDefinition) -> Self {
        Self { definition, options: None, wait_for: Vec::new(), value: PhantomData }
    }

    /// The task's definition.
    pub fn definition(&self) -> &'static TaskDefinition {
        self.definition
    }

    /// The options its runs will use.
    pub fn options(&self) -> TaskOptions {
        match &self.options {
            Some(options) => (**options).clone(),
            None => (self.definition.options)(),
        }
    }

    /// The same task with changed options, for the runs submitted through it.
    pub fn with_options(&self, change: impl FnOnce(&mut TaskOptions)) -> Self {
        let mut options = self.options();
        change(&mut options);
        Self { options: Some(Arc::new(options)), ..self.clone() }
    }

    /// The same task, whose runs also wait for `futures` to finish (without taking their values).
    pub fn wait_for(&self, futures: impl WaitFor) -> Self {
        let mut task = self.clone();
        futures.add_to(&mut task.wait_for);
        task
    }

    /// Starts collecting the arguments of one run.
    pub fn call(&self) -> TaskCall {
        TaskCall { args: ArgsBuilder::default(), descriptions: Vec::new() }
    }

    /// Starts collecting the arguments of a `map`.
    pub fn mapping(&self) -> Mapping {
        Mapping { definition: self.definition, columns: Vec::new() }
    }

    /// Hands a run to the current flow's runner and returns its future at once.
    pub fn submit(&self, call: TaskCall) -> PrefectFuture<V> {
        let context = context::current_or_standalone();
        let run = match self.prepare(&context, call) {
            Ok(spec) => {
                let run = spec.run.run().clone();
                context.runner.submit(spec);
                context.recheck_cancellation();
                run
            }
            Err(run) => run,
        };
        PrefectFuture::new(run)
    }

    /// Submits one run per element of the mapped arguments, zipped.
    ///
    /// # Panics
    ///
    /// If the mapped iterables have different lengths, or no parameter is mapped.
    #[track_caller]
    pub fn map(&self, mapping: Mapping) -> Vec<PrefectFuture<V>> {
        let count = mapping.count();
        let context = context::current_or_standalone();
        let mut runs = Vec::with_capacity(count);
        // Together, so a runner can send them together; in chunks, so that a map of millions
        // does not hold every run's call at once (a chunk is far more than a runner batches).
        let chunk = count.min(SUBMIT_CHUNK);
        let mut specs = Vec::with_capacity(chunk);
        for call in mapping.calls(count) {
            match self.prepare(&context, call) {
                Ok(spec) => {
                    runs.push(spec.run.run().clone());
                    specs.push(spec);
                    if specs.len() == chunk {
                        // The next chunk's room made at once: grown by doubling, it would
                        // hold twice a chunk's calls at times.
                        context.runner.submit_many(std::mem::replace(&mut specs, Vec::with_capacity(chunk)));
                    }
                }
                Err(run) => runs.push(run),
            }
        }
        if !specs.is_empty() {
            context.runner.submit_many(specs);
        }
        context.recheck_cancellation();
        runs.into_iter().map(PrefectFuture::new).collect()
    }

    /// Runs a run now, on this thread, and returns its future once it has finished.
    pub fn run_inline(&self, call: TaskCall) -> PrefectFuture<V> {
        let context = context::current_or_standalone();
        let run = match self.prepare(&context, call) {
            Ok(spec) => {
                spec.dependencies().for_each(|run| {
                    run.wait(None);
                });
                let run = spec.run.run().clone();
                match crate::concurrency::hold_tag_slots(&spec) {
                    Ok(_slots) => task_engine::run_here(spec),
                    Err(error) => spec.run.finish(State::failed(error.to_string()), None),
                }
                run
            }
            Err(run) => run,
        };
        PrefectFuture::new(run)
    }

    /// Runs a run now, as a future that finishes with it.
    pub fn run_inline_async(&self, call: TaskCall) -> impl Future<Output = PrefectFuture<V>> + Send + 'static
    where
        V: 'static,
    {
        let context = context::current_or_standalone();
        let prepared = self.prepare(&context, call);
        async move {
            let spec = match prepared {
                Ok(spec) => spec,
                Err(run) => return PrefectFuture::new(run),
            };
            for run in spec.dependencies() {
                context::Finished(run.clone()).await;
            }
            let run = spec.run.run().clone();
            task_engine::run_here_async(spec).await;
            PrefectFuture::new(run)
        }
    }

    /// Creates the run: names it, registers it with the flow run, and describes it to
    /// observers. A run whose arguments could not be serialized, or whose options are out of
    /// range, ends `Failed` at once.
    fn prepare(&self, context: &Arc<FlowRunContext>, call: TaskCall) -> Result<TaskRunSpec, TaskRun> {
        context.wait_while_paused();
        let definition = self.definition;
        let mut options = self.options();
        crate::options::apply_remote_scopes(&mut options);
        let id = Uuid::new_v4();
        let name = match definition.run_name {
            Some(template) => template(&call.descriptions),
            None => format!("{}-{}", definition.name, &id.simple().to_string()[..3]),
        };
        let TaskCall { args: ArgsBuilder { args, upstreams, error }, .. } = call;
        let info = TaskRunInfo {
            id,
            name,
            task_name: definition.name,
            task_key: definition.task_key,
            dynamic_key: context.next_dynamic_key(definition.key),
            flow_run_id: context.info.as_ref().map(|info| info.id),
            tags: options.tags.clone(),
            inputs: inputs(definition, &args, &upstreams, &self.wait_for),
            retries: options.retries,
            retry_delay_seconds: options.retry_delay_seconds.clone(),
            created: Utc::now(),
        };
        let writer = TaskRunWriter::new(info, definition, &context.span, context.runner_name.clone());
        {
            let _entered = context.span.enter();
            tracing::info!(target: "prefect::flow_run", "Created task run '{}' for task '{}'", writer.name(), definition.name);
        }
        context.tracker.track(writer.run());
        if let Some(reason) = context.cancellation() {
            let run = writer.run().clone();
            writer.finish(State::cancelled(reason), None);
            return Err(run);
        }
        let results = ResultPlan::for_run(definition, &options, context.info.as_ref(), context.persist_result);
        let refused = match (error, options.validate(), results.as_ref().map(ResultPlan::check)) {
            (Some(error), _, _) => Some(format!("could not send the arguments of task '{}': {error}", definition.name)),
            (None, Err(error), _) => Some(format!("invalid options for task '{}': {error}", definition.name)),
            (None, Ok(()), Some(Err(error))) => Some(format!("task '{}': {error}", definition.name)),
            _ => None,
        };
        if let Some(message) = refused {
            let run = writer.run().clone();
            writer.finish(State::failed(message), None);
            return Err(run);
        }
        Ok(TaskRunSpec { run: writer, args, upstreams, wait_for: self.wait_for.clone(), options, results })
    }
}

/// For each parameter, the upstream runs that feed it; wait-fors under `wait_for`.
fn inputs(
    definition: &TaskDefinition,
    args: &[Arg],
    upstreams: &[TaskRun],
    wait_for: &[TaskRun],
) -> Vec<(&'static str, Vec<Uuid>)> {
    fn collect(arg: &Arg, upstreams: &[TaskRun], out: &mut Vec<Uuid>) {
        match arg {
            Arg::Value(_) => {}
            Arg::Upstream(index) => out.push(upstreams[*index].id()),
            Arg::List(items) => items.iter().for_each(|item| collect(item, upstreams, out)),
        }
    }
    let mut inputs: Vec<(&'static str, Vec<Uuid>)> = definition
        .parameters
        .iter()
        .zip(args)
        .map(|(parameter, arg)| {
            let mut ids = Vec::new();
            collect(arg, upstreams, &mut ids);
            (*parameter, ids)
        })
        .collect();
    if !wait_for.is_empty() {
        inputs.push(("wait_for", wait_for.iter().map(TaskRun::id).collect()));
    }
    inputs
}

/// The arguments of one run, collected parameter by parameter.
#[derive(Debug)]
pub struct TaskCall {
    args: ArgsBuilder,
    descriptions: Vec<String>,
}

impl TaskCall {
    /// Adds the next parameter's argument. `show` renders it for the task run name
    /// template, when the template uses this parameter.
    pub fn arg<T, A: IntoArg<T>>(&mut self, parameter: &str, argument: A, show: Option<&dyn Fn(&T) -> String>) {
        self.descriptions.push(show.map(|show| argument.describe(show)).unwrap_or_default());
        self.args.push(parameter, argument.into_arg());
    }
}

/// The arguments of a `map`, collected parameter by parameter.
#[derive(Debug)]
pub struct Mapping {
    definition: &'static TaskDefinition,
    columns: Vec<(&'static str, MapArg)>,
}

impl Mapping {
    /// Adds the next parameter's arguments. `show` renders them for the task run name
    /// template, when the template uses this parameter.
    pub fn arg<T>(
        &mut self,
        parameter: &'static str,
        argument: impl IntoMapArg<T>,
        show: Option<&dyn Fn(&T) -> String>,
    ) {
        self.columns.push((parameter, argument.into_map_arg(show)));
    }

    /// How many runs the map makes: the length of its iterables.
    ///
    /// # Panics
    ///
    /// If the mapped iterables have different lengths, or no parameter is mapped.
    #[track_caller]
    fn count(&self) -> usize {
        let lengths: Vec<(&str, usize)> = self
            .columns
            .iter()
            .filter_map(|(parameter, column)| match column {
                MapArg::Each(column) => Some((*parameter, column.len())),
                MapArg::Shared(..) => None,
            })
            .collect();
        let Some(&(first, count)) = lengths.first() else {
            panic!(
                "map of task '{}' got no iterable argument: pass at least one iterable, and wrap constants in unmapped(...)",
                self.definition.name
            );
        };
        if let Some(&(other, other_count)) = lengths.iter().find(|(_, len)| *len != count) {
            panic!(
                "map of task '{}' got iterables of different lengths: '{first}' has {count} item(s) but '{other}' has {other_count}; pass iterables of equal length, or wrap constants in unmapped(...)",
                self.definition.name
            );
        }
        count
    }

    /// The arguments of each of the `count` runs, zipping the mapped parameters.
    fn calls(self, count: usize) -> impl Iterator<Item = TaskCall> {
        let mut columns: Vec<_> = self
            .columns
            .into_iter()
            .map(|(parameter, column)| match column {
                MapArg::Each(column) => (parameter, Err(column.into_runs())),
                MapArg::Shared(piece, description) => (parameter, Ok((piece, description))),
            })
            .collect();
        (0..count).map(move |_| {
            let mut call = TaskCall { args: ArgsBuilder::default(), descriptions: Vec::with_capacity(columns.len()) };
            for (parameter, column) in &mut columns {
                let (piece, description) = match column {
                    Ok((piece, description)) => (piece.clone(), description.clone()),
                    Err(items) => items.next().expect("lengths were checked"),
                };
                call.descriptions.push(description);
                call.args.push(parameter, piece);
            }
            call
        })
    }
}

/// Futures a run can wait for: one future or a reference to one, a `Vec`, slice or array
/// of them, or a tuple of any of those (futures of different types).
pub trait WaitFor {
    /// Adds the runs behind these futures to `runs`.
    #[doc(hidden)]
    fn add_to(self, runs: &mut Vec<TaskRun>);
}

impl<T> WaitFor for PrefectFuture<T> {
    fn add_to(self, runs: &mut Vec<TaskRun>) {
        runs.push(self.task_run().clone());
    }
}

impl<T> WaitFor for &PrefectFuture<T> {
    fn add_to(self, runs: &mut Vec<TaskRun>) {
        runs.push(self.task_run().clone());
    }
}

impl<T> WaitFor for &[PrefectFuture<T>] {
    fn add_to(self, runs: &mut Vec<TaskRun>) {
        runs.extend(self.iter().map(|future| future.task_run().clone()));
    }
}

impl<T> WaitFor for &Vec<PrefectFuture<T>> {
    fn add_to(self, runs: &mut Vec<TaskRun>) {
        self.as_slice().add_to(runs);
    }
}

impl<T> WaitFor for Vec<PrefectFuture<T>> {
    fn add_to(self, runs: &mut Vec<TaskRun>) {
        self.as_slice().add_to(runs);
    }
}

impl<W: WaitFor, const N: usize> WaitFor for [W; N] {
    fn add_to(self, runs: &mut Vec<TaskRun>) {
        self.into_iter().for_each(|w| w.add_to(runs));
    }
}

macro_rules! wait_for_tuples {
    ($(($($name:ident),+))*) => {$(
        impl<$($name: WaitFor),+> WaitFor for ($($name,)+) {
            #[allow(non_snake_case)]
            fn add_to(self, runs: &mut Vec<TaskRun>) {
                let ($($name,)+) = self;
                $($name.add_to(runs);)+
            }
        }
    )*};
}

wait_for_tuples! { (A) (A, B) (A, B, C) (A, B, C, D) (A, B, C, D, E) (A, B, C, D, E, F) }
