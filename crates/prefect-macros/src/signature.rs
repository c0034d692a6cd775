//! What the attributes need to know about the function they decorate.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, Pat, PathArguments, ReturnType, Type};

/// One parameter: its name and its type.
pub(crate) struct Parameter {
    pub(crate) name: syn::Ident,
    pub(crate) ty: Type,
}

/// A function's signature, checked for use as a task or flow.
pub(crate) struct Signature {
    pub(crate) parameters: Vec<Parameter>,
    /// The type the caller gets: the `Ok` type for a function that returns `Result`.
    pub(crate) value: Type,
    /// Whether the function returns a `Result`, whose `Err` is a failure.
    pub(crate) fallible: bool,
    pub(crate) is_async: bool,
}

impl Signature {
    pub(crate) fn of(function: &ItemFn, what: &str) -> syn::Result<Self> {
        let sig = &function.sig;
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            return Err(syn::Error::new(
                sig.generics.span(),
                format!(
                    "a {what} cannot be generic: it is registered under one name and must have concrete parameter types"
                ),
            ));
        }
        if let Some(variadic) = &sig.variadic {
            return Err(syn::Error::new(variadic.span(), format!("a {what} cannot be variadic")));
        }
        let mut parameters = Vec::new();
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(receiver) => {
                    return Err(syn::Error::new(
                        receiver.span(),
                        format!(
                            "#[{what}] cannot be used on a method (a function that takes `self`); make it a free function and pass what it needs as parameters"
                        ),
                    ));
                }
                FnArg::Typed(typed) => {
                    let Pat::Ident(ident) = typed.pat.as_ref() else {
                        return Err(syn::Error::new(
                            typed.pat.span(),
                            format!("the parameters of a {what} must be plain names, such as `value: u32`"),
                        ));
                    };
                    if ident.by_ref.is_some() || ident.subpat.is_some() {
                        return Err(syn::Error::new(
                            ident.span(),
                            format!("the parameters of a {what} must be plain names"),
                        ));
                    }
                    if let (Type::Reference(reference), "task") = (typed.ty.as_ref(), what) {
                        return Err(syn::Error::new(
                            reference.span(),
                            "task parameters must be owned values, because arguments travel to other processes: take `String` instead of `&str`, `Vec<T>` instead of `&[T]`",
                        ));
                    }
                    if let Type::ImplTrait(_) = typed.ty.as_ref() {
                        return Err(syn::Error::new(
                            typed.ty.span(),
                            format!("the parameters of a {what} need concrete types, not `impl Trait`"),
                        ));
                    }
                    parameters.push(Parameter { name: ident.ident.clone(), ty: (*typed.ty).clone() });
                }
            }
        }
        let (value, fallible) = match &sig.output {
            ReturnType::Default => (syn::parse_quote!(()), false),
            ReturnType::Type(_, ty) => match ok_type(ty) {
                Some(ok) => (ok, true),
                None => ((**ty).clone(), false),
            },
        };
        Ok(Self { parameters, value, fallible, is_async: sig.asyncness.is_some() })
    }

    pub(crate) fn names(&self) -> Vec<&syn::Ident> {
        self.parameters.iter().map(|p| &p.name).collect()
    }

    pub(crate) fn types(&self) -> Vec<&Type> {
        self.parameters.iter().map(|p| &p.ty).collect()
    }

    /// Turns the function's return value, bound to `value`, into `Result<Value, failure>`,
    /// with `on_error` turning an `Err(error)` into the failure.
    pub(crate) fn value_as_result(&self, value: TokenStream, on_error: TokenStream) -> TokenStream {
        if self.fallible {
            quote! { match #value { ::core::result::Result::Ok(__ok) => ::core::result::Result::Ok(__ok), ::core::result::Result::Err(error) => ::core::result::Result::Err(#on_error) } }
        } else {
            quote! { ::core::result::Result::Ok(#value) }
        }
    }
}

/// `T` for a return type that is a `Result<T, ..>` (any path whose last segment is `Result`,
/// so `io::Result<T>` and `anyhow::Result<T>` count).
fn ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(arguments) = &last.arguments else {
        return None;
    };
    arguments.args.iter().find_map(|argument| match argument {
        GenericArgument::Type(ty) => Some(ty.clone()),
        _ => None,
    })
}

/// A stable hash of the function's code: FNV-1a over its tokens.
pub(crate) fn fingerprint(function: &ItemFn) -> String {
    let text = function.to_token_stream().to_string();
    let hash = text
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}
