//! `#[flow]` and `#[task]` for prefect-ray for Rust. See the `prefect` crate for their documentation.

#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

mod attributes;
mod deployment;
mod flow;
mod hooks;
mod signature;
mod task;

use proc_macro::TokenStream;

/// Turns a function into a task: call it (it runs now, as a task run), `submit` it (it runs
/// on the flow's task runner and returns a future), or `map` it over iterables.
///
/// Options: `name`, `retries`, `retry_delay_seconds` (a number or a list), `retry_jitter_factor`,
/// `timeout_seconds`, `tags`, `task_run_name` (a template such as `"shout-{number}"`), and the
/// remote options of cluster runners: `num_cpus`, `num_gpus`, `memory`, `max_retries`,
/// `resources = {"name": amount}`, and `remote_options = {"any_option": value}`.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(attr.into(), item.into()).unwrap_or_else(syn::Error::into_compile_error).into()
}

/// Turns a function into a flow: calling it runs it as a flow run, on its task runner, and
/// returns its value or a `FlowError`.
///
/// Options: `name`, `task_runner` (an expression, evaluated for every run), `retries`,
/// `retry_delay_seconds` and `timeout_seconds`.
#[proc_macro_attribute]
pub fn flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    flow::expand(attr.into(), item.into()).unwrap_or_else(syn::Error::into_compile_error).into()
}
