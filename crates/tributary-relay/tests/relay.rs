//! End-to-end tests of `tributary serve`: the real binary, a real SQLite spool in a tempdir,
//! a recording upstream on loopback, and the official Python SDK as a client.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::{
    InProcessRelay, RelayProcess, payload, post, post_full, post_json, run_cli, uuids, wait_until,
};
use tributary_testkit::{RecordedRequest, RecordingUpstream, Reply, Script, delivered_uuids};

const WAIT: Duration = Duration::from_secs(60);

/// Relay flags for tests: quick merging and quick retries.
fn fast(upstream: &str, spool: &str) -> Vec<String> {
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
        "200ms",
        "--request-timeout",
        "2s",
        "--spool-sync",
        "normal",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn count(uuids: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for u in uuids {
        *m.entry(u.as_str()).or_insert(0) += 1;
    }
    m
}

/// Every header field but `visitors` of a recorded body, as JSON text.
fn header_of(r: &RecordedRequest) -> String {
    let mut v = r.json().unwrap();
    v.as_object_mut().unwrap().remove("visitors");
    v.to_string()
}

#[test]
fn python_sdk_events_arrive_once_in_few_large_requests() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap();
    let relay = InProcessRelay::serve(&fast(&upstream.url(), spool));

    let acked = support::python_sdk_events(&relay.url(""), 150, None);
    // One impression (decide) and one conversion (track) per user, each its own request.
    assert_eq!(acked.len(), 300);

    let all_in = |reqs: &[RecordedRequest]| delivered_uuids(reqs).len() >= acked.len();
    assert!(upstream.wait_for(all_in, WAIT), "{}", relay.log_text());
    let delivered = delivered_uuids(&upstream.requests());
    let counts = count(&delivered);
    for u in &acked {
        assert_eq!(
            counts.get(u.as_str()),
            Some(&1),
            "uuid {u} delivered {counts:?}"
        );
    }
    assert_eq!(delivered.len(), acked.len(), "nothing else was delivered");
    // 300 single-event requests in, far fewer out.
    let requests = upstream.requests();
    assert!(
        requests.len() <= 30,
        "{} upstream requests for 300 events",
        requests.len()
    );
    // The SDK's payloads all share one context: every upstream body has the SDK's header.
    for r in &requests {
        let v = r.json().unwrap();
        assert_eq!(v["client_name"], "python-sdk");
        assert_eq!(v["revision"], "131");
    }
}

#[test]
fn contexts_and_regions_never_mix() {
    let us = RecordingUpstream::start();
    let eu = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap();
    let mut args = fast(&us.url(), spool);
    args[3] = eu.url();
    let relay = InProcessRelay::serve(&args);

    let mut us_uuids = Vec::new();
    let mut eu_uuids = Vec::new();
    for i in 0..30u32 {
        let rev = if i.is_multiple_of(2) { "131" } else { "132" };
        let batch = uuids(&format!("us{i}"), 3);
        assert_eq!(
            post_json(&relay.url("/v1/events"), &payload(rev, &batch)).0,
            204
        );
        us_uuids.extend(batch);
        let batch = uuids(&format!("eu{i}"), 2);
        assert_eq!(
            post_json(&relay.url("/eu/v1/events"), &payload("131", &batch)).0,
            204
        );
        eu_uuids.extend(batch);
    }
    assert!(us.wait_for(|r| delivered_uuids(r).len() >= us_uuids.len(), WAIT));
    assert!(eu.wait_for(|r| delivered_uuids(r).len() >= eu_uuids.len(), WAIT));

    let us_got: HashSet<String> = delivered_uuids(&us.requests()).into_iter().collect();
    let eu_got: HashSet<String> = delivered_uuids(&eu.requests()).into_iter().collect();
    assert_eq!(us_got, us_uuids.iter().cloned().collect());
    assert_eq!(eu_got, eu_uuids.iter().cloned().collect());
    for r in us.requests() {
        let v = r.json().unwrap();
        let rev = v["revision"].as_str().unwrap().to_owned();
        // Each visitor in a merged body came from a payload of the body's revision.
        for uuid in r.event_uuids() {
            let i: usize = uuid[2..uuid.find('-').unwrap()].parse().unwrap();
            let want = if i.is_multiple_of(2) { "131" } else { "132" };
            assert_eq!(rev, want, "uuid {uuid} merged into revision {rev}");
        }
        // Unknown visitor fields survive byte for byte.
        assert!(String::from_utf8_lossy(&r.body).contains(r#""session_id":"kept-as-is""#));
    }
    drop(relay);
}

#[test]
fn bad_requests_get_clear_errors_and_store_nothing() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let mut args = fast(&upstream.url(), spool_s);
    args.extend(
        [
            "--max-body-bytes",
            "4096",
            "--max-batch-bytes",
            "1024",
            "--auth-tokens",
            "t0k3n",
        ]
        .map(String::from),
    );
    let relay = InProcessRelay::serve(&args);
    let url = relay.url("/v1/events");
    let good = payload("131", &uuids("ok", 1));
    let auth = ("authorization", "Bearer t0k3n");
    let json = ("content-type", "application/json");

    let (status, _) = post(&url, good.clone(), &[json]);
    assert_eq!(status, 401, "no token");
    let (status, _) = post(
        &url,
        good.clone(),
        &[json, ("authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401, "wrong token");
    let (status, body) = post(&url, good.clone(), &[auth, ("content-type", "text/plain")]);
    assert_eq!(status, 415, "{body}");
    let (status, body) = post(
        &url,
        "{\"account_id\":\"1\",\"visitors\":[{\"snapshots\":[]}]}",
        &[auth, json],
    );
    assert_eq!(status, 400);
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["path"], "$.visitors[0].visitor_id", "{body}");
    let (status, body) = post(&url, "{not json", &[auth, json]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid JSON"), "{body}");
    let (status, _) = post(&url, payload("131", &uuids("big", 60)), &[auth, json]);
    assert_eq!(status, 413, "over --max-body-bytes");
    // One visitor alone over --max-batch-bytes can never be forwarded: refused, not split.
    let huge = payload("131", &["u".repeat(1200)]);
    let (status, body) = post(&url, huge, &[auth, json]);
    assert_eq!(status, 413, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["path"], "$.visitors[0]", "{body}");

    let (status, _) = post(&url, good, &[auth, json]);
    assert_eq!(status, 204);
    assert!(upstream.wait_for(|r| !delivered_uuids(r).is_empty(), WAIT));
    assert_eq!(delivered_uuids(&upstream.requests()), ["ok-000000"]);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |path: &str| {
        runtime.block_on(async {
            let r = reqwest::get(relay.url(path)).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/readyz").0, 200);
    let (_, metrics) = get("/metrics");
    assert!(
        metrics.contains("tributary_ingest_requests_total"),
        "{metrics}"
    );
    assert!(metrics.contains(r#"status="401""#), "{metrics}");
}

#[test]
fn a_poison_payload_becomes_a_dead_letter_and_the_rest_is_delivered() {
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_containing("POISON", Reply::status(400).body("bad visitor")),
    );
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let relay = InProcessRelay::serve(&fast(&upstream.url(), spool_s));

    let mut good = Vec::new();
    for i in 0..20 {
        let batch = if i == 7 {
            vec!["POISON-1".to_owned()]
        } else {
            uuids(&format!("good{i}"), 2)
        };
        assert_eq!(
            post_json(&relay.url("/v1/events"), &payload("131", &batch)).0,
            204
        );
        if i != 7 {
            good.extend(batch);
        }
    }
    assert!(
        upstream.wait_for(|r| delivered_uuids(r).len() >= good.len(), WAIT),
        "{}",
        relay.log_text()
    );
    let delivered: HashSet<String> = delivered_uuids(&upstream.requests()).into_iter().collect();
    assert_eq!(delivered, good.iter().cloned().collect());

    let listed = wait_until(WAIT, || {
        let (code, out, _) = run_cli(&["spool", "dead-letters", "list", "--spool", spool_s]);
        code == 0 && out.lines().count() == 1
    });
    assert!(listed, "one dead letter expected");
    let (code, out, err) = run_cli(&[
        "spool",
        "dead-letters",
        "list",
        "--spool",
        spool_s,
        "--with-body",
    ]);
    assert_eq!(code, 0, "{err}");
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(line["reason"].as_str().unwrap().contains("400"), "{line}");
    assert_eq!(
        line["body"]["visitors"][0]["visitor_id"],
        "visitor-POISON-1"
    );
    let id = line["id"].as_str().unwrap().to_owned();

    let (code, out, _) = run_cli(&["spool", "dead-letters", "purge", "--spool", spool_s, &id]);
    assert_eq!(code, 0);
    assert!(out.starts_with("1 "), "{out}");
    let (_, out, _) = run_cli(&["spool", "stats", "--spool", spool_s]);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["dead_letters"], 0);
}

#[test]
fn a_flaky_upstream_loses_nothing() {
    let upstream = RecordingUpstream::start_with(
        Script::new()
            .then_n(3, Reply::reset())
            .fail_rate(30, 7, Reply::status(503)),
    );
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let relay = InProcessRelay::serve(&fast(&upstream.url(), spool.to_str().unwrap()));

    let mut sent = Vec::new();
    for i in 0..100 {
        let batch = uuids(&format!("flaky{i}"), 2);
        assert_eq!(
            post_json(&relay.url("/v1/events"), &payload("131", &batch)).0,
            204
        );
        sent.extend(batch);
    }
    assert!(
        upstream.wait_for(|r| delivered_uuids(r).len() >= sent.len(), WAIT),
        "{}",
        relay.log_text()
    );
    let delivered = delivered_uuids(&upstream.requests());
    let counts = count(&delivered);
    for u in &sent {
        assert_eq!(counts.get(u.as_str()), Some(&1), "{u}");
    }
    let failures = upstream
        .requests()
        .iter()
        .filter(|r| !r.is_success())
        .count();
    assert!(failures >= 3, "the script failed {failures} requests");
}

#[test]
fn an_outage_holds_everything_until_the_upstream_is_back() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let relay = InProcessRelay::serve(&fast(&upstream.url(), spool_s));

    let sent = uuids("outage", 40);
    for chunk in sent.chunks(4) {
        assert_eq!(
            post_json(&relay.url("/v1/events"), &payload("131", chunk)).0,
            204
        );
    }
    // The relay keeps trying while the upstream is down...
    assert!(upstream.wait_for(|r| r.len() >= 3, WAIT));
    let (_, out, _) = run_cli(&["spool", "stats", "--spool", spool_s]);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["pending_events"], 40, "{out}");
    // ...and delivers everything once it is back.
    upstream.set_script(Script::new());
    assert!(
        upstream.wait_for(|r| delivered_uuids(r).len() >= sent.len(), WAIT),
        "{}",
        relay.log_text()
    );
    let got: HashSet<String> = delivered_uuids(&upstream.requests()).into_iter().collect();
    assert_eq!(got, sent.iter().cloned().collect());
}

#[test]
fn kill_9_during_load_loses_nothing_acknowledged() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_owned();
    let mut relay = RelayProcess::serve(&fast(&upstream.url(), &spool_s));
    let url = relay.url("/v1/events");

    // A client posts until the relay dies; it remembers what got a 204.
    let poster = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0.. {
            let batch = uuids(&format!("k{i}"), 3);
            match post_json(&url, &payload("131", &batch)).0 {
                204 => acked.extend(batch),
                0 => return acked,
                other => panic!("unexpected status {other}"),
            }
        }
        acked
    });
    assert!(upstream.wait_for(|r| delivered_uuids(r).len() >= 150, WAIT));
    relay.kill9();
    let acked = poster.join().unwrap();
    assert!(acked.len() >= 150);

    let relay = RelayProcess::serve(&fast(&upstream.url(), &spool_s));
    let want: HashSet<&String> = acked.iter().collect();
    let complete = upstream.wait_for(
        |r| {
            let got: HashSet<String> = delivered_uuids(r).into_iter().collect();
            want.iter().all(|u| got.contains(*u))
        },
        WAIT,
    );
    assert!(
        complete,
        "acknowledged events missing after restart:\n{}",
        relay.log_text()
    );
}

#[test]
fn sigterm_exits_promptly_and_keeps_the_rest_for_the_next_start() {
    // The upstream hangs, so nothing can be delivered before shutdown.
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::hang()));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_owned();
    let mut args = fast(&upstream.url(), &spool_s);
    args.extend(["--shutdown-grace", "1s"].map(String::from));
    let mut relay = RelayProcess::serve(&args);
    let sent = uuids("term", 30);
    for chunk in sent.chunks(3) {
        assert_eq!(
            post_json(&relay.url("/v1/events"), &payload("131", chunk)).0,
            204
        );
    }
    assert!(upstream.wait_for(|r| !r.is_empty(), WAIT));
    let status = relay.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");

    upstream.set_script(Script::new());
    let relay = RelayProcess::serve(&fast(&upstream.url(), &spool_s));
    let want: HashSet<String> = sent.iter().cloned().collect();
    assert!(
        upstream.wait_for(
            |r| delivered_uuids(r).into_iter().collect::<HashSet<_>>() == want,
            WAIT
        ),
        "{}",
        relay.log_text()
    );
}

#[test]
fn merged_batches_never_exceed_max_batch_bytes() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let limit = 20_000usize;
    let limit_s = limit.to_string();
    // Accept everything first, then forward, so merging has plenty to work with.
    let mut args = fast(&upstream.url(), spool_s);
    args.extend(["--no-forward", "--max-batch-bytes", &limit_s].map(String::from));
    let mut ingest = InProcessRelay::serve(&args);
    let mut sent = Vec::new();
    for i in 0..120 {
        let batch = uuids(&format!("m{i}"), 1 + i % 5);
        assert_eq!(
            post_json(&ingest.url("/v1/events"), &payload("131", &batch)).0,
            204
        );
        sent.extend(batch);
    }
    // One request larger than the limit: accepted and split by visitors.
    let big = uuids("big", 80);
    assert!(payload("131", &big).len() > limit);
    assert_eq!(
        post_json(&ingest.url("/v1/events"), &payload("131", &big)).0,
        204
    );
    sent.extend(big);
    ingest.stop();
    assert_eq!(upstream.request_count(), 0, "--no-forward sent something");

    let (code, out, err) = run_cli(&[
        "drain",
        "--once",
        "--spool",
        spool_s,
        "--upstream",
        &upstream.url(),
        "--max-batch-bytes",
        &limit_s,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["summary"]["events_delivered"], sent.len());
    assert_eq!(summary["spool"]["pending"], 0);

    let requests = upstream.requests();
    for r in &requests {
        assert!(r.body.len() <= limit, "{} bytes sent", r.body.len());
    }
    let got = delivered_uuids(&requests);
    assert_eq!(got.len(), sent.len());
    assert_eq!(got.iter().collect::<HashSet<_>>(), sent.iter().collect());
    // Merged: far fewer requests than the 121 payloads that came in.
    assert!(requests.len() < 40, "{} requests", requests.len());
    let headers: HashSet<String> = requests.iter().map(header_of).collect();
    assert_eq!(headers.len(), 1);
}

#[test]
fn drain_once_reports_failures_with_exit_status_1() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let mut args = fast(&upstream.url(), spool_s);
    args.push("--no-forward".to_owned());
    let mut ingest = InProcessRelay::serve(&args);
    assert_eq!(
        post_json(&ingest.url("/v1/events"), &payload("131", &uuids("d", 2))).0,
        204
    );
    ingest.stop();
    let (code, out, _) = run_cli(&[
        "drain",
        "--once",
        "--spool",
        spool_s,
        "--upstream",
        &upstream.url(),
        "--request-timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["summary"]["payloads_retried"], 1);
    assert_eq!(summary["spool"]["pending"], 1);
}

#[test]
fn a_full_spool_answers_503_and_keeps_what_it_acknowledged() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let mut args = fast(&upstream.url(), spool_s);
    args.extend(["--no-forward", "--spool-max-bytes", "4000"].map(String::from));
    let mut ingest = InProcessRelay::serve(&args);
    let url = ingest.url("/v1/events");

    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..50 {
        let batch = uuids(&format!("full{i}"), 1);
        let (status, headers, body) = post_full(
            &url,
            payload("131", &batch),
            &[("content-type", "application/json")],
        );
        match status {
            204 => acked.extend(batch),
            503 => {
                refused = Some(headers.into_iter().find(|(k, _)| k == "retry-after"));
                break;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let retry_after = refused.expect("the spool never filled up");
    assert!(retry_after.is_some(), "503 without Retry-After");
    assert!(!acked.is_empty());
    ingest.stop();

    let (code, out, err) = run_cli(&[
        "drain",
        "--once",
        "--spool",
        spool_s,
        "--upstream",
        &upstream.url(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let got: HashSet<String> = delivered_uuids(&upstream.requests()).into_iter().collect();
    assert_eq!(got, acked.iter().cloned().collect::<HashSet<_>>());
}

/// `--spool-compression` decides how the rows of the relay's spool are stored; the events
/// come out the same either way (every other test here runs with the default, zstd).
#[test]
fn spool_compression_decides_how_the_spool_stores_visitors() {
    for (codec, encoding) in [("none", 0), ("zstd", 1)] {
        let upstream = RecordingUpstream::start();
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let spool_s = spool.to_str().unwrap();
        let mut args = fast(&upstream.url(), spool_s);
        args.extend(["--no-forward", "--spool-compression", codec].map(String::from));
        let mut relay = InProcessRelay::serve(&args);
        let sent = uuids(codec, 10);
        assert_eq!(
            post_json(&relay.url("/v1/events"), &payload("131", &sent)).0,
            204
        );
        relay.stop();
        let conn = rusqlite::Connection::open(spool.join("spool.db")).unwrap();
        let stored: Vec<(i64, i64, i64)> = conn
            .prepare("SELECT encoding, length(visitors), bytes FROM payloads")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored.len(), 1, "{codec}");
        let (got, on_disk, bytes) = stored[0];
        assert_eq!(got, encoding, "{codec}");
        if encoding == 1 {
            assert!(on_disk * 2 < bytes, "{codec}: {on_disk} of {bytes}");
        }
        drop(conn);

        let (code, out, err) = run_cli(&[
            "drain",
            "--once",
            "--spool",
            spool_s,
            "--upstream",
            &upstream.url(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let mut delivered = delivered_uuids(&upstream.requests());
        delivered.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(delivered, want, "{codec}");
    }
}
