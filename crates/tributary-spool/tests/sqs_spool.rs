//! The SQS spool against moto's SQS server (one per test binary, started by the testkit;
//! every test uses its own queues). Fails, not skips, when moto is not installed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::config::{Credentials, Region};
use bytes::Bytes;
use tributary::RawBatch;
use tributary_spool::{Leased, Payload, Selection, Spool, SpoolError, SqsConfig, SqsSpool};
use tributary_testkit::MotoServer;

const LONG: Duration = Duration::from_secs(600);

async fn sdk() -> aws_config::SdkConfig {
    let moto = MotoServer::shared();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(moto.endpoint())
        .load()
        .await
}

/// Settings for tests: no long polling, so an empty lease answers at once.
fn config(queue: &str) -> SqsConfig {
    SqsConfig {
        wait_time: Duration::ZERO,
        ..SqsConfig::new(queue)
    }
}

/// A queue and its dead-letter queue, both fresh; returns the queue name.
fn queues(name: &str) -> String {
    let moto = MotoServer::shared();
    moto.create_queue(&format!("{name}-dlq"), &[]);
    moto.create_queue(name, &[]);
    name.to_owned()
}

async fn open(name: &str) -> SqsSpool {
    let c = SqsConfig {
        dead_letter_queue: Some(format!("{name}-dlq")),
        ..config(name)
    };
    SqsSpool::open(&sdk().await, c).await.unwrap()
}

/// A payload of `n` visitors `{"visitor_id":"<tag>-<i>","pad":"..."}`.
fn payload(route: &str, revision: &str, tag: &str, n: usize, pad: usize) -> Payload {
    let pad = "p".repeat(pad);
    let visitors: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"visitor_id":"{tag}-{i}","snapshots":[],"pad":"{pad}"}}"#))
        .collect();
    let body = format!(
        r#"{{"account_id":"1","revision":"{revision}","visitors":[{}]}}"#,
        visitors.join(",")
    );
    Payload::from_batch(route, &RawBatch::parse(Bytes::from(body)).unwrap())
}

/// visitor_id -> route of every visitor in `leased`.
fn visitors(leased: &[Leased]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for l in leased {
        for v in l.payload.to_batch().unwrap().visitors() {
            let v: serde_json::Value = serde_json::from_slice(v).unwrap();
            out.push((
                v["visitor_id"].as_str().unwrap().to_owned(),
                l.payload.route.to_string(),
            ));
        }
    }
    out
}

/// Leases until `want` payloads came back or 10 s passed.
async fn lease_all(spool: &SqsSpool, want: usize) -> Vec<Leased> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    while all.len() < want && Instant::now() < deadline {
        all.extend(spool.lease(1000, 64 << 20, LONG).await.unwrap());
    }
    all
}

#[tokio::test]
async fn append_lease_ack_round_trip_keeps_routes_and_bytes() {
    let q = queues("round-trip");
    let spool = open(&q).await;
    let us = payload("us", "1", "us", 5, 10);
    let eu = payload("eu", "1", "eu", 3, 10);
    spool.append(vec![us.clone(), eu.clone()]).await.unwrap();

    let leased = lease_all(&spool, 2).await;
    assert_eq!(leased.len(), 2);
    for l in &leased {
        let original = if l.payload.route == "us" { &us } else { &eu };
        assert_eq!(&l.payload, original, "stored bytes come back unchanged");
        assert_eq!(l.attempts, 0);
        assert!(l.appended_at_ms > 0);
    }
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased), (2, 2));

    let receipts: Vec<_> = leased.iter().map(|l| l.receipt.clone()).collect();
    spool.ack(&receipts).await.unwrap();
    // Acking twice (a late settle) is harmless.
    spool.ack(&receipts).await.unwrap();
    assert!(spool.lease(10, 1 << 20, LONG).await.unwrap().is_empty());
    assert_eq!(spool.stats().await.unwrap().pending, 0);
}

#[tokio::test]
async fn large_payloads_are_split_to_fit_messages_and_all_visitors_come_back() {
    let q = queues("split");
    let spool = open(&q).await;
    // 60 visitors of ~20 KB: about 1.2 MB, several 256 KiB messages, several batch calls.
    spool
        .append(vec![payload("us", "1", "big", 60, 20_000)])
        .await
        .unwrap();
    let leased = lease_all(&spool, 5).await;
    assert!(leased.len() >= 5, "{} messages", leased.len());
    let mut ids: Vec<String> = visitors(&leased).into_iter().map(|(v, _)| v).collect();
    ids.sort();
    let mut want: Vec<String> = (0..60).map(|i| format!("big-{i}")).collect();
    want.sort();
    assert_eq!(ids, want);

    let err = spool
        .append(vec![payload("us", "1", "huge", 1, 300_000)])
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::TooLarge(_)), "{err}");
}

#[tokio::test]
async fn leases_respect_byte_limits_without_losing_or_repeating() {
    let q = queues("byte-limit");
    let spool = open(&q).await;
    let payloads: Vec<Payload> = (0..30)
        .map(|i| payload("us", "1", &format!("b{i}"), 1, 10_000))
        .collect();
    spool.append(payloads).await.unwrap();

    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 30 && Instant::now() < deadline {
        let leased = spool.lease(100, 45_000, LONG).await.unwrap();
        let bytes: usize = leased.iter().map(|l| l.payload.stored_len()).sum();
        assert!(
            leased.len() <= 4 && bytes <= 45_000,
            "{} payloads, {bytes} bytes",
            leased.len()
        );
        for (v, _) in visitors(&leased) {
            *seen.entry(v).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), 30);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
}

#[tokio::test]
async fn released_and_expired_leases_come_back_with_attempts() {
    let q = queues("release");
    let spool = open(&q).await;
    spool
        .append(vec![payload("us", "1", "r", 1, 0)])
        .await
        .unwrap();

    let first = lease_all(&spool, 1).await;
    spool
        .release(&[first[0].receipt.clone()], Duration::ZERO)
        .await
        .unwrap();
    let second = lease_all(&spool, 1).await;
    assert_eq!(second[0].attempts, 1);

    spool
        .release(&[second[0].receipt.clone()], Duration::ZERO)
        .await
        .unwrap();
    let fourth = lease_all(&spool, 1).await;
    assert_eq!(fourth[0].attempts, 2);
}

#[tokio::test]
async fn a_short_lease_runs_out_and_the_message_is_delivered_again() {
    let q = queues("expiry");
    let spool = open(&q).await;
    spool
        .append(vec![payload("us", "1", "e", 1, 0)])
        .await
        .unwrap();
    let first = spool
        .lease(10, 1 << 20, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let started = Instant::now();
    let again = lease_all(&spool, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The first holder's receipt is stale now: acking with it must not fail the caller.
    spool.ack(&[first[0].receipt.clone()]).await.unwrap();
}

#[tokio::test]
async fn dead_letters_can_be_listed_retried_and_purged() {
    let q = queues("dead");
    let spool = open(&q).await;
    spool
        .append(vec![
            payload("eu", "1", "d1", 2, 0),
            payload("us", "1", "d2", 1, 0),
            payload("us", "1", "d3", 1, 0),
        ])
        .await
        .unwrap();
    let leased = lease_all(&spool, 3).await;
    let receipts: Vec<_> = leased.iter().map(|l| l.receipt.clone()).collect();
    spool
        .dead_letter(&receipts, "upstream answered 400: bad")
        .await
        .unwrap();
    assert!(spool.lease(10, 1 << 20, LONG).await.unwrap().is_empty());
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (0, 3));

    let dead = spool.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter()
            .all(|d| d.reason == "upstream answered 400: bad")
    );
    assert!(dead.iter().all(|d| d.dead_at_ms >= d.appended_at_ms));
    let eu = dead.iter().find(|d| d.payload.route == "eu").unwrap();
    assert_eq!(eu.payload.visitor_count, 2);
    // Listing leaves them in place.
    assert_eq!(spool.dead_letters(10).await.unwrap().len(), 3);

    let n = spool
        .retry_dead_letters(Selection::Ids(vec![eu.id.clone()]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let back = lease_all(&spool, 1).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].payload.route, "eu");
    assert_eq!(
        back[0].appended_at_ms, eu.appended_at_ms,
        "age survives the round trip"
    );

    assert_eq!(spool.purge_dead_letters(Selection::All).await.unwrap(), 2);
    assert!(spool.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn unreadable_messages_and_too_many_receives_go_to_dead_letters() {
    let q = queues("poison");
    let sdk = sdk().await;
    let spool = SqsSpool::open(
        &sdk,
        SqsConfig {
            dead_letter_queue: Some(format!("{q}-dlq")),
            max_receives: 2,
            ..config(&q)
        },
    )
    .await
    .unwrap();
    // Another producer's message that is not an Event API payload.
    let client = aws_sdk_sqs::Client::new(&sdk);
    client
        .send_message()
        .queue_url(spool.queue_url())
        .message_body("{\"not\":\"a payload\"}")
        .send()
        .await
        .unwrap();
    // A foreign but valid message (no attributes): routed to the US upstream.
    client
        .send_message()
        .queue_url(spool.queue_url())
        .message_body(r#"{"account_id":"9","visitors":[{"visitor_id":"f","snapshots":[]}]}"#)
        .send()
        .await
        .unwrap();
    spool
        .append(vec![payload("us", "1", "loop", 1, 0)])
        .await
        .unwrap();

    let leased = lease_all(&spool, 2).await;
    assert_eq!(leased.len(), 2, "the unreadable one is not handed out");
    let foreign = leased
        .iter()
        .find(|l| l.payload.header.starts_with(br#""account_id":"9""#));
    assert_eq!(foreign.unwrap().payload.route, "us");
    // Keep the good ones failing: the third receive passes max_receives (2).
    let mut rounds = 0;
    let mut current = leased;
    while !current.is_empty() {
        rounds += 1;
        assert!(rounds < 10, "never dead-lettered");
        let receipts: Vec<_> = current.iter().map(|l| l.receipt.clone()).collect();
        spool.release(&receipts, Duration::ZERO).await.unwrap();
        current = spool.lease(10, 1 << 20, LONG).await.unwrap();
    }
    assert_eq!(rounds, 2);

    let dead = spool.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(
        dead.iter()
            .any(|d| d.reason.contains("not an Event API payload"))
    );
    assert_eq!(
        dead.iter()
            .filter(|d| d.reason.contains("received 3 times"))
            .count(),
        2
    );
}

#[tokio::test]
async fn the_redrive_policy_names_the_dead_letter_queue() {
    let moto = MotoServer::shared();
    moto.create_queue("redrive-dlq", &[]);
    let policy = format!(
        r#"{{"deadLetterTargetArn":"{}","maxReceiveCount":"1000"}}"#,
        MotoServer::queue_arn("redrive-dlq")
    );
    let url = moto.create_queue("redrive", &[("RedrivePolicy", &policy)]);
    // By URL this time.
    let spool = SqsSpool::open(&sdk().await, config(&url)).await.unwrap();
    assert!(spool.dead_letter_url().unwrap().ends_with("/redrive-dlq"));

    spool
        .append(vec![payload("us", "1", "x", 1, 0)])
        .await
        .unwrap();
    let leased = lease_all(&spool, 1).await;
    spool
        .dead_letter(&[leased[0].receipt.clone()], "test")
        .await
        .unwrap();
    assert_eq!(moto.queue_counts("redrive-dlq").0, 1);
}

#[tokio::test]
async fn without_a_dead_letter_queue_messages_are_hidden_not_deleted() {
    MotoServer::shared().create_queue("no-dlq", &[]);
    let spool = SqsSpool::open(&sdk().await, config("no-dlq"))
        .await
        .unwrap();
    assert!(spool.dead_letter_url().is_none());
    spool
        .append(vec![payload("us", "1", "x", 1, 0)])
        .await
        .unwrap();
    let leased = lease_all(&spool, 1).await;
    spool
        .dead_letter(&[leased[0].receipt.clone()], "test")
        .await
        .unwrap();
    assert_eq!(MotoServer::shared().queue_counts("no-dlq"), (0, 1));
    assert!(matches!(
        spool.dead_letters(10).await,
        Err(SpoolError::Config(_))
    ));
}

#[tokio::test]
async fn a_missing_queue_or_region_is_a_clear_error() {
    let err = SqsSpool::open(&sdk().await, config("no-such-queue"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SpoolError::Config(m) if m.contains("no-such-queue")),
        "{err}"
    );

    let no_region = aws_config::SdkConfig::builder().build();
    let err = SqsSpool::open(&no_region, config("q")).await.unwrap_err();
    assert!(err.to_string().contains("AWS_REGION"), "{err}");
}

#[tokio::test]
async fn two_spools_leasing_at_once_never_share_a_message() {
    let q = queues("parallel");
    let a = open(&q).await;
    let b = open(&q).await;
    let payloads: Vec<Payload> = (0..200)
        .map(|i| payload("us", "1", &format!("p{i}"), 1, 0))
        .collect();
    a.append(payloads).await.unwrap();

    let take = |spool: SqsSpool| async move {
        let mut got = Vec::new();
        loop {
            let leased = spool.lease(25, 1 << 20, LONG).await.unwrap();
            if leased.is_empty() {
                return got;
            }
            got.extend(visitors(&leased).into_iter().map(|(v, _)| v));
        }
    };
    let (x, y) = tokio::join!(tokio::spawn(take(a)), tokio::spawn(take(b)));
    let (x, y) = (x.unwrap(), y.unwrap());
    let mut all: Vec<String> = x.iter().chain(y.iter()).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200, "every message leased");
    // SQS is at-least-once, and moto's server does not make concurrent receives atomic
    // (two threads can both take a message): a rare duplicate is allowed, a pattern not.
    let duplicates = x.len() + y.len() - 200;
    assert!(duplicates <= 10, "{duplicates} messages leased twice");
}

#[tokio::test]
async fn a_partial_settlement_requeues_the_rest_and_dead_letters_each_refused_visitor() {
    let name = queues("settle-parts");
    let spool = open(&name).await;
    spool
        .append(vec![payload("eu", "9", "sp", 4, 10)])
        .await
        .unwrap();
    let leased = lease_all(&spool, 1).await;
    assert_eq!(leased.len(), 1);
    let batch = leased[0].payload.to_batch().unwrap();
    let part = |range: std::ops::Range<usize>| {
        let visitors = batch.visitors()[range].to_vec();
        Payload::from_batch(
            "eu",
            &RawBatch::from_parts(batch.header().clone(), visitors),
        )
    };
    // Visitor 0 delivered, 1 refused alone, 2 and 3 still to send.
    spool
        .settle_parts(vec![tributary_spool::PartialSettlement {
            receipt: leased[0].receipt.clone(),
            delivered_events: 1,
            dead: vec![(part(1..2), "refused alone by the upstream: HTTP 400".into())],
            remainder: Some(part(2..4)),
            delay: Duration::ZERO,
        }])
        .await
        .unwrap();
    let rest = lease_all(&spool, 1).await;
    let mut got = visitors(&rest);
    got.sort();
    assert_eq!(
        got,
        [
            ("sp-2".to_owned(), "eu".to_owned()),
            ("sp-3".to_owned(), "eu".to_owned())
        ]
    );
    assert_eq!(rest[0].payload.header, leased[0].payload.header);
    let dead = spool.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload.visitor_count, 1);
    assert_eq!(dead[0].payload.route, "eu");
    assert_eq!(dead[0].reason, "refused alone by the upstream: HTTP 400");
    assert_eq!(dead[0].appended_at_ms, leased[0].appended_at_ms);
}

#[tokio::test]
async fn without_a_dead_letter_queue_only_messages_with_refused_visitors_are_hidden() {
    MotoServer::shared().create_queue("no-dlq-parts", &[]);
    let spool = SqsSpool::open(&sdk().await, config("no-dlq-parts"))
        .await
        .unwrap();
    spool
        .append(vec![
            payload("us", "1", "keep", 3, 0),
            payload("us", "1", "bad", 2, 0),
        ])
        .await
        .unwrap();
    let leased = lease_all(&spool, 2).await;
    let of = |tag: &str| {
        leased
            .iter()
            .find(|l| visitors(std::slice::from_ref(*l))[0].0.starts_with(tag))
            .unwrap()
            .clone()
    };
    let (keep, bad) = (of("keep"), of("bad"));
    let part = |l: &Leased, range: std::ops::Range<usize>| {
        let batch = l.payload.to_batch().unwrap();
        let visitors = batch.visitors()[range].to_vec();
        Payload::from_batch(
            "us",
            &RawBatch::from_parts(batch.header().clone(), visitors),
        )
    };
    spool
        .settle_parts(vec![
            // Delivered in part, nothing refused: the rest goes back to the queue.
            tributary_spool::PartialSettlement {
                receipt: keep.receipt.clone(),
                delivered_events: 1,
                dead: vec![],
                remainder: Some(part(&keep, 1..3)),
                delay: Duration::ZERO,
            },
            // A visitor refused alone, and nowhere to put it: the message is hidden whole.
            tributary_spool::PartialSettlement {
                receipt: bad.receipt.clone(),
                delivered_events: 1,
                dead: vec![(part(&bad, 1..2), "refused".into())],
                remainder: None,
                delay: Duration::ZERO,
            },
        ])
        .await
        .unwrap();
    let again = lease_all(&spool, 1).await;
    let mut got = visitors(&again);
    got.sort();
    assert_eq!(
        got,
        [
            ("keep-1".to_owned(), "us".to_owned()),
            ("keep-2".to_owned(), "us".to_owned())
        ]
    );
    spool
        .ack(&again.iter().map(|l| l.receipt.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    // Only the refused one is left, hidden, not deleted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while MotoServer::shared().queue_counts("no-dlq-parts") != (0, 1) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            MotoServer::shared().queue_counts("no-dlq-parts")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
