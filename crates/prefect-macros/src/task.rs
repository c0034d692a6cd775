//! `#[task]`: a function becomes a registered task with `submit`, `map` and direct calls.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

use crate::attributes::{self, Range};
use crate::signature::{Signature, fingerprint};

const OPTIONS: &[&str] = &[
    "name",
    "retries",
    "retry_delay_seconds",
    "retry_jitter_factor",
    "timeout_seconds",
    "tags",
    "task_run_name",
    "num_cpus",
    "num_gpus",
    "memory",
    "max_retries",
    "resources",
    "remote_options",
    "on_completion",
    "on_failure",
    "on_crashed",
    "on_cancellation",
    "retry_condition_fn",
    "persist_result",
    "cache_policy",
    "cache_key_fn",
    "cache_expiration",
    "refresh_cache",
    "result_storage",
];

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let function: ItemFn = syn::parse2(item)?;
    let options = attributes::parse(attr, "task", OPTIONS)?;
    let signature = Signature::of(&function, "task")?;

    let vis = &function.vis;
    let ident = &function.sig.ident;
    let docs: Vec<_> = function.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    let other_attrs: Vec<_> = function.attrs.iter().filter(|a| !a.path().is_ident("doc")).collect();
    let handle_type = format_ident!("__prefect_task_{}", ident);
    let definition = format_ident!("__PREFECT_TASK_{}", ident.to_string().to_uppercase());
    let original = format_ident!("__prefect_task_fn_{}", ident);

    let mut name = LitStr::new(&ident.to_string(), ident.span());
    let mut run_name_template = None;
    let mut settings = Vec::new();
    let mut retry_condition = quote! { ::core::option::Option::None };
    let mut cache_key_fn = quote! { ::core::option::Option::None };
    for option in &options {
        let key = option.name.to_string();
        match key.as_str() {
            "name" => name = option.string()?,
            "task_run_name" => run_name_template = Some(option.string()?),
            "retries" => {
                option.check_numbers(Range::NonNegative, "retries")?;
                let value = option.expr()?;
                settings.push(quote! { __options.retries = #value; });
            }
            "retry_delay_seconds" => {
                option.check_numbers(Range::NonNegative, "seconds")?;
                let value = option.seconds_list()?;
                settings.push(quote! { __options.retry_delay_seconds = #value; });
            }
            "retry_jitter_factor" => {
                option.check_numbers(Range::NonNegative, "(a factor of the delay)")?;
                let value = option.expr()?;
                settings
                    .push(quote! { __options.retry_jitter_factor = ::core::option::Option::Some((#value) as f64); });
            }
            "timeout_seconds" => {
                option.check_numbers(Range::Positive, "seconds")?;
                let value = option.expr()?;
                settings.push(quote! { __options.timeout_seconds = ::core::option::Option::Some((#value) as f64); });
            }
            "tags" => {
                let value = option.expr()?;
                settings.push(quote! {
                    __options.tags = ::core::iter::IntoIterator::into_iter(#value).map(|tag| ::std::string::ToString::to_string(&tag)).collect();
                });
            }
            hook if crate::hooks::HOOKS.contains(&hook) => {}
            "retry_condition_fn" => {
                let function = option.expr()?;
                retry_condition = quote! {
                    ::core::option::Option::Some({
                        const CONDITION: ::prefect::hooks::RetryCondition = #function;
                        CONDITION
                    })
                };
            }
            "cache_key_fn" => {
                let function = option.expr()?;
                cache_key_fn = quote! {
                    ::core::option::Option::Some({
                        const KEY: ::prefect::results::CacheKeyFn = #function;
                        KEY
                    })
                };
            }
            "persist_result" | "refresh_cache" => {
                let value = option.expr()?;
                let field = format_ident!("{}", key);
                settings.push(if key == "persist_result" {
                    quote! { __options.persist_result = ::core::option::Option::Some(#value); }
                } else {
                    quote! { __options.#field = #value; }
                });
            }
            "cache_policy" => {
                let value = option.expr()?;
                // INPUTS, TASK_SOURCE, ... by their Prefect names, combined with `+`.
                settings.push(quote! {
                    __options.cache_policy = ::core::option::Option::Some({
                        #[allow(unused_imports)]
                        use ::prefect::results::policies::*;
                        #value
                    });
                });
            }
            "cache_expiration" => {
                option.check_numbers(Range::Positive, "seconds")?;
                let value = option.expr()?;
                settings.push(
                    quote! { __options.cache_expiration_seconds = ::core::option::Option::Some((#value) as f64); },
                );
            }
            "result_storage" => {
                let value = option.string()?;
                settings.push(quote! {
                    __options.result_storage = ::core::option::Option::Some(::std::string::String::from(#value));
                });
            }
            "remote_options" => {
                let attributes::Value::Map(entries) = &option.value else {
                    return Err(attributes::error(
                        option.name.span(),
                        "`remote_options` takes a map: remote_options = {\"option\": value}",
                    ));
                };
                for (key, value) in entries {
                    let json = value.json();
                    settings
                        .push(quote! { __options.remote_options.insert(::std::string::String::from(#key), #json); });
                }
            }
            remote => {
                let json = option.json();
                settings.push(quote! { __options.remote_options.insert(::std::string::String::from(#remote), #json); });
            }
        }
    }

    let hooks = crate::hooks::state_hooks(&options, quote! { ::prefect::hooks::TaskHook })?;
    let names = signature.names();
    let types = signature.types();
    let value = &signature.value;
    let key_prefix = format!("::{ident}@");
    // The place in the source keeps apart tasks of the same name in two functions of one
    // module, whose module paths are the same.
    let registry_key = quote_spanned! { ident.span() =>
        ::core::concat!(::core::module_path!(), #key_prefix, ::core::line!(), ":", ::core::column!())
    };
    let fingerprint = fingerprint(&function);
    let key_suffix = format!("-{}", &fingerprint[..8]);
    let task_key = quote_spanned! { ident.span() =>
        ::core::concat!(::core::module_path!(), #key_prefix, ::core::line!(), ":", ::core::column!(), #key_suffix)
    };
    let parameter_names: Vec<String> = names.iter().map(|n| n.to_string()).collect();

    let (run_name, used) = match &run_name_template {
        Some(template) => {
            let (function, used) = run_name_function(template, &parameter_names)?;
            (quote! { ::core::option::Option::Some(#function) }, used)
        }
        None => (quote! { ::core::option::Option::None }, vec![false; names.len()]),
    };
    let shows: Vec<TokenStream> = signature
        .parameters
        .iter()
        .zip(&used)
        .map(|(parameter, used)| {
            let ty = &parameter.ty;
            if *used {
                quote_spanned! { run_name_template.as_ref().map_or(Span::call_site(), |t| t.span()) =>
                    ::core::option::Option::Some(&|__value: &#ty| ::std::string::ToString::to_string(__value))
                }
            } else {
                quote! { ::core::option::Option::<&dyn ::core::ops::Fn(&#ty) -> ::std::string::String>::None }
            }
        })
        .collect();

    let generics: Vec<_> = (0..names.len()).map(|i| format_ident!("__A{}", i)).collect();
    let checks = types.iter().map(|ty| {
        quote_spanned! { ty.span() => const _: () = ::prefect::__private::assert_task_value::<#ty>(); }
    });
    let value_check =
        quote_spanned! { value.span() => const _: () = ::prefect::__private::assert_task_value::<#value>(); };

    let decode = quote! {
        let mut __decoder = ::prefect::__private::ArgDecoder::new(&#definition, __args)?;
        #( let #names: #types = __decoder.next(#parameter_names)?; )*
    };
    let to_failure = quote! { ::prefect::__private::error_failure(&error) };
    let (body, body_kind, call_method, direct_output, direct_call) = if signature.is_async {
        let result = signature.value_as_result(quote! { #original(#(#names),*).await }, to_failure);
        (
            quote! {
                fn __body(__owned: ::std::vec::Vec<::std::vec::Vec<u8>>) -> ::core::pin::Pin<::std::boxed::Box<dyn ::core::future::Future<Output = ::core::result::Result<::std::vec::Vec<u8>, ::prefect::__private::TaskFailure>> + ::core::marker::Send>> {
                    ::std::boxed::Box::pin(async move {
                        let __slices: ::std::vec::Vec<&[u8]> = __owned.iter().map(|__arg| __arg.as_slice()).collect();
                        let __args = &__slices[..];
                        #decode
                        let __value: #value = #result?;
                        ::prefect::__private::encode_value(&#definition, &__value)
                    })
                }
            },
            quote! { Async },
            quote! {
                /// Runs the task now, as a task run, and resolves to its value.
                pub fn call(&self, #(#names: #types),*) -> ::core::pin::Pin<::std::boxed::Box<dyn ::core::future::Future<Output = ::core::result::Result<#value, ::prefect::TaskError>> + ::core::marker::Send>> {
                    let mut __call = self.task.call();
                    #( __call.arg(#parameter_names, #names, #shows); )*
                    let __run = self.task.run_inline_async(__call);
                    ::std::boxed::Box::pin(async move { __run.await.result() })
                }
            },
            quote! { ::core::pin::Pin<::std::boxed::Box<dyn ::core::future::Future<Output = ::core::result::Result<#value, ::prefect::TaskError>> + ::core::marker::Send>> },
            quote! { #ident.call(#(#names),*) },
        )
    } else {
        let result = signature.value_as_result(quote! { #original(#(#names),*) }, to_failure);
        (
            quote! {
                fn __body(__args: &[&[u8]]) -> ::core::result::Result<::std::vec::Vec<u8>, ::prefect::__private::TaskFailure> {
                    #decode
                    let __value: #value = #result?;
                    ::prefect::__private::encode_value(&#definition, &__value)
                }
            },
            quote! { Sync },
            quote! {
                /// Runs the task now, on this thread, as a task run, and returns its value.
                pub fn call(&self, #(#names: #types),*) -> ::core::result::Result<#value, ::prefect::TaskError> {
                    let mut __call = self.task.call();
                    #( __call.arg(#parameter_names, #names, #shows); )*
                    self.task.run_inline(__call).result()
                }
            },
            quote! { ::core::result::Result<#value, ::prefect::TaskError> },
            quote! { #ident.call(#(#names),*) },
        )
    };

    let mut original_function = function.clone();
    original_function.sig.ident = original.clone();
    original_function.vis = syn::Visibility::Inherited;
    original_function.attrs = other_attrs.into_iter().cloned().collect();

    Ok(quote! {
        #[allow(non_snake_case, clippy::too_many_arguments)]
        #original_function

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(Clone, Debug)]
        #vis struct #handle_type {
            task: ::prefect::__private::Task<#value>,
        }

        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #ident: #handle_type = #handle_type { task: ::prefect::__private::Task::new(&#definition) };

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #[::prefect::__private::linkme::distributed_slice(::prefect::__private::TASKS)]
        #[linkme(crate = ::prefect::__private::linkme)]
        static #definition: ::prefect::__private::TaskDefinition = ::prefect::__private::TaskDefinition {
            name: #name,
            key: #registry_key,
            fingerprint: #fingerprint,
            task_key: #task_key,
            parameters: &[#(#parameter_names),*],
            options: #handle_type::__options,
            run_name: #run_name,
            body: ::prefect::__private::TaskBody::#body_kind(#handle_type::__body),
            hooks: #hooks,
            retry_condition: #retry_condition,
            cache_key_fn: #cache_key_fn,
        };

        #(#checks)*
        #value_check

        #[allow(dead_code, clippy::too_many_arguments)]
        impl #handle_type {
            fn __options() -> ::prefect::TaskOptions {
                #[allow(unused_mut)]
                let mut __options = ::prefect::TaskOptions::default();
                #(#settings)*
                __options
            }

            #body

            /// Submits a run of the task to the flow's task runner and returns its future at
            /// once. Each argument is a value or a future of the parameter's type.
            pub fn submit<#(#generics: ::prefect::IntoArg<#types>),*>(&self, #(#names: #generics),*) -> ::prefect::PrefectFuture<#value> {
                let mut __call = self.task.call();
                #( __call.arg(#parameter_names, #names, #shows); )*
                self.task.submit(__call)
            }

            /// Submits one run per element of the iterable arguments, zipped; arguments
            /// wrapped in `unmapped(...)` go whole to every run.
            ///
            /// # Panics
            ///
            /// If the iterables have different lengths, or none is given.
            #[track_caller]
            pub fn map<#(#generics: ::prefect::IntoMapArg<#types>),*>(&self, #(#names: #generics),*) -> ::std::vec::Vec<::prefect::PrefectFuture<#value>> {
                let mut __mapping = self.task.mapping();
                #( __mapping.arg::<#types>(#parameter_names, #names, #shows); )*
                self.task.map(__mapping)
            }

            #call_method

            /// The same task with changed options for the runs submitted through it.
            #[must_use = "with_options returns a new task and leaves this one unchanged; submit through the task it returns"]
            pub fn with_options(&self, change: impl ::core::ops::FnOnce(&mut ::prefect::TaskOptions)) -> Self {
                Self { task: self.task.with_options(change) }
            }

            /// The same task, whose runs first wait for these futures to finish.
            #[must_use = "wait_for returns a new task and leaves this one unchanged; submit through the task it returns"]
            pub fn wait_for(&self, futures: impl ::prefect::WaitFor) -> Self {
                Self { task: self.task.wait_for(futures) }
            }

            /// The task's display name.
            pub fn name(&self) -> &'static str {
                self.task.definition().name
            }

            /// The key the task is registered under.
            pub fn key(&self) -> &'static str {
                self.task.definition().key
            }

            /// The options its runs will use.
            pub fn options(&self) -> ::prefect::TaskOptions {
                self.task.options()
            }

            /// What a runner in another process needs to find and run the task.
            pub fn definition(&self) -> &'static ::prefect::runner::TaskDefinition {
                self.task.definition()
            }
        }

        impl ::core::ops::Deref for #handle_type {
            type Target = fn(#(#types),*) -> #direct_output;

            fn deref(&self) -> &Self::Target {
                #[allow(clippy::too_many_arguments)]
                fn __direct(#(#names: #types),*) -> #direct_output {
                    #direct_call
                }
                &(__direct as fn(#(#types),*) -> #direct_output)
            }
        }
    })
}

/// A function that renders the run name template from the arguments' texts, and which
/// parameters it uses.
fn run_name_function(template: &LitStr, parameters: &[String]) -> syn::Result<(TokenStream, Vec<bool>)> {
    let text = template.value();
    let mut format = String::new();
    let mut arguments = Vec::new();
    let mut used = vec![false; parameters.len()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                format.push_str("{{");
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                format.push_str("}}");
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => {
                            return Err(syn::Error::new(template.span(), "unclosed `{` in task_run_name"));
                        }
                    }
                }
                let Some(index) = parameters.iter().position(|p| *p == name.trim()) else {
                    return Err(syn::Error::new(
                        template.span(),
                        format!(
                            "task_run_name refers to `{{{name}}}`, which is not a parameter; the parameters are: {}",
                            parameters.join(", ")
                        ),
                    ));
                };
                used[index] = true;
                format.push_str("{}");
                arguments.push(index);
            }
            '}' => {
                return Err(syn::Error::new(template.span(), "unmatched `}` in task_run_name; write `}}` for a brace"));
            }
            c => format.push(c),
        }
    }
    let format = LitStr::new(&format, template.span());
    Ok((
        quote! {{
            fn __run_name(__texts: &[::std::string::String]) -> ::std::string::String {
                ::std::format!(#format, #(__texts[#arguments]),*)
            }
            __run_name
        }},
        used,
    ))
}
