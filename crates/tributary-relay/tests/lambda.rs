//! `tributary lambda` as AWS Lambda runs it: the real binary (once under the name
//! `bootstrap`, as packaged) polling the documented Lambda Runtime API, served on loopback by
//! the testkit, with moto's SQS as the spool and a recording upstream. SQS-trigger
//! invocations get their events the way an event source mapping makes them (boto3 receives
//! from moto, `tests/python/sqs_event.py`), and what the function reports delivered is
//! deleted the way the mapping deletes it.
//!
//! The scheduled test's budget (4 s for 7 s of upstream work) is an input, not a measured
//! time: any share of it delivered passes, as long as nothing is left in flight and the next
//! invocation delivers the rest.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use support::{RelayProcess, payload, post_json, uuids, wait_until};
use tributary_testkit::{
    Invocation, LambdaRuntimeApi, MotoServer, RecordingUpstream, Reply, Script, delivered_uuids,
};

fn queue_url(name: &str) -> String {
    format!(
        "{}/{}/{name}",
        MotoServer::shared().endpoint(),
        tributary_testkit::MOTO_ACCOUNT
    )
}

/// Queue `name` with `name-dlq` as its redrive target after `max_receives` receives.
fn queues(name: &str, visibility: &str, max_receives: u32) {
    let moto = MotoServer::shared();
    moto.create_queue(&format!("{name}-dlq"), &[]);
    let policy = format!(
        r#"{{"deadLetterTargetArn":"{}","maxReceiveCount":"{max_receives}"}}"#,
        MotoServer::queue_arn(&format!("{name}-dlq"))
    );
    moto.create_queue(
        name,
        &[
            ("RedrivePolicy", &policy),
            ("VisibilityTimeout", visibility),
        ],
    );
}

/// Appends each payload through an ingest-only relay (the SQS spool writes the messages).
fn spool_payloads(queue: &str, payloads: &[String]) {
    let ingest = RelayProcess::serve_with_env(
        &["--no-forward", "--spool", &format!("sqs://{queue}")],
        &MotoServer::shared().aws_env(),
    );
    for p in payloads {
        let (code, body) = post_json(&ingest.url("/v1/events"), p);
        assert_eq!(code, 204, "{body}");
    }
}

/// The function: `tributary lambda ARGS` (or, with `bootstrap`, the binary under that name
/// with no arguments, configured by `env`), once it polls for its first invocation.
fn function(
    api: &LambdaRuntimeApi,
    args: &[&str],
    env: &[(&str, String)],
    bootstrap: Option<&std::path::Path>,
) -> RelayProcess {
    let mut all_env: Vec<(&str, String)> = api.function_env();
    all_env.extend(MotoServer::shared().aws_env());
    all_env.extend(env.iter().cloned());
    let mut process = match bootstrap {
        Some(path) => RelayProcess::spawn_program_with_env(path, &[], &all_env),
        None => {
            let mut argv = vec!["lambda"];
            argv.extend_from_slice(args);
            RelayProcess::spawn_with_env(&argv, &all_env)
        }
    };
    process.wait_for_log("tributary lambda", Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(30), || api.polls() >= 1),
        "the function never polled the Runtime API:\n{}",
        process.log_text()
    );
    process
}

fn invoke(
    api: &LambdaRuntimeApi,
    function: &RelayProcess,
    event: serde_json::Value,
    timeout: Duration,
) -> Invocation {
    let inv = api
        .invoke(event, timeout, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no answer to the invocation:\n{}", function.log_text()));
    assert!(
        inv.error.is_none(),
        "the invocation failed: {:?}\n{}",
        inv.error,
        function.log_text()
    );
    inv
}

fn sqs_event(args: &[&str]) -> String {
    let script = support::repo_root().join("crates/tributary-relay/tests/python/sqs_event.py");
    let out = Command::new(support::python())
        .arg(script)
        .args(args)
        .envs(MotoServer::shared().aws_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sqs_event.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Receives up to `max` messages of `queue` as an SQS event, as a mapping does.
fn receive_event(queue: &str, max: usize) -> serde_json::Value {
    serde_json::from_str(&sqs_event(&[
        "receive",
        &queue_url(queue),
        &max.to_string(),
    ]))
    .unwrap()
}

/// Deletes every record of `event` not in `failures`, as a mapping does after the function
/// answered.
fn settle_as_mapping(queue: &str, event: &serde_json::Value, failures: &HashSet<String>) {
    let handles: Vec<String> = event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !failures.contains(r["messageId"].as_str().unwrap()))
        .map(|r| r["receiptHandle"].as_str().unwrap().to_owned())
        .collect();
    let mut args = vec!["delete".to_owned(), queue_url(queue)];
    args.extend(handles);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sqs_event(&args);
}

fn failures(inv: &Invocation) -> HashSet<String> {
    inv.response.as_ref().unwrap()["batchItemFailures"]
        .as_array()
        .expect("a batchItemFailures array")
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}

/// The message id of the record whose body holds `uuid`.
fn message_with(event: &serde_json::Value, uuid: &str) -> String {
    event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["body"].as_str().unwrap().contains(uuid))
        .map(|r| r["messageId"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no record holds {uuid}"))
}

#[test]
fn sqs_trigger_reports_exactly_the_undelivered_messages_and_the_poison_one_reaches_the_dlq() {
    let queue = "lambda-trigger";
    queues(queue, "1", 2);
    let good = uuids("good", 5);
    let poison = uuids("poison", 1);
    let more = uuids("more", 3);
    spool_payloads(
        queue,
        &[
            payload("1", &good),
            payload("1", &poison),
            payload("1", &more),
        ],
    );
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_uuid_prefix("poison", Reply::status(400).body("bad event")),
    );
    let api = LambdaRuntimeApi::start();
    let f = function(
        &api,
        &[
            "--mode",
            "sqs-trigger",
            "--upstream",
            &upstream.url(),
            "--request-timeout",
            "2s",
        ],
        &[],
        None,
    );

    let event = receive_event(queue, 10);
    assert_eq!(event["Records"].as_array().unwrap().len(), 3, "{event}");
    let inv = invoke(&api, &f, event.clone(), Duration::from_secs(30));
    let failed = failures(&inv);
    let poison_id = message_with(&event, &poison[0]);
    assert_eq!(
        failed,
        HashSet::from([poison_id.clone()]),
        "only the poison message is reported: {:?}",
        inv.response
    );
    let delivered: HashSet<String> = delivered_uuids(&upstream.requests()).into_iter().collect();
    let expected: HashSet<String> = good.iter().chain(&more).cloned().collect();
    assert_eq!(delivered, expected, "the good visitors, and only they");
    settle_as_mapping(queue, &event, &failed);

    // SQS redelivers only the failed message (after its 1 s visibility timeout) ...
    let mut again = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            again = receive_event(queue, 10);
            !again["Records"].as_array().unwrap().is_empty()
        }),
        "the failed message never came back"
    );
    let ids: Vec<&str> = again["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![poison_id.as_str()]);
    let inv = invoke(&api, &f, again.clone(), Duration::from_secs(30));
    assert_eq!(failures(&inv), HashSet::from([poison_id]));
    settle_as_mapping(queue, &again, &failures(&inv));

    // ... and its redrive policy (2 receives) moves it to the dead-letter queue.
    let moto = MotoServer::shared();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let _ = receive_event(queue, 10);
            moto.queue_counts(&format!("{queue}-dlq")).0 == 1
        }),
        "the poison message never reached the DLQ"
    );
    assert_eq!(moto.queue_counts(queue), (0, 0));
}

#[test]
fn sqs_trigger_with_the_upstream_down_reports_every_message() {
    let queue = "lambda-trigger-down";
    queues(queue, "30", 5);
    spool_payloads(
        queue,
        &[payload("1", &uuids("a", 2)), payload("1", &uuids("b", 2))],
    );
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let api = LambdaRuntimeApi::start();
    let f = function(
        &api,
        &[
            "--mode",
            "sqs-trigger",
            "--upstream",
            &upstream.url(),
            "--request-timeout",
            "1s",
        ],
        &[],
        None,
    );
    let event = receive_event(queue, 10);
    let all: HashSet<String> = event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 2);
    let inv = invoke(&api, &f, event, Duration::from_secs(30));
    assert_eq!(failures(&inv), all, "{:?}", inv.response);
    assert!(upstream.request_count() > 0);
}

#[test]
fn scheduled_drain_stops_before_the_deadline_with_every_lease_settled_and_loses_nothing() {
    let queue = "lambda-scheduled";
    queues(queue, "60", 1000);
    let sent: Vec<String> = uuids("sched", 40);
    let payloads: Vec<String> = sent.chunks(2).map(|c| payload("1", c)).collect();
    spool_payloads(queue, &payloads);
    let moto = MotoServer::shared();
    assert_eq!(moto.queue_counts(queue), (20, 0));

    // Each upstream answer takes 700 ms; one request of at most 4 visitors at a time: 40
    // visitors need 10 requests, 7 s, and the invocation has 4 s.
    let upstream = RecordingUpstream::start_with(
        Script::new().default_reply(Reply::no_content().delay(Duration::from_millis(700))),
    );
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap");
    std::os::unix::fs::symlink(support::tributary_bin(), &bootstrap).unwrap();
    let api = LambdaRuntimeApi::start();
    let env = [
        ("TRIBUTARY_LAMBDA_MODE", "scheduled".to_owned()),
        ("TRIBUTARY_LAMBDA_SETTLE_MARGIN", "1s".to_owned()),
        ("TRIBUTARY_SPOOL", format!("sqs://{queue}")),
        ("TRIBUTARY_UPSTREAM", upstream.url()),
        ("TRIBUTARY_MAX_BATCH_EVENTS", "4".to_owned()),
        ("TRIBUTARY_CONCURRENCY", "1".to_owned()),
        ("TRIBUTARY_REQUEST_TIMEOUT", "5s".to_owned()),
        ("TRIBUTARY_SQS_WAIT_TIME", "0s".to_owned()),
    ];
    let f = function(&api, &[], &env, Some(&bootstrap));
    let scheduled_event = serde_json::json!({
        "version": "0", "id": "00000000-0000-0000-0000-000000000001",
        "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": "2026-12-02T03:00:00Z", "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/tributary-drain"],
        "detail": {}
    });

    let inv = invoke(&api, &f, scheduled_event.clone(), Duration::from_secs(4));
    let answer = inv.response.clone().unwrap();
    assert!(
        inv.answered_at_ms <= inv.deadline_ms,
        "answered {} ms after the deadline",
        inv.answered_at_ms.saturating_sub(inv.deadline_ms)
    );
    assert_eq!(answer["stopped_at_deadline"], true, "{answer}");
    // The summary counts the cycles that finished; `payloads_acked` also counts what the
    // cycle cut short by the deadline had deleted.
    let acked = answer["payloads_acked"].as_u64().unwrap();
    let summarised = answer["summary"]["payloads_delivered"].as_u64().unwrap();
    assert!(
        (1..20).contains(&acked) && summarised <= acked,
        "some but not all delivered: {answer}"
    );
    // Every lease settled: nothing in flight; what was not delivered is visible again now.
    let (visible, in_flight) = moto.queue_counts(queue);
    assert_eq!(in_flight, 0, "leases left in flight: {answer}");
    assert_eq!(visible, 20 - acked, "{answer}");

    // The next scheduled invocation, with time enough, delivers the rest: nothing lost.
    let inv = invoke(&api, &f, scheduled_event, Duration::from_secs(60));
    let answer = inv.response.unwrap();
    assert_eq!(answer["stopped_at_deadline"], false, "{answer}");
    assert_eq!(moto.queue_counts(queue), (0, 0));
    let delivered: HashSet<String> = delivered_uuids(&upstream.requests()).into_iter().collect();
    let sent: HashSet<String> = sent.into_iter().collect();
    assert_eq!(delivered, sent, "every event delivered");
}

#[test]
fn scheduled_drain_gives_back_the_messages_received_beyond_the_byte_window() {
    let queue = "lambda-stash";
    queues(queue, "60", 1000);
    let sent: Vec<String> = uuids("stash-overflowing-the-byte-window", 30);
    let payloads: Vec<String> = sent.chunks(3).map(|c| payload("1", c)).collect();
    assert!(
        payloads.iter().all(|p| p.len() > 512),
        "each payload must be more than half the 1024-byte window"
    );
    spool_payloads(queue, &payloads);
    let moto = MotoServer::shared();
    assert_eq!(moto.queue_counts(queue), (10, 0));

    // A lease asks SQS for 4 messages but only one fits in the 1024-byte window: the other 3
    // wait in the spool's stash, which the forwarder never sees. With each send taking
    // 1.5 s and the drain stopping 1 s into a 2 s invocation, the stash is not empty then.
    let upstream = RecordingUpstream::start_with(
        Script::new().default_reply(Reply::no_content().delay(Duration::from_millis(1500))),
    );
    let api = LambdaRuntimeApi::start();
    let env = [
        ("TRIBUTARY_SPOOL", format!("sqs://{queue}")),
        ("TRIBUTARY_UPSTREAM", upstream.url()),
        ("TRIBUTARY_MAX_BATCH_EVENTS", "4".to_owned()),
        ("TRIBUTARY_MAX_BATCH_BYTES", "1024".to_owned()),
        ("TRIBUTARY_CONCURRENCY", "1".to_owned()),
        ("TRIBUTARY_REQUEST_TIMEOUT", "5s".to_owned()),
        ("TRIBUTARY_SQS_WAIT_TIME", "0s".to_owned()),
    ];
    let f = function(
        &api,
        &["--mode", "scheduled", "--settle-margin", "1s"],
        &env,
        None,
    );
    let inv = invoke(&api, &f, serde_json::json!({}), Duration::from_secs(2));
    let answer = inv.response.clone().unwrap();
    assert!(
        inv.answered_at_ms <= inv.deadline_ms,
        "answered {} ms after the deadline",
        inv.answered_at_ms.saturating_sub(inv.deadline_ms)
    );
    let acked = answer["payloads_acked"].as_u64().unwrap();
    let (visible, in_flight) = moto.queue_counts(queue);
    assert_eq!(
        in_flight, 0,
        "messages left hidden after the answer: {answer}"
    );
    assert!(
        answer["leases_released_after_drain"].as_u64().unwrap() >= 1,
        "the stash was given back: {answer}"
    );
    assert_eq!(visible, 10 - acked, "{answer}");

    let inv = invoke(&api, &f, serde_json::json!({}), Duration::from_secs(60));
    let answer = inv.response.unwrap();
    assert_eq!(answer["stopped_at_deadline"], false, "{answer}");
    assert_eq!(moto.queue_counts(queue), (0, 0));
    let delivered: HashSet<String> = delivered_uuids(&upstream.requests()).into_iter().collect();
    let sent: HashSet<String> = sent.into_iter().collect();
    assert_eq!(delivered, sent, "every event delivered");
}

#[test]
fn outside_lambda_it_says_what_is_missing() {
    let (code, _, err) = support::run_cli(&["lambda", "--mode", "scheduled"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("AWS_LAMBDA_RUNTIME_API is not set"), "{err}");
}

#[test]
fn a_long_poll_that_could_outlast_the_settle_margin_is_refused() {
    let api = LambdaRuntimeApi::start();
    let mut env = api.function_env();
    env.extend(MotoServer::shared().aws_env());
    let (code, _, err) = support::run_cli_with_env(
        &[
            "lambda",
            "--mode",
            "scheduled",
            "--spool",
            "sqs://anything",
            "--sqs-wait-time",
            "5s",
            "--settle-margin",
            "3s",
        ],
        &env,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--sqs-wait-time (5s) must be shorter than --settle-margin (3s)"),
        "{err}"
    );
    assert_eq!(api.polls(), 0, "it must not start polling");
}
