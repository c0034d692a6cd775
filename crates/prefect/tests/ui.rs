//! Wrong uses of `#[task]` and `#[flow]` fail to compile with a message that says what to do.

#[test]
fn attribute_errors_explain_themselves() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
