//! `tributary event ...` run as a process: the LogEvent it prints equals what the official
//! Python SDK sent for the same inputs (`../shared/fixtures/python-sdk-5.7.0/`), but for uuid
//! and timestamp; `--to` POSTs it; errors exit 2 with a message naming the problem.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use tributary_testkit::{RecordingUpstream, Reply, Script};

fn shared(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/python-sdk-5.7.0")
        .join(name)
}

fn datafile() -> String {
    shared("datafile.json").to_str().unwrap().to_owned()
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(shared(name)).unwrap()).unwrap()
}

fn tributary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .env_remove("TRIBUTARY_EVENT_TO")
        .env_remove("TRIBUTARY_DATAFILE")
        .env_remove("TRIBUTARY_CLIENT_NAME")
        .env_remove("TRIBUTARY_CLIENT_VERSION")
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `params` with uuid and timestamp copied from `expected`.
fn params_like(log_event: &Value, expected: &Value) -> Value {
    let mut params = log_event["params"].clone();
    let want = &expected["visitors"][0]["snapshots"][0]["events"][0];
    let got = &mut params["visitors"][0]["snapshots"][0]["events"][0];
    let uuid = got["uuid"].as_str().unwrap();
    assert_eq!(uuid.len(), 36, "a v4 uuid: {uuid}");
    assert!(got["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    got["uuid"] = want["uuid"].clone();
    got["timestamp"] = want["timestamp"].clone();
    params
}

const GOLDEN_ATTRS: &str = r#"{"country":"DE","plan":"free","age":34}"#;

fn impression_args(dry_run_or_to: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "event",
        "impression",
        "--datafile",
        &datafile(),
        "--user",
        "user-golden-1",
        "--flag",
        "checkout_redesign",
        "--rule",
        "checkout_redesign_ab",
        "--variation",
        "treatment",
        "--attrs",
        GOLDEN_ATTRS,
        "--client-name",
        "python-sdk",
        "--client-version",
        "5.7.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(dry_run_or_to.iter().map(|s| s.to_string()));
    args
}

fn run(args: &[String]) -> Output {
    tributary(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn impression_dry_run_equals_the_sdk() {
    let expected = fixture("impression.json");
    let log_event = stdout_json(&run(&impression_args(&["--dry-run"])));
    assert_eq!(params_like(&log_event, &expected), expected);
    assert_eq!(log_event["url"], "https://logx.optimizely.com/v1/events");
    assert_eq!(log_event["http_verb"], "POST");
    assert_eq!(
        log_event["headers"],
        json!({"Content-Type": "application/json"})
    );
}

/// The exact command of the issue: no --client-* flags, so only the client differs.
#[test]
fn impression_exact_issue_command() {
    let expected = fixture("impression.json");
    let out = tributary(&[
        "event",
        "impression",
        "--datafile",
        &datafile(),
        "--user",
        "user-golden-1",
        "--flag",
        "checkout_redesign",
        "--rule",
        "checkout_redesign_ab",
        "--variation",
        "treatment",
        "--attrs",
        GOLDEN_ATTRS,
        "--dry-run",
    ]);
    let log_event = stdout_json(&out);
    let mut params = params_like(&log_event, &expected);
    assert_eq!(params["client_name"], "tributary");
    assert_eq!(params["client_version"], env!("CARGO_PKG_VERSION"));
    params["client_name"] = expected["client_name"].clone();
    params["client_version"] = expected["client_version"].clone();
    assert_eq!(params, expected);
}

#[test]
fn conversion_dry_run_equals_the_sdk() {
    let expected = fixture("conversion.json");
    let out = tributary(&[
        "event",
        "conversion",
        "--datafile",
        &datafile(),
        "--user",
        "user-golden-1",
        "--event",
        "purchase",
        "--attrs",
        GOLDEN_ATTRS,
        "--tags",
        r#"{"revenue":4200,"value":3.5,"category":"shoes"}"#,
        "--client-name",
        "python-sdk",
        "--client-version",
        "5.7.0",
        "--dry-run",
    ]);
    let log_event = stdout_json(&out);
    assert_eq!(params_like(&log_event, &expected), expected);
}

#[test]
fn to_posts_the_body_and_reports_the_status() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(204)));
    let url = upstream.url();
    let out = run(&impression_args(&["--to", &url]));
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("204"));
    assert!(upstream.wait_for(|r| r.len() == 1, Duration::from_secs(5)));
    let req = &upstream.requests()[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.header("content-type"), Some("application/json"));
    let expected = fixture("impression.json");
    let sent = json!({"params": req.json().unwrap()});
    assert_eq!(params_like(&sent, &expected), expected);
}

#[test]
fn to_with_a_non_2xx_answer_exits_1() {
    let upstream = RecordingUpstream::start_with(
        Script::new().default_reply(Reply::status(400).body("payload rejected")),
    );
    let out = run(&impression_args(&["--to", &upstream.url()]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("400") && stderr.contains("payload rejected"),
        "{stderr}"
    );
}

#[test]
fn unknown_variation_exits_2_naming_it() {
    let out = tributary(&[
        "event",
        "impression",
        "--datafile",
        &datafile(),
        "--user",
        "u",
        "--flag",
        "checkout_redesign",
        "--rule",
        "checkout_redesign_ab",
        "--variation",
        "purple",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(r#"no variation "purple""#), "{stderr}");
}

#[test]
fn input_errors_exit_2_with_a_clear_message() {
    let cases: [(&[&str], &str); 4] = [
        (&["--attrs", "{not json"], "--attrs"),
        (&["--attrs", "[1, 2]"], "--attrs"),
        (&["--tags", "\"x\""], "--tags: must be a JSON object"),
        (&["--event", "refund"], r#"unknown event "refund""#),
    ];
    let df = datafile();
    for (extra, message) in cases {
        let mut args = vec![
            "event",
            "conversion",
            "--datafile",
            &df,
            "--user",
            "u",
            "--dry-run",
        ];
        if !extra.contains(&"--event") {
            args.extend(["--event", "purchase"]);
        }
        args.extend(extra);
        let out = tributary(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let out = tributary(&[
        "event",
        "conversion",
        "--datafile",
        missing.to_str().unwrap(),
        "--user",
        "u",
        "--event",
        "purchase",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"version": "3"}"#).unwrap();
    let out = tributary(&[
        "event",
        "conversion",
        "--datafile",
        bad.to_str().unwrap(),
        "--user",
        "u",
        "--event",
        "purchase",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported datafile version"));
}

#[test]
fn dry_run_and_to_conflict() {
    let out = run(&impression_args(&[
        "--dry-run",
        "--to",
        "http://127.0.0.1:9/",
    ]));
    assert_eq!(out.status.code(), Some(2));
}
