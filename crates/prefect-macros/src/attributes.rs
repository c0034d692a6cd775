//! Parsing `name = value` options, where a value may also be a `{"key": value}` map.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitStr, Token, braced};

/// One `name = value` option.
pub(crate) struct Option_ {
    pub(crate) name: Ident,
    pub(crate) value: Value,
}

/// An option's value: an expression, or a `{"key": value}` map whose values may be maps.
pub(crate) enum Value {
    Expr(Expr),
    Map(Vec<(LitStr, Value)>),
}

impl Parse for Value {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(syn::token::Brace) {
            let content;
            braced!(content in input);
            let entries = Punctuated::<MapEntry, Token![,]>::parse_terminated(&content)?;
            Ok(Value::Map(entries.into_iter().map(|entry| (entry.key, entry.value)).collect()))
        } else {
            Ok(Value::Expr(input.parse()?))
        }
    }
}

impl Parse for Option_ {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name: Ident = input.parse()?;
        input
            .parse::<Token![=]>()
            .map_err(|error| syn::Error::new(error.span(), format!("expected `{name} = <value>`")))?;
        Ok(Self { name, value: input.parse()? })
    }
}

struct MapEntry {
    key: LitStr,
    value: Value,
}

impl Parse for MapEntry {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let key = input.parse()?;
        input.parse::<Token![:]>()?;
        Ok(Self { key, value: input.parse()? })
    }
}

/// Parses the options, checking each name against `known`.
pub(crate) fn parse(attr: TokenStream, macro_name: &str, known: &[&str]) -> syn::Result<Vec<Option_>> {
    let options = Punctuated::<Option_, Token![,]>::parse_terminated.parse2(attr)?;
    let mut seen: Vec<String> = Vec::new();
    for option in &options {
        let name = option.name.to_string();
        if !known.contains(&name.as_str()) {
            return Err(syn::Error::new(
                option.name.span(),
                format!("unknown #[{macro_name}] option `{name}`; expected one of: {}", known.join(", ")),
            ));
        }
        if seen.contains(&name) {
            return Err(syn::Error::new(option.name.span(), format!("option `{name}` is given twice")));
        }
        seen.push(name);
    }
    Ok(options.into_iter().collect())
}

impl Option_ {
    pub(crate) fn expr(&self) -> syn::Result<&Expr> {
        match &self.value {
            Value::Expr(expr) => Ok(expr),
            Value::Map(_) => {
                Err(syn::Error::new(self.name.span(), format!("`{}` takes a value, not a map", self.name)))
            }
        }
    }

    pub(crate) fn string(&self) -> syn::Result<LitStr> {
        match self.expr()? {
            Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(text), .. }) => Ok(text.clone()),
            other => Err(syn::Error::new_spanned(other, format!("`{}` takes a string literal", self.name))),
        }
    }

    /// The value as JSON, for remote options: a map becomes an object.
    pub(crate) fn json(&self) -> TokenStream {
        self.value.json()
    }

    /// The value as a list of `f64`: a number, or an array literal of numbers.
    pub(crate) fn seconds_list(&self) -> syn::Result<TokenStream> {
        Ok(match self.expr()? {
            Expr::Array(array) => {
                let items = array.elems.iter();
                quote! { ::std::vec![#((#items) as f64),*] }
            }
            expr => quote! { ::std::vec![(#expr) as f64] },
        })
    }
}

impl Value {
    /// The value as JSON: an expression serialized, a map as an object.
    pub(crate) fn json(&self) -> TokenStream {
        match self {
            Value::Expr(expr) => quote! {
                ::prefect::__private::serde_json::to_value(&(#expr)).expect("remote option values serialize to JSON")
            },
            Value::Map(entries) => {
                let inserts = entries.iter().map(|(key, value)| {
                    let value = value.json();
                    quote! { __map.insert(::std::string::String::from(#key), #value); }
                });
                quote! {{
                    let mut __map = ::prefect::__private::serde_json::Map::new();
                    #(#inserts)*
                    ::prefect::__private::serde_json::Value::Object(__map)
                }}
            }
        }
    }
}

/// The error for a wrong use of an attribute, at `span`.
pub(crate) fn error(span: Span, message: impl std::fmt::Display) -> syn::Error {
    syn::Error::new(span, message)
}

/// The value of a number literal, possibly negated or in parentheses; `None` for any other
/// expression (a constant, a call), which can only be checked at run time.
pub(crate) fn literal_number(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(int), .. }) => int.base10_digits().parse().ok(),
        Expr::Lit(syn::ExprLit { lit: syn::Lit::Float(float), .. }) => float.base10_digits().parse().ok(),
        Expr::Unary(syn::ExprUnary { op: syn::UnOp::Neg(_), expr, .. }) => literal_number(expr).map(|n| -n),
        Expr::Paren(inner) => literal_number(&inner.expr),
        Expr::Group(inner) => literal_number(&inner.expr),
        _ => None,
    }
}

/// What a number option must be.
#[derive(Clone, Copy)]
pub(crate) enum Range {
    /// Zero or more: retries, delays, jitter.
    NonNegative,
    /// More than zero: timeouts.
    Positive,
}

/// Checks a number literal against `range`, so an option out of range does not compile.
/// Expressions that are not literals pass, and are checked when a run is created.
pub(crate) fn check_number(option: &Ident, expr: &Expr, range: Range, what: &str) -> syn::Result<()> {
    let Some(value) = literal_number(expr) else { return Ok(()) };
    let fits = match range {
        Range::NonNegative => value >= 0.0,
        Range::Positive => value > 0.0,
    };
    if fits && value.is_finite() {
        return Ok(());
    }
    let wanted = match range {
        Range::NonNegative => "zero or more",
        Range::Positive => "more than zero",
    };
    Err(syn::Error::new_spanned(expr, format!("`{option}` must be {wanted} {what}; got {value}")))
}

impl Option_ {
    /// Checks a number option (or each number of a list) against `range`.
    pub(crate) fn check_numbers(&self, range: Range, what: &str) -> syn::Result<()> {
        match self.expr()? {
            Expr::Array(array) => array.elems.iter().try_for_each(|item| check_number(&self.name, item, range, what)),
            expr => check_number(&self.name, expr, range, what),
        }
    }
}
