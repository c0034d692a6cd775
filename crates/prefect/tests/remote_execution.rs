//! The runner contract: a task runs in another process from nothing but its registered key,
//! its fingerprint and its serialized arguments, as the Ray runner's executors run it.

use std::borrow::Cow;
use std::process::Command;

use prefect::runner::{self, Arg, assemble};
use prefect::{TaskOptions, task};

#[task]
fn scale(values: Vec<u32>, factor: u32) -> Vec<u32> {
    values.iter().map(|v| v * factor).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// The other process: finds the task by key, checks its fingerprint, runs it.
#[test]
#[ignore = "run by a_task_runs_in_another_process_from_its_key_and_bytes"]
fn child_executes_a_task_by_key() {
    let key = std::env::var("TASK_KEY").unwrap();
    let args: Vec<Cow<[u8]>> =
        std::env::var("TASK_ARGS").unwrap().split(',').map(|arg| Cow::Owned(unhex(arg))).collect();
    let task = runner::lookup(&key).expect("the task is registered in this binary");
    assert_eq!(task.fingerprint, std::env::var("TASK_FINGERPRINT").unwrap());
    let execution =
        prefect::runner::execute(task, &args, &TaskOptions::default(), None, &tracing::Span::none(), &mut |_| {});
    assert!(execution.state.is_completed(), "{}", execution.state);
    println!("RESULT={}", hex(&execution.result.unwrap()));
}

#[test]
fn a_task_runs_in_another_process_from_its_key_and_bytes() {
    let definition = scale.definition();
    let values = rmp_serde::to_vec(&vec![1u32, 2, 3]).unwrap();
    let factor = rmp_serde::to_vec(&10u32).unwrap();
    // The first argument comes from an "upstream" result, as a runner fills it in.
    let args = [Arg::Upstream(0), Arg::Value(factor)];
    let args = assemble(args.iter().map(Arg::view), &[&values]);
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_executes_a_task_by_key", "--ignored", "--nocapture"])
        .env("TASK_KEY", definition.key)
        .env("TASK_FINGERPRINT", definition.fingerprint)
        .env("TASK_ARGS", args.iter().map(|arg| hex(arg)).collect::<Vec<_>>().join(","))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let result = stdout.lines().find_map(|line| line.strip_prefix("RESULT=")).expect("the child printed a result");
    let value: Vec<u32> = rmp_serde::from_slice(&unhex(result)).unwrap();
    assert_eq!(value, [10, 20, 30]);
}

#[test]
fn undecodable_arguments_name_the_task_and_parameter() {
    let definition = scale.definition();
    let args = [Arg::Value(rmp_serde::to_vec("not a list").unwrap()), Arg::Value(vec![0x01])];
    let args = assemble(args.iter().map(Arg::view), &[]);
    let mut states = Vec::new();
    let execution = prefect::runner::execute(
        definition,
        &args,
        &TaskOptions::default().retries(3),
        None,
        &tracing::Span::none(),
        &mut |s| states.push(s.name),
    );
    assert!(execution.state.is_failed());
    assert_eq!(states, ["Running"], "a payload that cannot decode is not retried");
    let message = execution.state.message.unwrap();
    assert!(message.contains("parameter 'values' of task 'scale'"), "{message}");
}

fn first_loader() -> &'static prefect::runner::TaskDefinition {
    #[task]
    fn load() -> String {
        "first".to_owned()
    }
    load.definition()
}

fn second_loader() -> &'static prefect::runner::TaskDefinition {
    #[task]
    fn load() -> String {
        "second".to_owned()
    }
    load.definition()
}

#[test]
fn tasks_of_one_name_in_two_functions_of_a_module_have_keys_of_their_own() {
    let (first, second) = (first_loader(), second_loader());
    assert_ne!(first.key, second.key);
    for (definition, expected) in [(first, "first"), (second, "second")] {
        let found = runner::lookup(definition.key).expect("each key finds its task");
        assert!(std::ptr::eq(found, definition), "{} found another task", definition.key);
        let execution =
            prefect::runner::execute(found, &[], &TaskOptions::default(), None, &tracing::Span::none(), &mut |_| {});
        let value: String = rmp_serde::from_slice(&execution.result.unwrap()).unwrap();
        assert_eq!(value, expected);
    }
}
