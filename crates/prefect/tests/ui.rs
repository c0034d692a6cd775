//! `#[task]` and `#[flow]` at compile time: right uses compile, and wrong ones fail with a
//! message that says what to do.

#[test]
fn attributes_compile_and_their_errors_explain_themselves() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
