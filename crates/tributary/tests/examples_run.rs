//! The examples run, and deliver what they say: each example binary (built by `cargo test`,
//! or by `cargo build -p tributary --examples`, into `<target>/<profile>/examples/`) is run
//! with a deadline; `from_datafile` against a loopback [`RecordingUpstream`] on
//! `127.0.0.1:<free port>` through `TRIBUTARY_ENDPOINT`. A test fails if an example exits
//! non-zero, runs over its deadline (it is killed), or delivers fewer events than it made.
//!
//! `cargo test` (as `scripts/test.sh` runs it) builds every example before any test runs;
//! `cargo test --test examples_run` alone does not: build them first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary_testkit::{RecordingUpstream, delivered_uuids};

/// Longest an example may take: each sends a few dozen events to loopback.
const DEADLINE: Duration = Duration::from_secs(60);

/// `<target>/<profile>/examples/<name>`, beside this test's `<target>/<profile>/deps/`.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not built: run `cargo test -p tributary` or `cargo build -p tributary --examples` first",
        bin.display()
    );
    bin
}

/// Runs an example to completion (killing it at [`DEADLINE`]); returns its stdout.
fn run_example(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(example_binary(name));
    cmd.args(args)
        .env_remove("TRIBUTARY_ENDPOINT")
        .env_remove("TRIBUTARY_DATAFILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("example {name} ran over {DEADLINE:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "example {name} failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

/// The `dispatched N, failed N, dropped N (queue full: N), pending N` line every example
/// prints last: (dispatched, failed, dropped, pending).
fn close_line(name: &str, stdout: &str) -> (u64, u64, u64, u64) {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("dispatched "))
        .unwrap_or_else(|| panic!("example {name} printed no close report:\n{stdout}"));
    let number_after = |word: &str| -> u64 {
        let rest = &line[line.find(word).unwrap_or_else(|| panic!("{line}")) + word.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap_or_else(|_| panic!("{line}"))
    };
    (
        number_after("dispatched"),
        number_after("failed"),
        number_after("dropped"),
        number_after("pending"),
    )
}

#[test]
fn from_datafile_delivers_every_event_to_the_endpoint() {
    let upstream = RecordingUpstream::start();
    let stdout = run_example(
        "from_datafile",
        &[],
        &[("TRIBUTARY_ENDPOINT", upstream.url().as_str())],
    );
    let (dispatched, failed, dropped, pending) = close_line("from_datafile", &stdout);
    // 20 users x (impression + conversion) + 1 conversion without attributes.
    assert_eq!(
        (dispatched, failed, dropped, pending),
        (41, 0, 0, 0),
        "{stdout}"
    );
    let delivered = delivered_uuids(&upstream.requests());
    assert_eq!(delivered.len(), 41, "{stdout}");
    assert_eq!(delivered.iter().collect::<HashSet<_>>().len(), 41);
    assert!(upstream.requests().iter().all(|r| r.path == "/v1/events"));
}

#[test]
fn from_datafile_without_an_endpoint_sends_nothing() {
    let stdout = run_example("from_datafile", &[], &[]);
    assert!(stdout.contains("dry run"), "{stdout}");
    assert!(stdout.contains("would POST"), "{stdout}");
    assert_eq!(close_line("from_datafile", &stdout), (41, 0, 0, 0));
}

#[test]
fn quick_start_runs() {
    let stdout = run_example("quick_start", &[], &[]);
    assert_eq!(
        close_line("quick_start", &stdout),
        (40, 0, 0, 0),
        "{stdout}"
    );
}

#[test]
fn log_event_listener_runs() {
    let stdout = run_example("log_event_listener", &[], &[]);
    assert_eq!(
        close_line("log_event_listener", &stdout),
        (10, 0, 0, 0),
        "{stdout}"
    );
    assert!(stdout.contains("listener saw 10 events"), "{stdout}");
}

#[test]
fn custom_dispatcher_appends_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let path_arg = path.to_str().unwrap();
    let stdout = run_example("custom_dispatcher", &[path_arg], &[]);
    assert_eq!(
        close_line("custom_dispatcher", &stdout),
        (12, 0, 0, 0),
        "{stdout}"
    );
    let lines = std::fs::read_to_string(&path).unwrap();
    let visitors: usize = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["body"]["visitors"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(visitors, 12);
}

#[test]
fn async_dispatcher_delivers_everything_through_close_async() {
    // The example exits non-zero unless its close report is complete.
    let stdout = run_example("async_dispatcher", &[], &[]);
    assert!(
        stdout.contains("all 500 accepted events delivered"),
        "{stdout}"
    );
    assert!(
        stdout.contains("visitors sent: 500, refused: 0"),
        "{stdout}"
    );
}
