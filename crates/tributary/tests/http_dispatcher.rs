//! The HTTP dispatcher against a real HTTP server on loopback (`RecordingUpstream`): what it
//! retries, how long it waits, what it isolates, and what goes over the wire.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary::dispatcher::http::{HttpDispatcherBuilder, RejectedVisitors};
use tributary::retry::Jitter;
use tributary::{
    DispatchError, EventDispatcher, HttpConfig, HttpDispatcher, HttpTransport, LogEvent, RawBatch,
    RetryPolicy,
};
use tributary_testkit::{Answer, RecordingUpstream, Reply, Script, delivered_uuids};

const POISON: &str = "POISON";

/// A LogEvent to `url` with `n` visitors `v{i}`, each with one event `uuid-{i}`; visitors
/// in `poison` carry a marker the upstream can be told to refuse.
fn log_event(url: &str, n: usize, poison: &[usize]) -> LogEvent {
    let visitors = (0..n)
        .map(|i| {
            let key = if poison.contains(&i) { POISON } else { "purchase" };
            Bytes::from(format!(
                r#"{{"visitor_id":"v{i}","attributes":[],"snapshots":[{{"decisions":[],"events":[{{"entity_id":"1","key":"{key}","timestamp":1,"uuid":"uuid-{i}"}}]}}]}}"#
            ))
        })
        .collect();
    let header = Bytes::from_static(
        br#""account_id":"12133785640","project_id":"21537940595","revision":"131""#,
    );
    LogEvent::new(url, RawBatch::from_parts(header, visitors))
}

/// Fast, deterministic retries: 20 ms, 40 ms, ... up to 5 attempts within 5 s.
fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        multiplier: 2.0,
        total_budget: Duration::from_secs(5),
        jitter: Jitter::None,
    }
}

fn builder() -> HttpDispatcherBuilder {
    HttpDispatcher::builder()
        .retry(fast_retry())
        .request_timeout(Duration::from_secs(2))
}

type Rejections = Arc<Mutex<Vec<RejectedVisitors>>>;

fn with_hook(b: HttpDispatcherBuilder) -> (HttpDispatcherBuilder, Rejections) {
    let seen: Rejections = Arc::default();
    let sink = Arc::clone(&seen);
    let b = b.on_rejected(move |r| sink.lock().unwrap().push(r.clone()));
    (b, seen)
}

fn answers(upstream: &RecordingUpstream) -> Vec<Answer> {
    upstream.requests().iter().map(|r| r.answer).collect()
}

#[test]
fn any_2xx_is_success_and_the_body_goes_out_as_built() {
    for status in [200, 202, 204] {
        let upstream =
            RecordingUpstream::start_with(Script::new().default_reply(Reply::status(status)));
        let d = builder().build().unwrap();
        let ev = log_event(&upstream.url(), 3, &[]);
        assert_eq!(d.dispatch(&ev), Ok(()), "status {status}");
        let reqs = upstream.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].method, "POST");
        assert_eq!(reqs[0].path, "/v1/events");
        assert_eq!(reqs[0].header("content-type"), Some("application/json"));
        assert_eq!(reqs[0].header("content-encoding"), None);
        assert_eq!(reqs[0].body, ev.body());
        assert_eq!(d.stats().requests, 1);
        assert_eq!(d.stats().retries, 0);
    }
}

#[test]
fn server_errors_408_and_429_are_retried_until_success() {
    let upstream = RecordingUpstream::start_with(
        Script::new()
            .then(Reply::status(500))
            .then(Reply::status(503).body("busy"))
            .then(Reply::status(408))
            .then(Reply::status(429)),
    );
    let d = builder().build().unwrap();
    let ev = log_event(&upstream.url(), 2, &[]);
    assert_eq!(d.dispatch(&ev), Ok(()));
    assert_eq!(
        answers(&upstream),
        [500, 503, 408, 429, 204].map(Answer::Status)
    );
    assert!(upstream.requests().iter().all(|r| r.body == ev.body()));
    assert_eq!(d.stats().retries, 4);
    // Backoff without jitter: 20 + 40 + 80 + 160 ms at least between first and last.
    let reqs = upstream.requests();
    let spread = reqs[4].received_at - reqs[0].received_at;
    assert!(spread >= Duration::from_millis(300), "{spread:?}");
}

#[test]
fn retries_stop_at_max_attempts_with_a_transient_error() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(502)));
    let d = builder()
        .retry(RetryPolicy {
            max_attempts: 3,
            ..fast_retry()
        })
        .build()
        .unwrap();
    let err = d.dispatch(&log_event(&upstream.url(), 1, &[])).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("502"), "{err}");
    assert_eq!(upstream.request_count(), 3);
}

#[test]
fn total_budget_bounds_a_delivery() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(503)));
    let d = builder()
        .retry(RetryPolicy {
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(50),
            total_budget: Duration::from_millis(600),
            ..fast_retry()
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let err = d.dispatch(&log_event(&upstream.url(), 1, &[])).unwrap_err();
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        (2..20).contains(&upstream.request_count()),
        "{}",
        upstream.request_count()
    );
}

#[test]
fn connection_refused_is_retried_then_reported_transient() {
    // A port that was just free and is now closed: connecting is refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let d = builder()
        .retry(RetryPolicy {
            max_attempts: 3,
            ..fast_retry()
        })
        .build()
        .unwrap();
    let err = d
        .dispatch(&log_event(&format!("http://{addr}/v1/events"), 1, &[]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DispatchError::Transient {
                retry_after: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(d.stats().requests, 3);
    assert_eq!(d.stats().retries, 2);
}

#[test]
fn connection_reset_is_retried() {
    let upstream =
        RecordingUpstream::start_with(Script::new().then(Reply::reset()).then(Reply::reset()));
    let d = builder().build().unwrap();
    let ev = log_event(&upstream.url(), 2, &[]);
    assert_eq!(d.dispatch(&ev), Ok(()));
    assert_eq!(
        answers(&upstream),
        [Answer::Reset, Answer::Reset, Answer::Status(204)]
    );
    assert_eq!(delivered_uuids(&upstream.requests()), ["uuid-0", "uuid-1"]);
}

#[test]
fn a_reset_is_a_connection_error_not_a_response() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::reset()));
    let d = builder()
        .retry(RetryPolicy {
            max_attempts: 2,
            ..fast_retry()
        })
        .build()
        .unwrap();
    let err = d.dispatch(&log_event(&upstream.url(), 1, &[])).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(!err.to_string().contains("HTTP"), "{err}");
    assert_eq!(upstream.request_count(), 2);
}

#[test]
fn a_hung_request_times_out_and_is_retried() {
    let upstream = RecordingUpstream::start_with(Script::new().then(Reply::hang()));
    let d = builder()
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    assert_eq!(d.dispatch(&log_event(&upstream.url(), 1, &[])), Ok(()));
    assert_eq!(answers(&upstream), [Answer::Hung, Answer::Status(204)]);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn requests_that_always_hang_give_up_within_the_policy() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::hang()));
    let d = builder()
        .request_timeout(Duration::from_millis(200))
        .retry(RetryPolicy {
            max_attempts: 2,
            ..fast_retry()
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let err = d.dispatch(&log_event(&upstream.url(), 1, &[])).unwrap_err();
    let took = started.elapsed();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(upstream.request_count(), 2);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn retry_after_seconds_is_honoured() {
    let upstream =
        RecordingUpstream::start_with(Script::new().then(Reply::status(503).retry_after("1")));
    let d = builder().build().unwrap();
    assert_eq!(d.dispatch(&log_event(&upstream.url(), 1, &[])), Ok(()));
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 2);
    // The backoff alone would be 20 ms: the second attempt waited for the server.
    let gap = reqs[1].received_at - reqs[0].received_at;
    assert!(gap >= Duration::from_secs(1), "{gap:?}");
}

#[test]
fn retry_after_beyond_the_budget_gives_up_and_reports_it() {
    let upstream = RecordingUpstream::start_with(
        Script::new().default_reply(Reply::status(429).retry_after("30")),
    );
    let d = builder().build().unwrap();
    let started = Instant::now();
    let err = d.dispatch(&log_event(&upstream.url(), 1, &[])).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(upstream.request_count(), 1);
    match err {
        DispatchError::Transient { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(30)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_400_on_one_visitor_is_permanent_and_not_retried() {
    let upstream = RecordingUpstream::start_with(
        Script::new().default_reply(Reply::status(400).body("invalid visitor")),
    );
    let (b, seen) = with_hook(builder());
    let d = b.build().unwrap();
    let err = d.dispatch(&log_event(&upstream.url(), 1, &[])).unwrap_err();
    match &err {
        DispatchError::Permanent { status, message } => {
            assert_eq!(*status, 400);
            assert!(message.contains("invalid visitor"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(d.stats().retries, 0);
    assert_eq!(d.stats().rejected_visitors, 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].visitors[0].index, 0);
}

#[test]
fn a_400_batch_is_bisected_to_the_poison_visitors() {
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_containing(POISON, Reply::status(400).body("bad event key")),
    );
    let (b, seen) = with_hook(builder());
    let d = b.build().unwrap();
    let ev = log_event(&upstream.url(), 16, &[3, 11]);
    let err = d.dispatch(&ev).unwrap_err();
    assert_eq!(
        err,
        DispatchError::PartiallyRejected {
            rejected: 2,
            total: 16,
            status: 400
        }
    );
    assert_eq!(err.delivered_of(16), 14);

    // The 14 good visitors were delivered exactly once each.
    let mut delivered = delivered_uuids(&upstream.requests());
    delivered.sort();
    let mut expected: Vec<String> = (0..16)
        .filter(|i| *i != 3 && *i != 11)
        .map(|i| format!("uuid-{i}"))
        .collect();
    expected.sort();
    assert_eq!(delivered, expected);

    // The hook saw exactly the poison visitors, with their bytes and the header.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.total, 16);
    assert_eq!(r.header, ev.batch().header());
    let indexes: Vec<usize> = r.visitors.iter().map(|v| v.index).collect();
    assert_eq!(indexes, [3, 11]);
    for v in &r.visitors {
        assert_eq!(v.status, 400);
        assert!(v.message.contains("bad event key"));
        assert_eq!(v.visitor, ev.batch().visitors()[v.index]);
    }
    assert_eq!(d.stats().rejected_visitors, 2);
    // Bounded: 1 + 2·k·log2(n) = 17 at most.
    assert!(
        upstream.request_count() <= 17,
        "{}",
        upstream.request_count()
    );
}

#[test]
fn a_spent_isolation_budget_reports_the_rest_undelivered_never_rejected() {
    let upstream = RecordingUpstream::start_with(
        Script::new().reject_containing(POISON, Reply::status(400).body("bad event key")),
    );
    let (b, seen) = with_hook(builder().isolation_budget(3));
    let d = b.build().unwrap();
    let ev = log_event(&upstream.url(), 16, &[1, 6, 9, 14]);
    let err = d.dispatch(&ev).unwrap_err();
    let DispatchError::Incomplete {
        delivered,
        rejected,
        undelivered,
        total,
        ..
    } = err.clone()
    else {
        panic!("{err:?}");
    };
    assert_eq!(total, 16);
    assert_eq!(delivered + rejected + undelivered, 16);
    assert!(undelivered > 0, "{err}");
    assert_eq!(err.delivered_of(16), delivered);
    assert_eq!(
        upstream.request_count(),
        4,
        "the whole, then the budget of 3"
    );
    // Whatever the hook was told was refused was sent alone and refused.
    let alone: Vec<Vec<String>> = upstream
        .requests()
        .iter()
        .filter(|r| !r.is_success())
        .map(|r| r.event_uuids())
        .filter(|u| u.len() == 1)
        .collect();
    let seen = seen.lock().unwrap();
    let told: usize = seen.iter().map(|r| r.visitors.len()).sum();
    assert_eq!(told, rejected);
    for r in seen.iter() {
        for v in &r.visitors {
            assert!(alone.contains(&vec![format!("uuid-{}", v.index)]), "{v:?}");
        }
    }
}

#[test]
fn a_batch_of_only_poison_is_permanent() {
    let upstream =
        RecordingUpstream::start_with(Script::new().reject_containing(POISON, Reply::status(400)));
    let d = builder().build().unwrap();
    let err = d
        .dispatch(&log_event(&upstream.url(), 4, &[0, 1, 2, 3]))
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Permanent { status: 400, .. }),
        "{err:?}"
    );
    assert!(delivered_uuids(&upstream.requests()).is_empty());
}

#[test]
fn a_401_is_not_bisected() {
    let upstream = RecordingUpstream::start_with(Script::new().default_reply(Reply::status(401)));
    let (b, seen) = with_hook(builder());
    let d = b.build().unwrap();
    let err = d
        .dispatch(&log_event(&upstream.url(), 16, &[]))
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Permanent { status: 401, .. }),
        "{err:?}"
    );
    assert_eq!(upstream.request_count(), 1);
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(d.stats().rejected_visitors, 0);
}

#[test]
fn gzip_bodies_decode_to_the_same_json() {
    let upstream = RecordingUpstream::start();
    let d = builder().gzip(true).build().unwrap();
    let ev = log_event(&upstream.url(), 50, &[]);
    assert_eq!(d.dispatch(&ev), Ok(()));
    let req = &upstream.requests()[0];
    assert_eq!(req.header("content-encoding"), Some("gzip"));
    assert_eq!(&req.raw_body[..2], &[0x1f, 0x8b]);
    assert!(req.raw_body.len() < req.body.len());
    assert_eq!(req.body, ev.body());
}

#[test]
fn custom_endpoint_and_headers_are_used() {
    let upstream = RecordingUpstream::start();
    let d = builder()
        .endpoint(format!(
            "{}/relay/v1/events?tenant=shop",
            upstream.base_url()
        ))
        .header("Authorization", "Bearer secret-token")
        .header("X-Relay-Route", "eu")
        .user_agent("checkout-service/2.1")
        .build()
        .unwrap();
    // The LogEvent names the real Event API: the override must win.
    let ev = log_event("https://logx.optimizely.com/v1/events", 1, &[]);
    assert_eq!(d.dispatch(&ev), Ok(()));
    let req = &upstream.requests()[0];
    assert_eq!(req.path, "/relay/v1/events?tenant=shop");
    assert_eq!(req.header("authorization"), Some("Bearer secret-token"));
    assert_eq!(req.header("x-relay-route"), Some("eu"));
    assert_eq!(req.header("user-agent"), Some("checkout-service/2.1"));
    assert_eq!(req.header("content-type"), Some("application/json"));
}

#[test]
fn sequential_dispatches_reuse_one_connection() {
    let upstream = RecordingUpstream::start();
    let d = builder().build().unwrap();
    for _ in 0..20 {
        assert_eq!(d.dispatch(&log_event(&upstream.url(), 1, &[])), Ok(()));
    }
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 20);
    assert_eq!(upstream.connections_accepted(), 1);
    assert!(reqs.iter().all(|r| r.connection == reqs[0].connection));
}

#[test]
fn a_seeded_failure_rate_is_ridden_out_and_every_event_lands_once() {
    let upstream =
        RecordingUpstream::start_with(Script::new().fail_rate(30, 11, Reply::status(503)));
    let d = builder()
        .retry(RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            ..fast_retry()
        })
        .build()
        .unwrap();
    let mut expected = Vec::new();
    for i in 0..20 {
        let ev = log_event(&upstream.url(), 1, &[]);
        let ev = LogEvent::new(
            ev.url.clone(),
            RawBatch::from_parts(
                ev.batch().header().clone(),
                vec![Bytes::from(format!(
                    r#"{{"visitor_id":"v","snapshots":[{{"events":[{{"uuid":"e{i}"}}]}}]}}"#
                ))],
            ),
        );
        expected.push(format!("e{i}"));
        assert_eq!(d.dispatch(&ev), Ok(()));
    }
    assert!(upstream.request_count() > 20, "the script failed nothing");
    assert_eq!(delivered_uuids(&upstream.requests()), expected);
}

#[tokio::test(flavor = "current_thread")]
async fn built_used_and_dropped_inside_a_current_thread_runtime() {
    let upstream = RecordingUpstream::start();
    let d = builder().build().unwrap();
    assert_eq!(d.dispatch(&log_event(&upstream.url(), 2, &[])), Ok(()));
    drop(d);
    assert!(
        upstream
            .wait_for_async(|r| r.len() == 1, Duration::from_secs(1))
            .await
    );
}

#[test]
fn built_outside_and_dropped_inside_a_runtime() {
    let upstream = RecordingUpstream::start();
    let d = builder().build().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = upstream.url();
    let result = rt.block_on(async move {
        let r = d.dispatch(&log_event(&url, 1, &[]));
        drop(d);
        r
    });
    assert_eq!(result, Ok(()));
}

#[tokio::test]
async fn the_transport_serves_concurrent_async_callers() {
    let upstream = RecordingUpstream::start_with(Script::new().then(Reply::status(503)));
    let transport = HttpTransport::new(&HttpConfig {
        retry: fast_retry(),
        ..HttpConfig::default()
    })
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let t = transport.clone();
        let url = upstream.url();
        let body = log_event(&url, i + 1, &[]).body().clone();
        tasks.spawn(async move { t.send(&url, body).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap(), Ok(()));
    }
    assert_eq!(upstream.request_count(), 9);
    assert_eq!(transport.stats().retries, 1);
}

#[tokio::test]
async fn deliver_bisecting_reports_per_visitor_outcomes() {
    let upstream =
        RecordingUpstream::start_with(Script::new().reject_containing(POISON, Reply::status(422)));
    let transport = HttpTransport::new(&HttpConfig {
        retry: fast_retry(),
        ..HttpConfig::default()
    })
    .unwrap();
    let ev = log_event(&upstream.url(), 5, &[4]);
    let out = transport
        .deliver_bisecting(&upstream.url(), ev.batch())
        .await;
    assert_eq!(out.delivered_count(), 4);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, 4);
    assert_eq!(out.rejected[0].status, 422);
    assert!(out.undelivered.is_none());
    assert_eq!(out.requests, upstream.request_count());
}
