//! A relay many teams share, through real processes: the `tributary` binary between a
//! client posting SDK-shaped payloads and a recording upstream on loopback.
//!
//! - privacy rules: dropped keys never arrive, visitor ids arrive as the HMAC, every event
//!   arrives, and visitors no rule touches arrive byte for byte;
//! - duplicates: the same payload three times, and payloads sharing uuids, reach the
//!   upstream once per uuid, also across `kill -9` and a restart;
//! - fair share: during an upstream outage the flooding account gets 429 at its quota
//!   while the other's payloads are all accepted and later delivered; a token over its
//!   request rate gets 429 while another token is still served.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use support::{RelayProcess, get, post_full, relay_args, run_cli, uuids};
use tributary_testkit::{RecordingUpstream, Reply, Script, delivered_uuids};

const WAIT: Duration = Duration::from_secs(90);

fn hmac_hex(key: &[u8], id: &str) -> String {
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn post(
    relay: &RelayProcess,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    post_full(&relay.url("/v1/events"), body.to_owned(), &headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// An SDK-shaped conversion visitor: the attributes the Python SDK sends, and fields
/// written the way a client might (a number as `3.50`, an unknown `session_id`).
fn visitor(id: &str, uuid: &str, attributes: &[(&str, &str)]) -> String {
    let attrs: Vec<String> = attributes
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            format!(r#"{{"entity_id":"2155475004{i}","key":"{k}","type":"custom","value":{v}}}"#)
        })
        .chain(std::iter::once(
            r#"{"entity_id":"$opt_bot_filtering","key":"$opt_bot_filtering","type":"custom","value":true}"#
                .to_owned(),
        ))
        .collect();
    format!(
        r#"{{"snapshots":[{{"events":[{{"entity_id":"21549340108","uuid":"{uuid}","key":"purchase","timestamp":1795443245068,"revenue":4200,"value":3.50,"tags":{{"category":"sh\u00f6es"}}}}]}}],"attributes":[{}],"visitor_id":"{id}","session_id":"kept-as-is"}}"#,
        attrs.join(",")
    )
}

fn body(account: &str, visitors: &[String]) -> String {
    format!(
        r#"{{"account_id":"{account}","project_id":"21537940595","revision":"131","client_name":"python-sdk","client_version":"5.7.0","anonymize_ip":true,"enrich_decisions":true,"visitors":[{}]}}"#,
        visitors.join(",")
    )
}

/// Every visitor the upstream accepted, as JSON.
fn delivered_visitors(upstream: &RecordingUpstream) -> Vec<serde_json::Value> {
    upstream
        .requests()
        .iter()
        .filter(|r| r.is_success())
        .flat_map(|r| {
            r.json().unwrap()["visitors"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// What `tributary spool stats` says.
fn stats(spool: &str) -> serde_json::Value {
    let (code, out, err) = run_cli(&["spool", "stats", "--spool", spool]);
    assert_eq!(code, 0, "{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits until the spool holds nothing: the forwarder has delivered everything, so the
/// upstream will get nothing more.
fn until_empty(spool: &str) {
    assert!(
        support::wait_until(WAIT, || stats(spool)["pending"] == 0),
        "the spool never emptied: {}",
        stats(spool)
    );
}

#[test]
fn privacy_rules_drop_and_hash_before_the_disk_and_leave_the_rest_byte_for_byte() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap();
    let key_file = dir.path().join("hmac.key");
    std::fs::write(&key_file, "team-shared-secret\n").unwrap();
    // Relay-wide: drop email and age, hash visitor ids. Account 777 opts out of hashing,
    // so its visitors without email or age are touched by no rule.
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "drop-attributes = [\"email\", \"age\"]\nhash-visitor-ids = true\n\
             hash-key-file = {:?}\n\n[[privacy.account]]\naccount-id = \"777\"\nhash-visitor-ids = false\n",
            key_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut args = relay_args(&upstream.url(), spool, &[]);
    args.extend(["--config".to_owned(), config.to_str().unwrap().to_owned()]);
    let mut relay = RelayProcess::serve(&args);

    let touched: Vec<String> = (0..50)
        .map(|i| {
            visitor(
                &format!("user-{i}@example.com"),
                &format!("p-{i:04}"),
                &[
                    ("email", r#""user@example.com""#),
                    ("country", r#""DE""#),
                    ("age", "34"),
                ],
            )
        })
        .collect();
    let untouched: Vec<String> = (0..20)
        .map(|i| {
            visitor(
                &format!("plain-{i}"),
                &format!("q-{i:04}"),
                &[("country", r#""FR""#)],
            )
        })
        .collect();
    for chunk in touched.chunks(10) {
        let (status, _, text) = post(&relay, &body("12133785640", chunk), &[]);
        assert_eq!(status, 204, "{text}");
    }
    for chunk in untouched.chunks(10) {
        let (status, _, text) = post(&relay, &body("777", chunk), &[]);
        assert_eq!(status, 204, "{text}");
    }
    // An account id no metric may carry (it is not an account id's shape).
    let odd_account = visitor("odd-visitor", "r-0000", &[("country", r#""NL""#)]);
    let (status, _, text) = post(&relay, &body("ops@accounts.test", &[odd_account]), &[]);
    assert_eq!(status, 204, "{text}");
    // Attributes the rule cannot judge: refused whole, or the item removed.
    let not_array = r#"{"attributes":{"key":"email","value":"user@example.com"},"snapshots":[{"decisions":[],"events":[{"entity_id":"1","key":"k","timestamp":1,"uuid":"refused"}]}],"visitor_id":"v"}"#;
    let (status, _, text) = post(&relay, &body("12133785640", &[not_array.to_owned()]), &[]);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("attributes") && !text.contains("example.com"),
        "{text}"
    );
    let repeated_key = r#"{"attributes":[{"key":"country","key":"email","value":"user@example.com"},{"key":"country","value":"DE"}],"snapshots":[{"decisions":[],"events":[{"entity_id":"1","key":"k","timestamp":1,"uuid":"r-0001"}]}],"visitor_id":"v"}"#;
    let (status, _, text) = post(&relay, &body("777", &[repeated_key.to_owned()]), &[]);
    assert_eq!(status, 204, "{text}");
    until_empty(spool);
    // Nothing removed ever reached the disk: not in the database, its WAL, or anywhere
    // else under the spool directory.
    let no_leak_on_disk = || {
        for entry in std::fs::read_dir(spool).expect("the spool directory") {
            let path = entry.expect("a spool file").path();
            let bytes = std::fs::read(&path).expect("a spool file's bytes");
            assert!(
                !bytes
                    .windows(b"example.com".len())
                    .any(|w| w == b"example.com"),
                "{} holds a removed value or a raw visitor id",
                path.display()
            );
        }
    };
    no_leak_on_disk();

    let requests = upstream.requests();
    let visitors = delivered_visitors(&upstream);
    // Every event arrives, once.
    let mut got = delivered_uuids(&requests);
    got.sort();
    let mut want: Vec<String> = (0..50)
        .map(|i| format!("p-{i:04}"))
        .chain((0..20).map(|i| format!("q-{i:04}")))
        .chain((0..2).map(|i| format!("r-{i:04}")))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // No dropped key and no removed value arrives anywhere in what the upstream got.
    for r in &requests {
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("\"email\"") && !text.contains("\"age\""),
            "{text}"
        );
        assert!(
            !text.contains("example.com"),
            "a raw visitor id or email arrived: {text}"
        );
    }
    // Each touched visitor's id is the HMAC of the original under the key (without the
    // file's trailing newline); the rest of it is as sent.
    for v in &visitors {
        let uuid = v["snapshots"][0]["events"][0]["uuid"].as_str().unwrap();
        let keys: Vec<&str> = v["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap())
            .collect();
        if let Some(i) = uuid.strip_prefix("p-") {
            let i: u32 = i.parse().unwrap();
            assert_eq!(
                v["visitor_id"],
                hmac_hex(b"team-shared-secret", &format!("user-{i}@example.com"))
            );
            assert_eq!(keys, ["country", "$opt_bot_filtering"]);
            assert_eq!(v["session_id"], "kept-as-is");
        }
    }
    // Touched visitors keep their numbers as written (3.50 stays 3.50) and key order.
    let all_bodies: String = requests
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    // The 50 touched, the 20 untouched and the odd account's visitor.
    assert_eq!(all_bodies.matches(r#""value":3.50"#).count(), 71);
    assert!(
        all_bodies.contains(r#"\u00f6"#),
        "escapes are kept as written"
    );
    // Untouched visitors arrive exactly as they were sent.
    for v in &untouched {
        assert!(all_bodies.contains(v.as_str()), "not byte for byte: {v}");
    }
    // Counted by account, and never a removed value in the metrics or the log.
    let (_, metrics) = get(&relay.url("/metrics"));
    assert!(
        metrics
            .contains(r#"tributary_privacy_attributes_dropped_total{account="12133785640"} 100"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tributary_privacy_visitor_ids_hashed_total{account="12133785640"} 50"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"account="other""#), "{metrics}");
    assert!(!metrics.contains("accounts.test"), "{metrics}");
    relay.terminate(Duration::from_secs(30));
    no_leak_on_disk();
    assert!(
        !relay.log_text().contains("example.com"),
        "{}",
        relay.log_text()
    );
}

#[test]
fn privacy_rules_are_checked_at_start_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("s");
    let spool = spool.to_str().unwrap();
    let empty = dir.path().join("empty.key");
    std::fs::write(&empty, "\n").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--drop-attributes",
                "email",
                "--allow-attributes",
                "country",
            ],
            "allow-attributes",
        ),
        (&["--drop-attributes", "email,,age"], "blank key"),
        (
            &["--hash-visitor-ids"],
            "hash-visitor-ids needs hash-key-file",
        ),
        (
            &[
                "--hash-visitor-ids",
                "--hash-key-file",
                empty.to_str().unwrap(),
            ],
            "is empty",
        ),
        (&["--token-rate-limit", "5"], "needs auth-tokens"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["serve", "--print-config", "--spool", spool];
        args.extend_from_slice(flags);
        let (code, out, err) = run_cli(&args);
        assert_ne!(code, 0, "{flags:?} was accepted:\n{out}");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}

#[test]
fn duplicates_reach_the_upstream_once_per_uuid_across_kill_9_and_restart() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap();
    // One account label besides the configured ones: the first account seen takes it.
    let args = relay_args(
        &upstream.url(),
        spool,
        &["--dedup-window", "10m", "--max-account-labels", "1"],
    );
    let mut relay = RelayProcess::serve(&args);

    let all = uuids("dup", 20);
    let payload = |range: std::ops::Range<usize>| support::payload("1", &all[range]);
    // The same payload three times, then one that shares half its uuids.
    for _ in 0..3 {
        let (status, _, text) = post(&relay, &payload(0..10), &[]);
        assert_eq!(status, 204, "{text}");
    }
    let (status, _, text) = post(&relay, &payload(5..15), &[]);
    assert_eq!(status, 204, "{text}");
    until_empty(spool);
    let (_, metrics) = get(&relay.url("/metrics"));
    assert!(
        metrics.contains(r#"tributary_ingest_duplicate_events_total{account="12133785640"} 25"#),
        "{metrics}"
    );

    // No goodbye: what the filter recorded must be on disk already.
    relay.kill9();
    let relay = RelayProcess::serve(&args);
    // The SDK retries after a lost acknowledgement: all acknowledged again, none stored.
    for range in [0..10, 5..15, 10..20] {
        let (status, _, text) = post(&relay, &payload(range), &[]);
        assert_eq!(status, 204, "{text}");
    }
    // Another account sending the same uuids: its own events, delivered (one team cannot
    // suppress another's); sent twice, its repeat is counted past the label bound, under
    // "other".
    let again: Vec<String> = all[..5]
        .iter()
        .map(|u| visitor(&format!("x-{u}"), u, &[]))
        .collect();
    for _ in 0..2 {
        let (status, _, text) = post(&relay, &body("second-account", &again), &[]);
        assert_eq!(status, 204, "{text}");
    }
    until_empty(spool);
    let (_, metrics) = get(&relay.url("/metrics"));
    assert!(
        metrics.contains(r#"tributary_ingest_duplicate_events_total{account="other"} 5"#),
        "{metrics}"
    );
    assert!(!metrics.contains("second-account"), "{metrics}");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for u in delivered_uuids(&upstream.requests()) {
        *counts.entry(u).or_default() += 1;
    }
    for (i, u) in all.iter().enumerate() {
        // Account 1's once each, and the second account's once each.
        let expected = if i < 5 { 2 } else { 1 };
        assert_eq!(counts.get(u), Some(&expected), "{u}: {counts:?}");
    }
    assert_eq!(counts.len(), all.len(), "{counts:?}");
}

#[test]
fn a_flooding_account_gets_429_at_its_quota_while_another_is_accepted_and_delivered() {
    // The upstream is down until the end of the test.
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap();
    let limit: u64 = 20_000;
    let args = relay_args(
        &upstream.url(),
        spool,
        &["--max-pending-bytes-per-account", &limit.to_string()],
    );
    let relay = RelayProcess::serve(&args);

    let flood_uuids = uuids("flood", 400);
    let mut flood_accepted: Vec<String> = Vec::new();
    let mut refused = None;
    for (i, chunk) in flood_uuids.chunks(4).enumerate() {
        let visitors: Vec<String> = chunk
            .iter()
            .map(|u| visitor(&format!("f-{u}"), u, &[("country", r#""DE""#)]))
            .collect();
        let sent = body("flood", &visitors);
        let (status, headers, text) = post(&relay, &sent, &[]);
        match status {
            204 => flood_accepted.extend(chunk.iter().cloned()),
            429 => {
                refused = Some((
                    i,
                    header(&headers, "retry-after").map(str::to_owned),
                    text,
                    sent,
                ));
                break;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let (at, retry_after, text, sent) = refused.expect("the flooding account was never refused");
    assert!(at > 0, "refused before its quota was used: {text}");
    assert!(
        retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s > 0)),
        "{text}"
    );
    assert!(text.contains("max-pending-bytes-per-account"), "{text}");
    // Refused again while the outage lasts.
    assert_eq!(post(&relay, &sent, &[]).0, 429);

    // The other account is still accepted, every payload of it.
    let calm = uuids("calm", 30);
    for chunk in calm.chunks(3) {
        let visitors: Vec<String> = chunk
            .iter()
            .map(|u| visitor(&format!("c-{u}"), u, &[("country", r#""FR""#)]))
            .collect();
        let (status, _, text) = post(&relay, &body("calm", &visitors), &[]);
        assert_eq!(status, 204, "{text}");
    }
    let (_, metrics) = get(&relay.url("/metrics"));
    assert!(
        metrics.contains(r#"tributary_quota_refused_requests_total{account="flood"} 2"#),
        "{metrics}"
    );
    // The spool holds no more for the flood than its share (requests came one at a time,
    // so no two were admitted against the same figure), and its figure is what its rows
    // add up to.
    let db = rusqlite::Connection::open(dir.path().join("spool/spool.db")).unwrap();
    let flood_bytes: i64 = db
        .query_row(
            "SELECT pending_bytes FROM account_pending WHERE account = 'flood'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let counted: i64 = db
        .query_row(
            "SELECT SUM(bytes) FROM payloads WHERE CAST(header AS TEXT) LIKE '%\"account_id\":\"flood\"%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(flood_bytes, counted);
    assert!(flood_bytes as u64 <= limit, "{flood_bytes}");
    drop(db);

    // The outage ends: everything accepted, of both accounts, is delivered.
    upstream.set_script(Script::new().default_reply(Reply::status(204)));
    until_empty(spool);
    let delivered: std::collections::HashSet<String> =
        delivered_uuids(&upstream.requests()).into_iter().collect();
    for u in calm.iter().chain(&flood_accepted) {
        assert!(delivered.contains(u), "{u} was accepted but not delivered");
    }
    // And with its backlog gone, the flooding account is accepted again.
    let again = visitor("f-y", "flood-after", &[("country", r#""DE""#)]);
    assert_eq!(post(&relay, &body("flood", &[again]), &[]).0, 204);
}

#[test]
fn a_token_over_its_rate_gets_429_while_another_token_is_served() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap();
    // One request per 100 s after a burst of 3: the fourth in a row is over, whatever the
    // machine's speed.
    let args = relay_args(
        &upstream.url(),
        spool,
        &[
            "--auth-tokens",
            "noisy,quiet",
            "--token-rate-limit",
            "0.01",
            "--token-burst",
            "3",
        ],
    );
    let relay = RelayProcess::serve(&args);
    let all = uuids("rate", 5);
    for u in &all[..3] {
        let b = support::payload("1", std::slice::from_ref(u));
        assert_eq!(
            post(&relay, &b, &[("authorization", "Bearer noisy")]).0,
            204
        );
    }
    let b = support::payload("1", &all[3..4]);
    let (status, headers, text) = post(&relay, &b, &[("authorization", "Bearer noisy")]);
    assert_eq!(status, 429, "{text}");
    let wait: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&wait), "{wait}");
    let b = support::payload("1", &all[4..5]);
    assert_eq!(
        post(&relay, &b, &[("authorization", "Bearer quiet")]).0,
        204
    );
    let (_, metrics) = get(&relay.url("/metrics"));
    assert!(
        metrics.contains(r#"tributary_token_rate_limited_total{token="0"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("noisy"), "a token in the metrics");
}
