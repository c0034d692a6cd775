//! `on_completion`, `on_failure`, `on_crashed` and `on_cancellation`: lists of plain
//! functions, called when a run reaches that final state.

use proc_macro2::TokenStream;
use quote::quote;
use syn::Expr;

use crate::attributes::{self, Option_};

/// The options that name state hooks.
pub(crate) const HOOKS: &[&str] = &["on_completion", "on_failure", "on_crashed", "on_cancellation"];

/// A `StateHooks` value from the hook options among `options`; `hook_type` is the function
/// pointer type each hook must coerce to.
pub(crate) fn state_hooks(options: &[Option_], hook_type: TokenStream) -> syn::Result<TokenStream> {
    let mut fields = Vec::new();
    for hook in HOOKS {
        let field = syn::Ident::new(hook, proc_macro2::Span::call_site());
        let functions = match options.iter().find(|option| option.name == hook) {
            Some(option) => functions(option)?,
            None => Vec::new(),
        };
        // A typed constant: each function item coerces to the hook's pointer type, and one
        // with the wrong signature is an error at its own name.
        fields.push(quote! {
            #field: { const HOOKS: &[#hook_type] = &[#(#functions),*]; HOOKS }
        });
    }
    Ok(quote! { ::prefect::hooks::StateHooks { #(#fields),* } })
}

/// The functions of one hook option: a list (`[notify, page]`) or one function.
fn functions(option: &Option_) -> syn::Result<Vec<Expr>> {
    match option.expr()? {
        Expr::Array(array) => Ok(array.elems.iter().cloned().collect()),
        Expr::Path(path) => Ok(vec![Expr::Path(path.clone())]),
        other => Err(attributes::error(
            syn::spanned::Spanned::span(other),
            format!("`{}` takes a list of functions: {} = [my_hook]", option.name, option.name),
        )),
    }
}
