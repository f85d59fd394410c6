//! A refused event never takes good events with it: the official Python SDK sends through
//! `tributary serve` to an upstream that refuses, with 400, every request holding an event
//! whose uuid starts with a prefix (the way the Event API refuses a whole request for one
//! bad event). Every other event must arrive exactly once, the dead letters must hold exactly
//! the refused events, each alone, and the upstream requests must stay within the bound
//! documented in docs/relay.md.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::{RelayProcess, audit_balances, dead_letters, get, metric, python_sdk_events};
use tributary_testkit::{RecordingUpstream, Reply, Script, delivered_uuids, event_uuids};

const WAIT: Duration = Duration::from_secs(120);

/// What one poisoned run showed.
struct Run {
    good: usize,
    bad: usize,
    requests: usize,
    isolation_requests: f64,
}

/// Runs `users` SDK users (two events each, payloads of 10) through a relay whose upstream
/// refuses uuids starting with `prefix`, with `extra` relay flags; checks every promise
/// and returns the counts.
fn poisoned_run(prefix: &str, users: usize, extra: &[&str]) -> Run {
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_uuid_prefix(prefix, Reply::status(400).body("invalid event")),
    );
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool = spool.to_str().unwrap().to_owned();
    let mut args: Vec<String> = [
        "--upstream",
        &upstream.url(),
        "--spool",
        &spool,
        "--flush-interval",
        "200ms",
        "--max-retry-delay",
        "200ms",
        "--spool-sync",
        "normal",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let relay = RelayProcess::serve(&args);

    let acked = python_sdk_events(&relay.url(""), users, Some(10));
    assert_eq!(acked.len(), users * 2, "the SDK got every event through");
    let (bad, good): (Vec<&String>, Vec<&String>) =
        acked.iter().partition(|u| u.starts_with(prefix));
    assert!(
        !bad.is_empty() && !good.is_empty(),
        "pick a prefix that poisons some"
    );

    // Wait until every good event is delivered and every bad one is a dead letter.
    let settled = || {
        let (_, m) = get(&relay.url("/metrics"));
        metric(&m, "tributary_spool_pending_events") == 0.0
            && delivered_uuids(&upstream.requests()).len() >= good.len()
    };
    assert!(
        support::wait_until(WAIT, settled),
        "not settled:\n{}",
        relay.log_text()
    );

    // Every good event exactly once; no bad one ever accepted upstream.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for u in delivered_uuids(&upstream.requests()) {
        *counts.entry(u).or_default() += 1;
    }
    for u in &good {
        assert_eq!(
            counts.get(*u),
            Some(&1),
            "good event {u} delivered {:?} times",
            counts.get(*u)
        );
    }
    assert_eq!(counts.len(), good.len(), "only good events were delivered");

    // The dead letters hold exactly the bad events, each alone, each refused alone.
    let dead = dead_letters(&spool);
    let mut dead_uuids = HashSet::new();
    for d in &dead {
        assert_eq!(d["events"], 1, "a dead letter holds one visitor: {d}");
        assert!(
            d["reason"].as_str().unwrap()
                == "refused alone by the upstream: HTTP 400 Bad Request: invalid event",
            "{d}"
        );
        let body = d["body"].to_string();
        let uuids = event_uuids(body.as_bytes());
        assert_eq!(uuids.len(), 1);
        dead_uuids.insert(uuids[0].clone());
    }
    let want: HashSet<String> = bad.iter().map(|s| (*s).clone()).collect();
    assert_eq!(
        dead_uuids, want,
        "dead letters are exactly the refused events"
    );
    // Each dead letter keeps its client's header.
    for d in &dead {
        assert_eq!(d["body"]["client_name"], "python-sdk");
        assert_eq!(d["body"]["revision"], "131");
    }
    // Each was sent alone before it was judged.
    let alone: HashSet<String> = upstream
        .requests()
        .iter()
        .filter(|r| !r.is_success())
        .filter_map(|r| {
            let u = r.event_uuids();
            (u.len() == 1).then(|| u[0].clone())
        })
        .collect();
    assert!(want.is_subset(&alone), "a dead letter was never sent alone");

    let audit = audit_balances(&spool);
    assert_eq!(audit["totals"]["events"]["dead"], bad.len());
    assert_eq!(audit["totals"]["events"]["delivered"], good.len());
    assert_eq!(audit["totals"]["events"]["accepted"], acked.len());

    let (_, m) = get(&relay.url("/metrics"));
    Run {
        good: good.len(),
        bad: bad.len(),
        requests: upstream.request_count(),
        isolation_requests: metric(&m, "tributary_isolation_requests_total"),
    }
}

/// `⌈log2 n⌉`.
fn log2_ceil(n: usize) -> usize {
    (usize::BITS - n.max(2).saturating_sub(1).leading_zeros()) as usize
}

/// The documented bound: isolation spends at most `2·⌈log2 n⌉` requests per refused event,
/// `n` being the largest batch (`--max-batch-events`, 10,000 by default).
fn check_bound(run: &Run, max_batch_events: usize) {
    let bound = 2 * run.bad * log2_ceil(max_batch_events);
    assert!(
        run.isolation_requests <= bound as f64,
        "{} isolation requests for {} refused events, bound {bound}",
        run.isolation_requests,
        run.bad
    );
    // And the first sends stay few: merging still works under poison.
    let first_sends = run.requests - run.isolation_requests as usize;
    assert!(
        first_sends * 10 <= run.good + run.bad,
        "{first_sends} first sends for {} events",
        run.good + run.bad
    );
}

#[test]
fn one_event_in_256_refused_costs_only_that_event() {
    let run = poisoned_run("00", 5000, &[]);
    eprintln!(
        "1/256: {} good, {} bad, {} upstream requests ({} isolation)",
        run.good, run.bad, run.requests, run.isolation_requests
    );
    check_bound(&run, 10_000);
}

#[test]
fn one_event_in_16_refused_costs_only_those_events() {
    let run = poisoned_run("0", 2000, &[]);
    eprintln!(
        "1/16: {} good, {} bad, {} upstream requests ({} isolation)",
        run.good, run.bad, run.requests, run.isolation_requests
    );
    check_bound(&run, 10_000);
}

#[test]
fn a_spent_isolation_budget_dead_letters_nothing_unjudged() {
    // Thirty isolation requests a cycle (the least allowed is 28, one descent through a
    // batch of 10,000): the search is cut short again and again, and what is left goes back
    // to the spool, never to the dead letters.
    let run = poisoned_run("0", 200, &["--isolation-budget", "30"]);
    eprintln!(
        "budget 30, 1/16: {} good, {} bad, {} upstream requests ({} isolation)",
        run.good, run.bad, run.requests, run.isolation_requests
    );
    assert!(run.isolation_requests >= 30.0);
}
