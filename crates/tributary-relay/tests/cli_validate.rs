//! `tributary validate`, run as a process on the shared fixtures and on crafted files.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/python-sdk-5.7.0")
        .join(name)
}

fn validate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("validate")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A valid payload with one problem planted per `(pointer, value)` pair.
fn broken_conversion(changes: &[(&str, serde_json::Value)]) -> String {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("conversion.json")).unwrap()).unwrap();
    for (pointer, value) in changes {
        *v.pointer_mut(pointer).unwrap() = value.clone();
    }
    serde_json::to_string(&v).unwrap()
}

#[test]
fn python_sdk_fixtures_are_valid() {
    let imp = fixture("impression.json");
    let conv = fixture("conversion.json");
    let out = validate(&[imp.to_str().unwrap(), conv.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let conv_len = std::fs::metadata(&conv).unwrap().len();
    assert!(
        text.contains(&format!(
            "OK {} (1 visitors, 1 events, {conv_len} bytes) [EventBatch]",
            conv.display()
        )),
        "{text}"
    );
    assert_eq!(text.lines().filter(|l| l.starts_with("OK ")).count(), 2);
}

#[test]
fn every_problem_in_a_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.json",
        &broken_conversion(&[
            ("/account_id", "".into()),
            ("/anonymize_ip", "true".into()),
            ("/visitors/0/snapshots/0/events/0/timestamp", (-5).into()),
            ("/visitors/0/snapshots/0/events/0/revenue", 42.5.into()),
            ("/visitors/0/attributes/2/value", serde_json::Value::Null),
        ]),
    );
    let out = validate(&[&bad]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for line in [
        format!("{bad}: $.account_id: must not be empty"),
        format!("{bad}: $.anonymize_ip: expected a boolean, found a string"),
        format!(
            "{bad}: $.visitors[0].attributes[2].value: expected a string, a boolean or a number, found null"
        ),
        format!("{bad}: $.visitors[0].snapshots[0].events[0].timestamp: must not be negative"),
        format!(
            "{bad}: $.visitors[0].snapshots[0].events[0].revenue: expected an integer, found a number"
        ),
        format!("INVALID {bad} (5 problems) [EventBatch]"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

#[test]
fn json_output_lists_problems_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.json",
        &broken_conversion(&[
            ("/visitors/0/visitor_id", 7.into()),
            ("/visitors/0/snapshots/0/events/0/key", "".into()),
        ]),
    );
    let good = fixture("impression.json");
    let out = validate(&["--json", good.to_str().unwrap(), &bad]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["files"][0]["status"], "ok");
    assert_eq!(doc["files"][0]["kind"], "event_batch");
    assert_eq!(doc["files"][0]["summary"]["events"], 1);
    assert_eq!(doc["files"][1]["status"], "invalid");
    let paths: Vec<&str> = doc["files"][1]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "$.visitors[0].visitor_id",
            "$.visitors[0].snapshots[0].events[0].key"
        ]
    );
}

#[test]
fn syntax_errors_name_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "trunc.json",
        "{\"account_id\": \"1\",\n \"visitors\": [",
    );
    let out = validate(&[&bad]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{bad}: $: invalid JSON at line 2, column 14")),
        "{text}"
    );
}

#[test]
fn unreadable_file_exits_2_and_others_are_still_checked() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let good = fixture("conversion.json");
    let out = validate(&[missing.to_str().unwrap(), good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: cannot read:", missing.display())),
        "{err}"
    );
    assert!(stdout(&out).starts_with("OK "), "{}", stdout(&out));
    // A directory cannot be read as a file either.
    let out = validate(&[dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn mixed_valid_and_invalid_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "empty.json",
        r#"{"account_id":"1","visitors":[]}"#,
    );
    let good = fixture("impression.json");
    let out = validate(&[good.to_str().unwrap(), &bad]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{bad}: $.visitors: must not be empty")),
        "{text}"
    );
    assert!(text.contains(&format!("OK {}", good.display())), "{text}");
}

#[test]
fn log_event_json_is_detected_and_its_params_checked() {
    let dir = tempfile::tempdir().unwrap();
    let params: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("impression.json")).unwrap()).unwrap();
    let log_event = serde_json::json!({
        "url": "https://logx.optimizely.com/v1/events",
        "http_verb": "POST",
        "headers": {"Content-Type": "application/json"},
        "params": params,
    });
    let good = write(
        dir.path(),
        "log_event.json",
        &serde_json::to_string_pretty(&log_event).unwrap(),
    );
    let mut broken = log_event.clone();
    broken["params"]["visitors"][0]["snapshots"][0]["decisions"][0]["variation_id"] = 410102.into();
    let bad = write(dir.path(), "bad_log_event.json", &broken.to_string());

    let out = validate(&[&good]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let compact = serde_json::to_vec(&params).unwrap().len();
    assert!(
        text.contains(&format!(
            "OK {good} (1 visitors, 1 events, {compact} bytes) [LogEvent params]"
        )),
        "{text}"
    );

    let out = validate(&[&bad]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "{bad}: $.params.visitors[0].snapshots[0].decisions[0].variation_id: expected a string or null, found a number"
        )),
        "{text}"
    );
    assert!(text.contains("[LogEvent params]"), "{text}");
}

#[test]
fn dash_reads_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["validate", "-"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let body = std::fs::read(fixture("conversion.json")).unwrap();
    child.stdin.take().unwrap().write_all(&body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).starts_with(&format!(
            "OK - (1 visitors, 1 events, {} bytes)",
            body.len()
        )),
        "{}",
        stdout(&out)
    );
}

#[test]
fn oversized_payload_and_file_bound_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Many valid visitors: each is fine, the body is over the Event API's limit.
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("conversion.json")).unwrap()).unwrap();
    let visitor = v["visitors"][0].to_string();
    let count = tributary::MAX_PAYLOAD_BYTES / visitor.len() + 1;
    let mut body = String::from(r#"{"account_id":"12133785640","visitors":["#);
    body.push_str(&vec![visitor.as_str(); count].join(","));
    body.push_str("]}");
    let big = write(dir.path(), "big.json", &body);
    let out = validate(&[&big]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains(&format!("{big}: $: body is {} bytes", body.len())),
        "{text}"
    );
    // The relay's rules do not limit size.
    let out = validate(&["--shape", &big]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("({count} visitors, {} bytes)", body.len())),
        "{}",
        stdout(&out)
    );
    // Files over --max-file-bytes are not parsed.
    let out = validate(&["--max-file-bytes", "100", &big]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("larger than 100 bytes"));
}

/// What `tributary event ... --dry-run` prints is accepted as a LogEvent.
#[test]
fn event_dry_run_output_validates() {
    let bin = env!("CARGO_BIN_EXE_tributary");
    let built = Command::new(bin)
        .args(["event", "conversion", "--datafile"])
        .arg(fixture("datafile.json"))
        .args([
            "--user",
            "user-golden-1",
            "--event",
            "purchase",
            "--dry-run",
        ])
        .args(["--attrs", r#"{"country":"DE","plan":"free","age":34}"#])
        .args([
            "--tags",
            r#"{"revenue":4200,"value":3.5,"category":"shoes"}"#,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        built.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dry_run.json");
    std::fs::write(&path, &built.stdout).unwrap();
    let out = validate(&[path.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("(1 visitors, 1 events, "), "{text}");
    assert!(text.contains("[LogEvent params]"), "{text}");
}
