//! The processor against an upstream 50 ms away (real loopback HTTP through
//! `RecordingUpstream`): bursts, sustained load, exit with the upstream down, and the async
//! close on a current-thread runtime. Waits are on conditions (the upstream's records, the
//! close report), never on sleeps; the only time bounds asserted are the close timeout
//! (plus a margin) the processor promises.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary::{
    BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher, HttpDispatcher,
    LogEvent, ProcessError, UserEvent, UserEventKind,
};
use tributary_testkit::{RecordingUpstream, Reply, Script, delivered_uuids, event_uuids};

const LATENCY: Duration = Duration::from_millis(50);
/// What the processor's docs promise for sustained load at 50 ms.
const DOCUMENTED_RATE_AT_50MS: u64 = 3_000;
/// Slack over the close timeout for the close call's own bookkeeping and a loaded CI host.
const CLOSE_MARGIN: Duration = Duration::from_millis(1500);

fn slow_upstream() -> RecordingUpstream {
    RecordingUpstream::start_with(Script::new().default_reply(Reply::no_content().delay(LATENCY)))
}

fn context() -> Arc<EventContext> {
    Arc::new(EventContext::new("1001", "2002", "42"))
}

fn event(ctx: &Arc<EventContext>, i: u64) -> UserEvent {
    UserEvent::new(
        ctx.clone(),
        format!("user-{i}"),
        vec![],
        UserEventKind::Conversion(Conversion {
            event_id: "7".into(),
            event_key: "purchase".into(),
            revenue: None,
            value: None,
            tags: None,
        }),
    )
}

/// How often each uuid was accepted by the upstream.
fn delivered_counts(upstream: &RecordingUpstream) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for uuid in delivered_uuids(&upstream.requests()) {
        *counts.entry(uuid).or_insert(0) += 1;
    }
    counts
}

fn assert_exactly_once(upstream: &RecordingUpstream, sent: &[tributary::CompactString]) {
    let counts = delivered_counts(upstream);
    assert_eq!(counts.len(), sent.len(), "distinct uuids delivered");
    for uuid in sent {
        assert_eq!(
            counts.get(uuid.as_str()),
            Some(&1),
            "uuid {uuid} delivered once"
        );
    }
}

#[test]
fn a_burst_of_10000_with_the_defaults_loses_nothing_and_close_delivers_it_all() {
    let upstream = slow_upstream();
    let dispatcher = HttpDispatcher::builder()
        .endpoint(upstream.url())
        .build()
        .unwrap();
    // Only the dispatcher is set: every other setting is the default.
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .build()
        .unwrap();
    let ctx = context();
    let mut sent = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let ev = event(&ctx, i);
        sent.push(ev.uuid.clone());
        processor.process(ev).unwrap();
    }
    let report = processor.close();
    assert!(report.is_complete(), "{report}");
    assert_eq!(
        (report.accepted, report.dispatched, report.dropped),
        (10_000, 10_000, 0)
    );
    assert!(!report.timed_out);
    // Every request was settled before close returned, so the upstream has them all.
    assert_exactly_once(&upstream, &sent);
    let stats = processor.stats();
    assert_eq!(stats.batches as usize, upstream.request_count());
    eprintln!("burst: {report}");
}

#[test]
fn sustained_load_at_the_documented_rate_drops_nothing() {
    let upstream = slow_upstream();
    let dispatcher = HttpDispatcher::builder()
        .endpoint(upstream.url())
        .build()
        .unwrap();
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .build()
        .unwrap();
    let ctx = context();
    // Four seconds at the documented rate: 12,000 events, more than the 10,000-event queue
    // holds, so the dispatch stage must keep up for none to be refused. Paced by the
    // clock: event i is offered no earlier than i / rate seconds after the start.
    let total = DOCUMENTED_RATE_AT_50MS * 4;
    let start = Instant::now();
    let mut sent = Vec::with_capacity(total as usize);
    let mut refused = 0u64;
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / DOCUMENTED_RATE_AT_50MS as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let ev = event(&ctx, i);
        let uuid = ev.uuid.clone();
        match processor.process(ev) {
            Ok(()) => sent.push(uuid),
            Err(ProcessError::QueueFull) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let offered_for = start.elapsed();
    let report = processor.close();
    eprintln!(
        "sustained: {total} events offered in {:.2} s; {report}",
        offered_for.as_secs_f64()
    );
    assert_eq!(refused, 0, "{report}");
    assert!(report.is_complete(), "{report}");
    assert_exactly_once(&upstream, &sent);
}

#[test]
fn close_with_the_upstream_down_returns_in_time_with_an_exact_report() {
    for (name, reply) in [
        ("503", Reply::status(503).delay(LATENCY)),
        ("hang", Reply::hang()),
    ] {
        let upstream = RecordingUpstream::start_with(Script::new().default_reply(reply));
        let dispatcher = HttpDispatcher::builder()
            .endpoint(upstream.url())
            .build()
            .unwrap();
        let timeout = Duration::from_secs(2);
        let processor = BatchEventProcessor::builder()
            .dispatcher(dispatcher)
            .close_timeout(timeout)
            .build()
            .unwrap();
        let ctx = context();
        for i in 0..1_000 {
            processor.process(event(&ctx, i)).unwrap();
        }
        let began = Instant::now();
        let report = processor.close();
        let took = began.elapsed();
        eprintln!("{name}: {report}");
        assert!(took < timeout + CLOSE_MARGIN, "{name}: close took {took:?}");
        // Nothing got through, and the dispatcher gave up by the close deadline, so every
        // accepted event is accounted for as failed, none left pending.
        assert_eq!(report.accepted, 1_000, "{name}");
        assert_eq!(report.dispatched, 0, "{name}");
        assert!(upstream.requests().iter().all(|r| !r.is_success()));
        assert_eq!(report.undelivered(), 1_000, "{name}: {report}");
        assert_eq!(
            (report.failed, report.pending_at_timeout),
            (1_000, 0),
            "{name}"
        );
        assert!(!report.timed_out, "{name}");
        let last = report.last_error.clone().unwrap();
        assert!(last.contains("close deadline"), "{name}: {last}");
        let text = report.to_string();
        assert!(
            text.contains("0 of 1000 accepted events delivered, 1000 not delivered (1000 failed, 0 still pending at the close timeout)"),
            "{name}: {text}"
        );
        assert!(text.contains("last error: "), "{name}: {text}");
        if name == "503" {
            // The upstream's answer is named, whichever request failed last: one cut
            // mid-retry names its 503, one never sent names the last failure seen (a 503,
            // or an attempt left unanswered at the deadline).
            assert!(
                text.contains("503") || text.contains("no answer by the close deadline"),
                "{text}"
            );
        }
    }
}

#[test]
fn a_dispatcher_that_ignores_the_deadline_is_reported_pending() {
    /// Blocks until released: the close deadline does not reach it.
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>);
    impl EventDispatcher for Stuck {
        fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> {
            let (lock, cv) = &*self.0;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
            Ok(())
        }
    }
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let timeout = Duration::from_millis(300);
    let processor = BatchEventProcessor::builder()
        .dispatcher(Stuck(gate.clone()))
        .close_timeout(timeout)
        .build()
        .unwrap();
    let ctx = context();
    for i in 0..25 {
        processor.process(event(&ctx, i)).unwrap();
    }
    let began = Instant::now();
    let report = processor.close();
    assert!(began.elapsed() < timeout + CLOSE_MARGIN);
    assert!(report.timed_out);
    assert_eq!((report.dispatched, report.pending_at_timeout), (0, 25));
    assert!(
        report
            .to_string()
            .contains("25 still pending at the close timeout"),
        "{report}"
    );
    let (lock, cv) = &*gate;
    *lock.lock().unwrap() = true;
    cv.notify_all();
}

#[test]
fn process_timeout_waits_for_room_instead_of_refusing() {
    let upstream = slow_upstream();
    let dispatcher = HttpDispatcher::builder()
        .endpoint(upstream.url())
        .build()
        .unwrap();
    // A tiny queue and one request at a time: process() would refuse most of these.
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .queue_capacity(10)
        .dispatch_concurrency(1)
        .max_pending_batches(1)
        .build()
        .unwrap();
    let ctx = context();
    let mut sent = Vec::new();
    for i in 0..300 {
        let ev = event(&ctx, i);
        sent.push(ev.uuid.clone());
        processor
            .process_timeout(ev, Duration::from_secs(30))
            .unwrap();
    }
    let report = processor.close();
    assert!(report.is_complete(), "{report}");
    assert_exactly_once(&upstream, &sent);
}

#[test]
fn process_timeout_gives_up_with_queue_full() {
    struct Never;
    impl EventDispatcher for Never {
        fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> {
            Ok(())
        }
    }
    // Not started: nothing drains the queue.
    let processor = BatchEventProcessor::builder()
        .dispatcher(Never)
        .queue_capacity(2)
        .start_on_init(false)
        .build()
        .unwrap();
    let ctx = context();
    processor.process(event(&ctx, 0)).unwrap();
    processor.process(event(&ctx, 1)).unwrap();
    let began = Instant::now();
    let e = processor
        .process_timeout(event(&ctx, 2), Duration::from_millis(100))
        .unwrap_err();
    assert_eq!(e, ProcessError::QueueFull);
    assert!(began.elapsed() >= Duration::from_millis(100));
    assert_eq!(processor.stats().dropped_queue_full, 1);
    let report = processor.close();
    assert_eq!((report.dispatched, report.dropped), (2, 1));
}

#[test]
fn flush_and_wait_covers_every_request_in_flight() {
    let upstream = slow_upstream();
    let dispatcher = HttpDispatcher::builder()
        .endpoint(upstream.url())
        .build()
        .unwrap();
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .build()
        .unwrap();
    let ctx = context();
    let mut sent = Vec::new();
    for i in 0..505 {
        let ev = event(&ctx, i);
        sent.push(ev.uuid.clone());
        processor.process(ev).unwrap();
    }
    assert!(processor.flush_and_wait(Duration::from_secs(30)));
    // The ack means every event batched before it returned: all 505 are upstream now.
    assert_exactly_once(&upstream, &sent);
    assert_eq!(processor.stats().events_dispatched, 505);
    assert!(processor.close().is_complete());
}

#[test]
fn log_event_listeners_are_called_once_per_request() {
    let upstream = slow_upstream();
    let center = Arc::new(tributary::notification::NotificationCenter::new());
    let seen = Arc::new(AtomicU64::new(0));
    let uuids = Arc::new(Mutex::new(Vec::new()));
    let (s, u) = (seen.clone(), uuids.clone());
    center.add_log_event_listener(move |le: &LogEvent| {
        s.fetch_add(1, Ordering::SeqCst);
        u.lock().unwrap().extend(event_uuids(le.body()));
    });
    let dispatcher = HttpDispatcher::builder()
        .endpoint(upstream.url())
        .build()
        .unwrap();
    let processor = BatchEventProcessor::builder()
        .dispatcher(dispatcher)
        .notification_center(center)
        .build()
        .unwrap();
    let ctx = context();
    for i in 0..1_000 {
        processor.process(event(&ctx, i)).unwrap();
    }
    let report = processor.close();
    assert!(report.is_complete(), "{report}");
    let stats = processor.stats();
    assert_eq!(seen.load(Ordering::SeqCst), stats.batches);
    assert_eq!(upstream.request_count() as u64, stats.batches);
    assert_eq!(uuids.lock().unwrap().len(), 1_000);
}

/// A dispatcher that bridges to the service's own tokio runtime: each request is a task
/// spawned there (50 ms of "network"), and dispatch waits for it.
struct OnTheServiceRuntime {
    handle: tokio::runtime::Handle,
    delivered: Arc<Mutex<Vec<String>>>,
}

impl EventDispatcher for OnTheServiceRuntime {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body = log_event.body().clone();
        let delivered = self.delivered.clone();
        self.handle.spawn(async move {
            tokio::time::sleep(LATENCY).await;
            delivered.lock().unwrap().extend(event_uuids(&body));
            let _ = tx.send(());
        });
        // On the processor's worker thread, not a runtime thread: blocking here is fine.
        rx.blocking_recv()
            .map_err(|_| DispatchError::Unavailable("the service runtime is gone".into()))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn close_async_on_a_current_thread_runtime_lets_the_dispatcher_finish() {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let timeout = Duration::from_secs(5);
    let processor = BatchEventProcessor::builder()
        .dispatcher(OnTheServiceRuntime {
            handle: tokio::runtime::Handle::current(),
            delivered: delivered.clone(),
        })
        .close_timeout(timeout)
        .build()
        .unwrap();
    let ctx = context();
    let mut sent = Vec::new();
    for i in 0..2_000 {
        let ev = event(&ctx, i);
        sent.push(ev.uuid.clone());
        processor.process(ev).unwrap();
    }
    let began = Instant::now();
    let report = processor.close_async().await;
    let took = began.elapsed();
    eprintln!("close_async: {report}");
    // A sync close() here would block the runtime's only thread, so no task could run and
    // close would wait its whole timeout: completing before it shows nothing was blocked.
    assert!(report.is_complete(), "{report}");
    assert!(!report.timed_out);
    assert!(took < timeout, "{took:?}");
    let mut got = delivered.lock().unwrap().clone();
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    // Dropping after close_async does not wait again.
    drop(processor);
}
