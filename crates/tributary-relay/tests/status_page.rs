//! The status page in a real headless browser (Debian's `chromium`, driven over the DevTools
//! protocol by `tests/python/status_browser.py`): it renders from the relay alone, its numbers
//! are the spool's, and its Retry button moves a dead letter back to pending. Also the
//! JSON twin and the protection of the dead-letter POSTs.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{RelayProcess, get, payload, post, relay_args, run_cli, uuids, wait_until};
use tributary_testkit::{MotoServer, RecordingUpstream, Reply, Script};

const TOKEN: &str = "status-test-token";

/// Debian's chromium, or a failure that says how to get it.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .expect(
            "chromium not found on PATH: the status page test needs a real browser \
             (`apt-get install chromium`; scripts/test.sh installs it)",
        )
}

fn status_json(relay: &RelayProcess) -> serde_json::Value {
    let (code, body) = get(&relay.url("/status.json"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn spool_stats(spool: &str) -> serde_json::Value {
    let (code, out, err) = run_cli(&["spool", "stats", "--spool", spool]);
    assert_eq!(code, 0, "spool stats failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn browse(url: &str, extra: &[&str]) -> serde_json::Value {
    let script = support::repo_root().join("crates/tributary-relay/tests/python/status_browser.py");
    let out = Command::new(support::python())
        .arg(script)
        .arg(chromium())
        .arg(url)
        .args(extra)
        .output()
        .expect("run the browser driver");
    assert!(
        out.status.success(),
        "browser driver failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("the driver prints JSON")
}

/// A relay whose upstream refused 3 visitors (now dead letters) and is now down, holding 5
/// pending events.
fn relay_with_backlog_and_dead_letters(
    dir: &tempfile::TempDir,
) -> (RecordingUpstream, RelayProcess, String) {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(400)));
    let spool = dir.path().join("spool").display().to_string();
    let relay = RelayProcess::serve(&relay_args(
        &upstream.url(),
        &spool,
        &["--auth-tokens", TOKEN],
    ));
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let (code, body) = post(
        &relay.url("/v1/events"),
        payload("1", &uuids("refused", 3)),
        &headers,
    );
    assert_eq!(code, 204, "{body}");
    assert!(
        wait_until(Duration::from_secs(30), || {
            status_json(&relay)["spool"]["dead_letters"] == 3
        }),
        "the refused visitors never became dead letters: {}",
        status_json(&relay)
    );
    upstream.set_script(Script::new().default_reply(Reply::status(503)));
    let (code, body) = post(
        &relay.url("/v1/events"),
        payload("1", &uuids("waiting", 5)),
        &headers,
    );
    assert_eq!(code, 204, "{body}");
    assert!(
        wait_until(Duration::from_secs(30), || {
            let s = status_json(&relay);
            s["spool"]["pending_events"] == 5 && s["upstream"]["us"]["consecutive_failures"] != 0
        }),
        "the upstream never showed as failing with 5 events pending: {}",
        status_json(&relay)
    );
    (upstream, relay, spool)
}

#[test]
fn the_page_renders_the_spools_numbers_and_its_retry_button_moves_a_dead_letter_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_upstream, relay, spool) = relay_with_backlog_and_dead_letters(&dir);
    let stats = spool_stats(&spool);
    assert_eq!(stats["pending_events"], 5, "{stats}");
    assert_eq!(stats["dead_letters"], 3, "{stats}");
    // Two history samples (one every 10 s) make the chart's lines.
    assert!(
        wait_until(Duration::from_secs(40), || {
            status_json(&relay)["history"]
                .as_array()
                .is_some_and(|h| h.len() >= 2)
        }),
        "the history never got a second sample"
    );
    let report = status_json(&relay);
    let id = report["dead_letters"][0]["id"].as_str().unwrap().to_owned();

    let seen = browse(
        &relay.url("/status"),
        &["--token", TOKEN, "--click-retry", &id],
    );
    let before = &seen["before"];
    assert_eq!(
        before["external"], 0,
        "the page loads nothing from elsewhere"
    );
    assert_eq!(before["accepting"], "accepting");
    assert_eq!(before["upstream-state-us"], "failing");
    assert_ne!(before["consecutive-failures-us"], "0");
    assert!(
        before["last-error-us"].as_str().unwrap().contains("503"),
        "{before}"
    );
    assert_eq!(before["last-success-us"], "never");
    assert!(
        before["last-failure-us"]
            .as_str()
            .unwrap()
            .ends_with(" ago"),
        "{before}"
    );
    // Each region has its own health: the EU upstream was never sent to.
    assert_eq!(before["upstream-state-eu"], "no sends yet", "{before}");
    assert_eq!(before["consecutive-failures-eu"], "0", "{before}");
    assert_eq!(
        before["chart_lines"], 3,
        "pending, ingest and delivery lines: {before}"
    );
    assert_eq!(before["pending-events"], "5");
    assert_eq!(
        before["pending-events"],
        stats["pending_events"].to_string()
    );
    assert_eq!(before["pending-payloads"], stats["pending"].to_string());
    assert_eq!(
        before["pending-bytes-value"],
        stats["pending_bytes"].to_string()
    );
    assert_eq!(before["dead-letter-count"], "3");
    let rows = before["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{before}");
    for row in rows {
        assert_eq!(row[1], "1", "one visitor per dead letter: {row}");
        assert!(row[5].as_str().unwrap().contains("400"), "reason: {row}");
    }

    let after = &seen["after"];
    assert_eq!(after["action-result"], "retried 1", "{after}");
    assert_eq!(after["dead-letter-count"], "2", "{after}");
    assert_eq!(after["pending-events"], "6", "{after}");
    assert!(
        !after["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r[0] == id.as_str()),
        "the retried dead letter is no longer listed: {after}"
    );
    let stats = spool_stats(&spool);
    assert_eq!(stats["dead_letters"], 2, "{stats}");
    assert_eq!(stats["pending_events"], 6, "{stats}");
}

#[test]
fn dead_letter_actions_need_the_token_a_json_body_and_a_post() {
    let dir = tempfile::tempdir().unwrap();
    let (_upstream, relay, spool) = relay_with_backlog_and_dead_letters(&dir);
    let url = relay.url("/status/dead-letters/purge");
    let json = [("content-type", "application/json")];
    let (code, body) = post(&url, r#"{"all":true}"#, &json);
    assert_eq!(code, 401, "no token: {body}");
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = post(
        &url,
        r#"{"all":true}"#,
        &[("authorization", "Bearer wrong"), json[0]],
    );
    assert_eq!(code, 401, "wrong token: {body}");
    let longer = format!("Bearer {TOKEN}x");
    let (code, body) = post(
        &url,
        r#"{"all":true}"#,
        &[("authorization", longer.as_str()), json[0]],
    );
    assert_eq!(code, 401, "the token with a byte more: {body}");
    // A form post (what another site could make a browser send) is refused.
    let (code, body) = post(
        &url,
        "all=true",
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    );
    assert_eq!(code, 400, "form body: {body}");
    let (code, body) = post(&url, "{}", &[("authorization", auth.as_str()), json[0]]);
    assert_eq!(code, 400, "nothing selected: {body}");
    assert!(body.contains("no dead letters selected"), "{body}");
    let (code, _) = get(&url);
    assert_eq!(code, 405, "a GET changes nothing");
    let stats = spool_stats(&spool);
    assert_eq!(stats["dead_letters"], 3);
    // What --spool-max-bytes counts, and the near-full alert reads: pending and dead bytes.
    let dead_bytes = stats["dead_bytes"].as_u64().unwrap();
    assert!(dead_bytes > 0, "{stats}");
    let held = (stats["pending_bytes"].as_u64().unwrap() + dead_bytes) as f64;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (_, metrics) = get(&relay.url("/metrics"));
            support::metric(&metrics, "tributary_spool_held_bytes") == held
        }),
        "tributary_spool_held_bytes never showed {held}: {}",
        get(&relay.url("/metrics")).1
    );

    let (code, body) = post(
        &url,
        r#"{"all":true}"#,
        &[("authorization", auth.as_str()), json[0]],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, r#"{"purged":3}"#);
    assert_eq!(spool_stats(&spool)["dead_letters"], 0);
    let report = status_json(&relay);
    assert_eq!(report["spool"]["dead_letters"], 0, "{report}");
    assert_eq!(report["dead_letters"].as_array().unwrap().len(), 0);
    assert!(report["history"].as_array().is_some_and(|h| !h.is_empty()));
}

/// A relay on an SQS spool (moto) whose upstream refuses everything.
fn sqs_relay(queue: &str, upstream: &RecordingUpstream) -> RelayProcess {
    RelayProcess::serve_with_env(
        &relay_args(
            &upstream.url(),
            &format!("sqs://{queue}"),
            &["--eu-upstream", &upstream.url(), "--sqs-wait-time", "1s"],
        ),
        &MotoServer::shared().aws_env(),
    )
}

#[test]
fn on_sqs_without_a_dead_letter_queue_the_status_page_still_answers() {
    MotoServer::shared().create_queue("status-no-dlq", &[]);
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let relay = sqs_relay("status-no-dlq", &upstream);
    let report = status_json(&relay);
    assert_eq!(report["dead_letters"], serde_json::Value::Null, "{report}");
    assert_eq!(
        report["dead_letters_error"],
        serde_json::Value::Null,
        "{report}"
    );
    assert_eq!(report["backlog_counted"], false, "{report}");
    let (code, body) = get(&relay.url("/status"));
    assert_eq!(code, 200, "{body}");
    // --spool-max-bytes bounds no SQS spool: no limit for an alert to compare against.
    let (code, metrics) = get(&relay.url("/metrics"));
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("tributary_spool_ready") && !metrics.contains("tributary_spool_max_bytes"),
        "{metrics}"
    );
}

#[test]
fn on_sqs_a_status_get_leaves_the_dead_letter_queue_alone() {
    let moto = MotoServer::shared();
    moto.create_queue("status-sqs-dlq", &[]);
    let policy = format!(
        r#"{{"deadLetterTargetArn":"{}","maxReceiveCount":"1000"}}"#,
        MotoServer::queue_arn("status-sqs-dlq")
    );
    moto.create_queue("status-sqs", &[("RedrivePolicy", &policy)]);
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(400)));
    let relay = sqs_relay("status-sqs", &upstream);
    let (code, body) = post(
        &relay.url("/v1/events"),
        payload("1", &uuids("sqs-refused", 1)),
        &[("content-type", "application/json")],
    );
    assert_eq!(code, 204, "{body}");
    assert!(
        wait_until(Duration::from_secs(60), || {
            moto.queue_counts("status-sqs-dlq") == (1, 0)
        }),
        "the refused payload never reached the dead-letter queue: {}",
        relay.log_text()
    );
    // Each GET past the report cache reads the spool again; none may hide the message.
    for _ in 0..3 {
        let report = status_json(&relay);
        assert_eq!(report["spool"]["dead_letters"], 1, "{report}");
        assert_eq!(report["dead_letters"], serde_json::Value::Null, "{report}");
        assert_eq!(report["backlog_counted"], false, "{report}");
        let (code, body) = get(&relay.url("/status"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            moto.queue_counts("status-sqs-dlq"),
            (1, 0),
            "a GET hid a dead letter"
        );
        let at = report["now_ms"].as_u64().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || {
                status_json(&relay)["now_ms"].as_u64().unwrap() > at
            }),
            "the report cache never expired"
        );
    }
}
