//! `#[flow]`: calling the function runs it as a flow run.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{ItemFn, LitStr};

use crate::attributes::{self, Range};
use crate::signature::Signature;

const OPTIONS: &[&str] = &[
    "name",
    "task_runner",
    "retries",
    "retry_delay_seconds",
    "timeout_seconds",
    "persist_result",
    "on_completion",
    "on_failure",
    "on_crashed",
    "on_cancellation",
];

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let function: ItemFn = syn::parse2(item)?;
    let options = attributes::parse(attr, "flow", OPTIONS)?;
    let signature = Signature::of(&function, "flow")?;

    let ident = &function.sig.ident;
    let mut name = LitStr::new(&ident.to_string().replace('_', "-"), ident.span());
    let mut runner = quote! { ::prefect::ThreadPoolTaskRunner::new() };
    let (mut retries, mut retry_delay, mut timeout) = (quote! { 0 }, quote! { 0.0 }, None);
    let mut persist_result = quote! { ::core::option::Option::None };
    for option in &options {
        match option.name.to_string().as_str() {
            "name" => name = option.string()?,
            "task_runner" => {
                let expr = option.expr()?;
                runner = quote! { #expr };
            }
            "retries" => {
                option.check_numbers(Range::NonNegative, "retries")?;
                let expr = option.expr()?;
                retries = quote! { #expr };
            }
            "retry_delay_seconds" => {
                option.check_numbers(Range::NonNegative, "seconds")?;
                let expr = option.expr()?;
                retry_delay = quote! { (#expr) as f64 };
            }
            "timeout_seconds" => {
                option.check_numbers(Range::Positive, "seconds")?;
                timeout = Some(option.expr()?.clone());
            }
            "persist_result" => {
                let expr = option.expr()?;
                persist_result = quote! { ::core::option::Option::Some::<bool>(#expr) };
            }
            hook if crate::hooks::HOOKS.contains(&hook) => {}
            _ => unreachable!("options were checked"),
        }
    }
    let has_retries = options.iter().any(|o| o.name == "retries");
    let hooks = crate::hooks::state_hooks(&options, quote! { ::prefect::hooks::FlowHook })?;

    let names = signature.names();
    let types = signature.types();
    let value = &signature.value;
    let parameter_names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let key = format!("::{ident}");
    let timeout_option = match &timeout {
        Some(expr) => quote! { ::core::option::Option::Some((#expr) as f64) },
        None => quote! { ::core::option::Option::None },
    };

    let mut inner = function.clone();
    inner.sig.ident = syn::Ident::new("__prefect_flow_body", ident.span());
    inner.vis = syn::Visibility::Inherited;
    inner.attrs.retain(|a| !a.path().is_ident("doc"));
    let outer_attrs: Vec<_> = function.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    let vis = &function.vis;
    let asyncness = &function.sig.asyncness;

    let to_message = quote! { ::std::format!("Flow run encountered an error: {}", error) };
    let call_inner = if signature.is_async {
        quote! { __prefect_flow_body(#(#names),*).await }
    } else {
        quote! { __prefect_flow_body(#(#names),*) }
    };
    let result = signature.value_as_result(call_inner, to_message);
    // Each attempt needs its own arguments: cloned when the flow may retry. Without
    // `retries`, a Prefect server may still retry the run: arguments that implement `Clone`
    // are cloned for each attempt (autoref specialization), others are taken by the first.
    let next_arguments = if has_retries {
        quote! {
            let __next = ::core::option::Option::Some((#(::core::clone::Clone::clone(&#names),)*));
        }
    } else {
        quote! {
            #[allow(unused_imports)]
            use ::prefect::__private::{CloneArguments as _, TakeArguments as _};
            let __next = (&__arguments).next_arguments();
        }
    };
    let unpack = quote! {
        let ::core::option::Option::Some((#(#names,)*)) = __next else {
            return ::core::result::Result::Err(::std::string::String::from(
                "the flow cannot run again: its parameters do not implement Clone, and its first attempt took them",
            ));
        };
    };
    let hold_arguments = if has_retries {
        quote! {}
    } else {
        quote! { let __arguments = ::prefect::__private::Arguments::new((#(#names,)*)); }
    };
    let body_closure = if signature.is_async {
        quote! { move || { #next_arguments async move { #unpack #result } } }
    } else {
        quote! { move || -> ::core::result::Result<#value, ::std::string::String> { #next_arguments #unpack #result } }
    };
    let run = match (signature.is_async, timeout.is_some()) {
        (true, _) => {
            quote! { ::prefect::__private::run_flow_async(&__FLOW, __options, __parameters, __runner, #body_closure).await }
        }
        (false, true) => {
            quote! { ::prefect::__private::run_flow_timed(&__FLOW, __options, __parameters, __runner, #body_closure) }
        }
        (false, false) => {
            quote! { ::prefect::__private::run_flow(&__FLOW, __options, __parameters, __runner, #body_closure) }
        }
    };

    let companion = crate::deployment::companion(&function, &signature, &name, &quote! { #key });

    Ok(quote! {
        #companion

        #(#outer_attrs)*
        #[allow(clippy::too_many_arguments)]
        #vis #asyncness fn #ident(#(#names: #types),*) -> ::core::result::Result<#value, ::prefect::FlowError> {
            // Parameters may serve only the attribute (a runner's address, say).
            #[allow(clippy::too_many_arguments, unused_variables)]
            #inner

            static __FLOW: ::prefect::__private::FlowDefinition = ::prefect::__private::FlowDefinition {
                name: #name,
                key: ::core::concat!(::core::module_path!(), #key),
                hooks: #hooks,
            };
            let mut __parameter_map = ::prefect::__private::serde_json::Map::new();
            {
                #[allow(unused_imports)]
                use ::prefect::__private::{DescribeParameter as _, SerializeParameter as _};
                #( __parameter_map.insert(
                    ::std::string::String::from(#parameter_names),
                    (&::prefect::__private::ParameterProbe(&#names)).parameter_json(),
                ); )*
            }
            let __parameters = ::prefect::__private::serde_json::Value::Object(__parameter_map);
            // The runner first: its expression may use the parameters.
            let __runner = #runner;
            let __options = ::prefect::FlowOptions {
                retries: #retries,
                retry_delay_seconds: #retry_delay,
                timeout_seconds: #timeout_option,
                persist_result: #persist_result,
            };
            #hold_arguments
            #run
        }
    })
}
