//! The live progress line: drawn on an interactive terminal (a pseudo-terminal from
//! `script`, as a user's shell would give), absent when stderr is piped or the user turns it
//! off.

use std::process::Command;

use prefect::{flow, task};

#[task]
fn step(number: u32) -> u32 {
    number
}

#[task]
fn refuse() -> Result<u32, String> {
    Err("no".into())
}

/// Says it is halfway, then takes a moment: the line shows it meanwhile.
#[task]
fn halfway() -> u32 {
    prefect::progress(0.5);
    std::thread::sleep(std::time::Duration::from_millis(600));
    0
}

#[flow]
fn progress_demo() -> u32 {
    let steps = step.map(0..5u32);
    refuse.submit().wait(None);
    halfway.submit().wait(None);
    steps.into_iter().map(|future| future.result().unwrap()).sum()
}

#[test]
#[ignore = "the program of the tests below, which start it"]
fn progress_program() {
    assert_eq!(progress_demo().unwrap(), 10);
}

/// The program's output: under a pseudo-terminal if `terminal`.
fn run(terminal: bool, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let program = format!("{} --exact progress_program --ignored --nocapture", exe.display());
    let mut command = if terminal {
        let mut command = Command::new("script");
        command.args(["-qec", &program, "/dev/null"]);
        command
    } else {
        let mut command = Command::new(&exe);
        command.args(["--exact", "progress_program", "--ignored", "--nocapture"]);
        command
    };
    command.env_remove("PREFECT_API_URL").env_remove("PREFECT_PROGRESS");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("the program runs (script is util-linux's)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn a_terminal_shows_a_live_progress_line_and_a_pipe_does_not() {
    let shown = run(true, &[]);
    assert!(shown.contains("progress-demo: 7/7 runs · 0 running · 1 failed"), "{shown}");
    assert!(shown.contains("1 running (50%)"), "what a task says of its progress shows: {shown}");
    // Log lines print above the line: each starts on a cleared line of its own.
    assert!(shown.contains("\r\u{1b}[2K"), "{shown:?}");
    assert!(shown.contains("Finished in state Completed()"), "{shown}");

    let piped = run(false, &[]);
    assert!(piped.contains("Finished in state Completed()"), "{piped}");
    assert!(!piped.contains("runs ·"), "{piped}");

    let off = run(true, &[("PREFECT_PROGRESS", "off")]);
    assert!(off.contains("Finished in state Completed()"), "{off}");
    assert!(!off.contains("runs ·"), "{off}");
}
