//! The companion of a `#[flow]`: a type of the same name (types and functions live in
//! different namespaces) whose `to_deployment` offers the flow to a Prefect server, so that
//! `count_to::to_deployment("count-to")` reads as Python's `count_to.to_deployment(...)`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::visit::Visit;
use syn::{Expr, ItemFn, Lit, LitStr, Meta, Type};

use crate::signature::Signature;

/// The companion's code, or nothing when a parameter's type borrows (`&str`) or is `impl
/// Trait`: such a flow cannot take its parameters from a server.
pub(crate) fn companion(function: &ItemFn, signature: &Signature, name: &LitStr, key: &TokenStream) -> TokenStream {
    if signature.parameters.iter().any(|parameter| !owned(&parameter.ty)) {
        return TokenStream::new();
    }
    let ident = &function.sig.ident;
    let vis = &function.vis;
    let names = signature.names();
    let types = signature.types();
    let parameter_names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let description = doc_text(function);
    let locals: Vec<_> = names.iter().map(|n| format_ident!("__prefect_{}", n)).collect();
    let call = if signature.is_async {
        quote! { ::prefect::serve::__block_on(#ident(#(#locals),*)) }
    } else {
        quote! { #ident(#(#locals),*) }
    };
    // A bound that names a lifetime is checked where the function is called, not where it
    // is defined: a flow whose parameters cannot be served still compiles, and only a call
    // of `to_deployment` says why.
    let bounds = quote! { #( for<'__prefect> #types: ::prefect::serve::ServedParameter, )* };
    quote! {
        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code)]
        #vis struct #ident {}

        #[allow(dead_code, clippy::too_many_arguments)]
        impl #ident {
            /// This flow as a Prefect deployment named `name`, to serve with `prefect::serve`.
            #vis fn to_deployment(name: impl ::core::convert::Into<::std::string::String>) -> ::prefect::serve::Deployment
            where
                #bounds
            {
                let schema: fn() -> ::prefect::__private::serde_json::Value = || {
                    let mut schema = ::prefect::serve::ParameterSchema::default();
                    #( schema.add::<#types>(#parameter_names); )*
                    schema.finish()
                };
                let run: ::prefect::serve::RunWithParameters = |parameters| {
                    #( let #locals: #types = ::prefect::serve::__parameter(parameters, #parameter_names)?; )*
                    ::core::result::Result::Ok(#call.map(drop))
                };
                ::prefect::serve::Deployment::__new(
                    name.into(),
                    #name,
                    ::core::concat!(::core::module_path!(), #key),
                    #description,
                    schema,
                    run,
                )
            }
        }
    }
}

/// The function's doc comment, as the deployment's description.
fn doc_text(function: &ItemFn) -> String {
    let mut lines = Vec::new();
    for attr in &function.attrs {
        if let Meta::NameValue(meta) = &attr.meta
            && meta.path.is_ident("doc")
            && let Expr::Lit(syn::ExprLit { lit: Lit::Str(text), .. }) = &meta.value
        {
            let text = text.value();
            lines.push(text.strip_prefix(' ').unwrap_or(&text).to_owned());
        }
    }
    lines.join("\n")
}

/// Whether a type owns its data: no references, no `impl Trait`, no elided lifetimes.
fn owned(ty: &Type) -> bool {
    struct Borrows(bool);
    impl<'ast> Visit<'ast> for Borrows {
        fn visit_type_reference(&mut self, _: &'ast syn::TypeReference) {
            self.0 = true;
        }
        fn visit_type_impl_trait(&mut self, _: &'ast syn::TypeImplTrait) {
            self.0 = true;
        }
        fn visit_lifetime(&mut self, _: &'ast syn::Lifetime) {
            self.0 = true;
        }
        fn visit_type_bare_fn(&mut self, _: &'ast syn::TypeBareFn) {
            self.0 = true;
        }
        fn visit_type_trait_object(&mut self, _: &'ast syn::TypeTraitObject) {
            self.0 = true;
        }
    }
    let mut borrows = Borrows(false);
    borrows.visit_type(ty);
    !borrows.0
}
