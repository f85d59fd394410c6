//! BatchEventProcessor with the real HttpDispatcher against a real HTTP server on loopback:
//! what a service linking the library sees on the wire.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary::retry::{Jitter, RetryPolicy};
use tributary::{BatchEventProcessor, HttpDispatcher, ProjectConfig, UserEvent, UserEventFactory};
use tributary_testkit::{RecordingUpstream, Reply, Script, delivered_uuids};

const WAIT: Duration = Duration::from_secs(20);
const NEVER: Duration = Duration::from_secs(3600);

fn factory() -> UserEventFactory {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/python-sdk-5.7.0/datafile.json"
    );
    let config = ProjectConfig::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    UserEventFactory::new(Arc::new(config))
}

fn conversions(f: &UserEventFactory, prefix: &str, n: usize) -> Vec<UserEvent> {
    let attrs = serde_json::Map::new();
    (0..n)
        .map(|i| {
            f.conversion(&format!("{prefix}-{i}"), &attrs, "purchase", None)
                .unwrap()
        })
        .collect()
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        total_budget: Duration::from_secs(5),
        jitter: Jitter::None,
        ..RetryPolicy::default()
    }
}

fn dispatcher(upstream: &RecordingUpstream) -> HttpDispatcher {
    HttpDispatcher::builder()
        .endpoint(upstream.url())
        .retry(quick_retries())
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[test]
fn batches_arrive_over_http_and_close_sends_the_rest() {
    let upstream = RecordingUpstream::start();
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher(&upstream))
        .batch_size(5)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    let events = conversions(&factory(), "u", 12);
    let want: HashSet<String> = events.iter().map(|e| e.uuid.to_string()).collect();
    for e in events {
        processor.process(e).unwrap();
    }
    // Two full batches go out on their own; the last two events wait for close().
    assert!(upstream.wait_for(|r| r.len() >= 2, WAIT));
    let report = processor.close();
    assert_eq!(report.dispatched, 12);
    assert_eq!(
        report.failed + report.dropped + report.pending_at_timeout,
        0
    );

    let requests = upstream.requests();
    let sizes: Vec<usize> = requests.iter().map(|r| r.event_uuids().len()).collect();
    assert_eq!(sizes, [5, 5, 2]);
    for r in &requests {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let got: HashSet<String> = delivered_uuids(&requests).into_iter().collect();
    assert_eq!(got, want);
}

#[test]
fn a_503_is_retried_and_counted_once() {
    let upstream = RecordingUpstream::start_with(Script::new().then_n(2, Reply::status(503)));
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher(&upstream))
        .batch_size(3)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    for e in conversions(&factory(), "r", 3) {
        processor.process(e).unwrap();
    }
    let report = processor.close();
    assert_eq!(report.dispatched, 3);
    assert_eq!(report.failed, 0);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "two 503s then a 204");
    assert_eq!(delivered_uuids(&requests).len(), 3);
}

#[test]
fn a_rejected_visitor_is_isolated_and_counted_as_failed() {
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_containing("\"bad-user\"", Reply::status(400)),
    );
    let f = factory();
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher(&upstream))
        .batch_size(8)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    let mut events = conversions(&f, "ok", 7);
    events.insert(
        3,
        f.conversion("bad-user", serde_json::Map::new(), "purchase", None)
            .unwrap(),
    );
    for e in events {
        processor.process(e).unwrap();
    }
    let report = processor.close();
    assert_eq!(report.dispatched, 7);
    assert_eq!(report.failed, 1);
    assert_eq!(delivered_uuids(&upstream.requests()).len(), 7);
}

#[test]
fn close_is_bounded_when_the_server_hangs() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::hang()));
    let processor = BatchEventProcessor::builder()
        .dispatcher(
            HttpDispatcher::builder()
                .endpoint(upstream.url())
                .request_timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        )
        .batch_size(2)
        .flush_interval(NEVER)
        .close_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    for e in conversions(&factory(), "h", 4) {
        processor.process(e).unwrap();
    }
    assert!(upstream.wait_for(|r| !r.is_empty(), WAIT));
    let started = Instant::now();
    let report = processor.close();
    // The close timeout, plus scheduling slack on a loaded machine; far below the 30 s
    // request timeout the dispatcher would otherwise wait.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The HTTP dispatcher gives up at the close deadline (a little before the timeout), so
    // nothing is left pending: all four are reported failed, with the reason.
    assert_eq!(report.dispatched, 0);
    assert_eq!(
        (report.failed, report.pending_at_timeout),
        (4, 0),
        "{report}"
    );
    let last = report.last_error.as_deref().unwrap_or_default();
    assert!(last.contains("close deadline"), "{last}");
}
