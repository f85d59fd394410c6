//! End-to-end tests of the relay on an SQS spool: the real `tributary` binary as ingest and
//! drain nodes, moto's SQS server (started by the testkit; the tests fail without it), a
//! recording upstream, and the official Python SDK as a client.
//!
//! Every test makes its own queues on one moto server shared by this test binary.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{RelayProcess, payload, post_json, uuids, wait_until};
use tributary_testkit::{
    MotoServer, RecordedRequest, RecordingUpstream, Reply, Script, delivered_uuids,
};

const WAIT: Duration = Duration::from_secs(60);

/// Queue `name` and `name-dlq`, the latter as the former's redrive target (with a receive
/// count high enough never to trigger here). Returns the `--spool` value.
fn queues(name: &str) -> String {
    let moto = MotoServer::shared();
    moto.create_queue(&format!("{name}-dlq"), &[]);
    let policy = format!(
        r#"{{"deadLetterTargetArn":"{}","maxReceiveCount":"1000"}}"#,
        MotoServer::queue_arn(&format!("{name}-dlq"))
    );
    moto.create_queue(name, &[("RedrivePolicy", &policy)]);
    format!("sqs://{name}")
}

/// Flags for quick tests: short merge window, quick retries, short long polls.
fn fast(upstream: &str, spool: &str) -> Vec<String> {
    fast_with_timeout(upstream, spool, "2s")
}

fn fast_with_timeout(upstream: &str, spool: &str, request_timeout: &str) -> Vec<String> {
    [
        "--upstream",
        upstream,
        "--eu-upstream",
        upstream,
        "--spool",
        spool,
        "--flush-interval",
        "100ms",
        "--max-retry-delay",
        "500ms",
        "--request-timeout",
        request_timeout,
        "--sqs-wait-time",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
    args.extend(more.iter().map(|s| (*s).to_owned()));
    args
}

/// A `tributary` process talking to moto. Killed on drop.
type Node = RelayProcess;

/// `tributary serve --listen 127.0.0.1:0 ARGS` against moto, once it listens.
fn serve(args: &[String]) -> Node {
    RelayProcess::serve_with_env(args, &MotoServer::shared().aws_env())
}

/// `tributary drain ARGS` (long-running) against moto, once its spool is open.
fn drain(args: &[String]) -> Node {
    RelayProcess::drain_with_env(args, &MotoServer::shared().aws_env())
}

/// Runs the binary to completion against moto: (exit code, stdout, stderr).
fn run_cli(args: &[String]) -> (i32, String, String) {
    support::run_cli_with_env(args, &MotoServer::shared().aws_env())
}

fn post_payloads(node: &Node, revision: &str, ids: &[String], per_payload: usize) {
    for chunk in ids.chunks(per_payload) {
        let (status, body) = post_json(&node.url("/v1/events"), &payload(revision, chunk));
        assert_eq!(status, 204, "{body}");
    }
}

fn counts(uuids: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for u in uuids {
        *m.entry(u.as_str()).or_insert(0) += 1;
    }
    m
}

/// Every uuid of `sent` was delivered, and nothing else; returns how many deliveries were
/// duplicates.
fn assert_all_delivered(sent: &[String], requests: &[RecordedRequest]) -> usize {
    assert_delivered(sent, requests, true)
}

/// Every uuid of `sent` was delivered (and, when `only`, nothing else); returns how many
/// deliveries were duplicates.
fn assert_delivered(sent: &[String], requests: &[RecordedRequest], only: bool) -> usize {
    let delivered = delivered_uuids(requests);
    let seen = counts(&delivered);
    let missing: Vec<&String> = sent
        .iter()
        .filter(|u| !seen.contains_key(u.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} not delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    if only {
        let sent: HashSet<&str> = sent.iter().map(String::as_str).collect();
        let unknown = seen.keys().filter(|u| !sent.contains(*u)).count();
        assert_eq!(unknown, 0, "delivered events nobody sent");
    }
    delivered.len() - seen.len()
}

fn has_all(upstream: &RecordingUpstream, sent: &[String]) -> bool {
    let want: HashSet<&str> = sent.iter().map(String::as_str).collect();
    upstream.wait_for(
        |reqs| {
            let got = delivered_uuids(reqs);
            let got: HashSet<&str> = got.iter().map(String::as_str).collect();
            want.iter().all(|u| got.contains(u))
        },
        WAIT,
    )
}

#[test]
fn an_ingest_node_and_drain_once_deliver_everything_and_report() {
    let spool = queues("e2e-once");
    let upstream = RecordingUpstream::start();
    let ingest = serve(&with(fast(&upstream.url(), &spool), &["--no-forward"]));
    let sent = uuids("once", 100);
    post_payloads(&ingest, "1", &sent, 5);
    assert_eq!(
        upstream.request_count(),
        0,
        "an ingest-only node does not forward"
    );

    let mut args = vec!["drain".to_owned(), "--once".to_owned()];
    args.extend(fast(&upstream.url(), &spool));
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["summary"]["events_delivered"], 100, "{report}");
    assert_eq!(report["summary"]["payloads_delivered"], 20, "{report}");
    assert_eq!(report["summary"]["payloads_retried"], 0, "{report}");
    assert_eq!(report["spool"]["pending"], 0, "{report}");
    assert_eq!(assert_all_delivered(&sent, &upstream.requests()), 0);
    // Twenty small payloads, merged: one request (the whole queue fits one lease).
    assert!(
        upstream.request_count() <= 2,
        "{} requests",
        upstream.request_count()
    );

    // A failing upstream: drain --once leaves the payloads for later and exits 1.
    upstream.set_script(Script::new().default_reply(Reply::status(503)));
    post_payloads(&ingest, "1", &uuids("later", 6), 3);
    let mut args = vec!["drain".to_owned(), "--once".to_owned()];
    args.extend(fast(&upstream.url(), &spool));
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 1, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["summary"]["events_delivered"], 0, "{report}");
    assert!(
        report["summary"]["payloads_retried"].as_u64().unwrap() >= 2,
        "{report}"
    );
    assert_eq!(report["spool"]["pending"], 2, "kept in the queue: {report}");
}

#[test]
fn two_drain_nodes_share_one_queue() {
    let spool = queues("e2e-two-drains");
    let upstream = RecordingUpstream::start();
    let ingest = serve(&with(fast(&upstream.url(), &spool), &["--no-forward"]));
    let mut a = drain(&fast(&upstream.url(), &spool));
    let mut b = drain(&fast(&upstream.url(), &spool));
    let sent = uuids("two", 400);
    post_payloads(&ingest, "1", &sent, 4);
    assert!(has_all(&upstream, &sent), "not everything delivered");
    let duplicates = assert_all_delivered(&sent, &upstream.requests());
    // At-least-once: moto can hand one message to two concurrent receivers; rare only.
    assert!(duplicates <= 8, "{duplicates} duplicate deliveries");
    assert!(a.terminate(WAIT).success());
    assert!(b.terminate(WAIT).success());
}

#[test]
fn a_drain_node_killed_mid_batch_leaves_its_messages_to_another() {
    let spool = queues("e2e-killed");
    let hanging = RecordingUpstream::start_with(Script::new().default_reply(Reply::hang()));
    let healthy = RecordingUpstream::start();
    let ingest = serve(&with(fast(&healthy.url(), &spool), &["--no-forward"]));
    let sent = uuids("killed", 50);
    post_payloads(&ingest, "1", &sent, 5);

    // The first node's request hangs (its timeout is long); its lease is 3 s.
    let mut first = drain(&with(
        fast_with_timeout(&hanging.url(), &spool, "60s"),
        &["--lease-timeout", "3s"],
    ));
    assert!(
        hanging.wait_for(|r| !r.is_empty(), WAIT),
        "{}",
        first.log_text()
    );
    let killed_at = Instant::now();
    first.kill9();

    let _second = drain(&with(
        fast(&healthy.url(), &spool),
        &["--lease-timeout", "3s"],
    ));
    assert!(
        has_all(&healthy, &sent),
        "the killed node's messages never came back"
    );
    assert!(
        killed_at.elapsed() >= Duration::from_secs(1),
        "delivered before the lease could have run out"
    );
    assert_eq!(assert_all_delivered(&sent, &healthy.requests()), 0);
}

#[test]
fn an_upstream_outage_is_ridden_out() {
    let spool = queues("e2e-outage");
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let relay = serve(&fast(&upstream.url(), &spool));
    let sent = uuids("outage", 40);
    post_payloads(&relay, "1", &sent, 4);
    assert!(upstream.wait_for(|r| r.len() >= 3, WAIT), "no retries seen");
    assert!(delivered_uuids(&upstream.requests()).is_empty());

    upstream.set_script(Script::new());
    assert!(has_all(&upstream, &sent), "{}", relay.log_text());
    assert_eq!(assert_all_delivered(&sent, &upstream.requests()), 0);
}

#[test]
fn a_poison_payload_ends_in_the_dead_letter_queue_and_the_rest_is_delivered() {
    let spool = queues("e2e-poison");
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_containing("poison-marker", Reply::status(400)),
    );
    let relay = serve(&fast(&upstream.url(), &spool));
    let good = uuids("good", 30);
    post_payloads(&relay, "1", &good, 3);
    let (status, _) = post_json(
        &relay.url("/v1/events"),
        &payload("1", &["poison-marker-1".into()]),
    );
    assert_eq!(status, 204);

    assert!(has_all(&upstream, &good), "{}", relay.log_text());
    let moto = MotoServer::shared();
    assert!(
        wait_until(WAIT, || moto.queue_counts("e2e-poison-dlq").0 == 1),
        "{}",
        relay.log_text()
    );
    assert_eq!(assert_all_delivered(&good, &upstream.requests()), 0);

    let list = [
        "spool",
        "dead-letters",
        "list",
        "--spool",
        &spool,
        "--with-body",
    ]
    .map(str::to_owned);
    let (code, out, err) = run_cli(&list);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0]["reason"].as_str().unwrap().contains("400"),
        "{out}"
    );
    assert!(lines[0]["body"].to_string().contains("poison-marker-1"));

    let purge = ["spool", "dead-letters", "purge", "--all", "--spool", &spool].map(str::to_owned);
    let (code, out, err) = run_cli(&purge);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 dead letters purged"), "{out}");
}

#[test]
fn python_sdk_through_two_ingest_and_two_drain_nodes() {
    let spool = queues("e2e-sdk");
    let upstream = RecordingUpstream::start();
    let flags = fast(&upstream.url(), &spool);
    let ingest = [
        serve(&with(flags.clone(), &["--no-forward"])),
        serve(&with(flags.clone(), &["--no-forward"])),
    ];
    // The official SDK, one client per ingest node, at the same time.
    let datafile = support::shared_fixtures().join("datafile.json");
    let script = support::repo_root().join("crates/tributary-relay/tests/python/sdk_client.py");
    let clients: Vec<Child> = ingest
        .iter()
        .map(|node| {
            Command::new(support::python())
                .arg(&script)
                .arg(node.url(""))
                .arg(&datafile)
                .arg("50")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Meanwhile, other contexts (revisions) through the same nodes: never merged with them.
    let rev_a = uuids("rev-a", 40);
    let rev_b = uuids("rev-b", 40);
    post_payloads(&ingest[0], "rev-a", &rev_a, 2);
    post_payloads(&ingest[1], "rev-b", &rev_b, 2);

    let mut sdk_uuids = Vec::new();
    for client in clients {
        let out = client.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sdk client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["failed"], 0, "{report}");
        sdk_uuids.extend(
            report["acked"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_str().unwrap().to_owned()),
        );
    }
    // 50 users x (impression + conversion) x 2 clients. The SDK batches events itself and
    // gives up on what it has not dispatched when its 5 s close timeout passes (moto makes
    // each append slow), so what counts is that every event the relay acknowledged arrives.
    assert!(
        sdk_uuids.len() >= 100,
        "only {} SDK events acknowledged",
        sdk_uuids.len()
    );

    // The queue now holds many small payloads; two drain nodes at once empty it, like the
    // bulk dispatcher's scheduled consumer (but without its 50-message cap).
    let _drains = [drain(&flags), drain(&flags)];
    let all: Vec<String> = sdk_uuids
        .iter()
        .chain(&rev_a)
        .chain(&rev_b)
        .cloned()
        .collect();
    assert!(has_all(&upstream, &all), "not everything delivered");
    let requests = upstream.requests();
    // The relay may also have stored events whose acknowledgement the SDK gave up waiting
    // for at its close timeout: those are delivered too, so "only" does not hold here.
    let duplicates = assert_delivered(&all, &requests, false);
    assert!(duplicates <= 8, "{duplicates} duplicate deliveries");

    // Merged into large batches: many small requests reached the ingest nodes; the
    // upstream gets few, large ones.
    let ok: Vec<&RecordedRequest> = requests.iter().filter(|r| r.is_success()).collect();
    assert!(
        ok.len() * 10 <= all.len(),
        "{} upstream requests for {} events",
        ok.len(),
        all.len()
    );

    // Contexts never mixed: each request's revision is that of every event in it.
    let revision_of: HashMap<&str, &str> = rev_a
        .iter()
        .map(|u| (u.as_str(), "rev-a"))
        .chain(rev_b.iter().map(|u| (u.as_str(), "rev-b")))
        .collect();
    for r in ok {
        let json = r.json().unwrap();
        let revision = json["revision"].as_str().unwrap();
        for u in r.event_uuids() {
            let want = revision_of.get(u.as_str()).copied().unwrap_or("131");
            assert_eq!(revision, want, "event {u} sent with revision {revision}");
        }
    }
}

#[test]
fn a_visitor_too_large_for_an_sqs_message_is_refused_with_413() {
    let spool = queues("e2e-too-large");
    let upstream = RecordingUpstream::start();
    let ingest = serve(&with(fast(&upstream.url(), &spool), &["--no-forward"]));
    let big = payload("1", &[format!("big-{}", "x".repeat(300_000))]);
    let (status, body) = post_json(&ingest.url("/v1/events"), &big);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("sqs-max-message-bytes"), "{body}");
    // With a queue that takes 1 MiB messages (moto's limit), the same payload fits.
    let roomy = serve(&with(
        fast(&upstream.url(), &spool),
        &["--no-forward", "--sqs-max-message-bytes", "1048576"],
    ));
    let (status, body) = post_json(&roomy.url("/v1/events"), &big);
    assert_eq!(status, 204, "{body}");
}
