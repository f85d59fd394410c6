//! BatchEventProcessor, ForwardingEventProcessor and NotificationCenter against in-process
//! dispatchers that record, hang, fail or panic. Every wait is on a condition with a deadline.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use tributary::processor::env;
use tributary::{
    AttributeValue, BatchEventProcessor, BuildError, Conversion, DispatchError, EventContext,
    EventDispatcher, EventProcessor, ForwardingEventProcessor, LogEvent, NotificationCenter,
    NotificationType, ProcessError, Region, UserEvent, UserEventKind, VisitorAttribute,
};

/// Long enough for any condition on a loaded 2-core CI machine; never reached when passing.
const WAIT: Duration = Duration::from_secs(10);
/// A flush interval that never fires during a test.
const NEVER: Duration = Duration::from_secs(3600);

fn ctx() -> Arc<EventContext> {
    Arc::new(EventContext::new("12133785640", "21537940595", "131"))
}

fn event(ctx: &Arc<EventContext>, user: &str) -> UserEvent {
    UserEvent::new(
        ctx.clone(),
        user,
        vec![],
        UserEventKind::Conversion(Conversion {
            event_id: "21549340108".into(),
            event_key: "purchase".into(),
            revenue: Some(4200),
            value: None,
            tags: None,
        }),
    )
}

/// The uuids in a LogEvent, in order.
fn uuids(log_event: &LogEvent) -> Vec<String> {
    log_event
        .params()
        .unwrap()
        .visitors
        .iter()
        .flat_map(|v| v.snapshots.iter())
        .flat_map(|s| s.events.iter())
        .map(|e| e.uuid.clone())
        .collect()
}

/// Sends every LogEvent it is given down a channel.
struct Recorder(Sender<LogEvent>);

impl EventDispatcher for Recorder {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        let _ = self.0.send(log_event.clone());
        Ok(())
    }
}

fn recorder() -> (Recorder, Receiver<LogEvent>) {
    let (tx, rx) = unbounded();
    (Recorder(tx), rx)
}

/// Blocks every dispatch until the gate's sender is dropped.
struct Hanging {
    gate: Receiver<()>,
    entered: Sender<()>,
}

impl EventDispatcher for Hanging {
    fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> {
        let _ = self.entered.try_send(());
        let _ = self.gate.recv();
        Ok(())
    }
}

/// Returns the same error for every dispatch.
struct Failing(DispatchError);

impl EventDispatcher for Failing {
    fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> {
        Err(self.0.clone())
    }
}

#[test]
fn batches_by_size() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(5)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    let c = ctx();
    for i in 0..12 {
        p.process(event(&c, &format!("u{i}"))).unwrap();
    }
    let first = rx.recv_timeout(WAIT).unwrap();
    let second = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(first.visitor_count(), 5);
    assert_eq!(second.visitor_count(), 5);
    // The last two stay in the batch until something flushes it.
    assert!(rx.is_empty());
    assert!(p.flush_and_wait(WAIT));
    let third = rx.try_recv().unwrap();
    assert_eq!(third.visitor_count(), 2);
    let report = p.close();
    assert_eq!(report.dispatched, 12);
    assert_eq!(p.stats().batches, 3);
}

#[test]
fn batches_by_interval() {
    let (rec, rx) = recorder();
    let interval = Duration::from_millis(50);
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(100)
        .flush_interval(interval)
        .build()
        .unwrap();
    let c = ctx();
    let started = Instant::now();
    for i in 0..3 {
        p.process(event(&c, &format!("u{i}"))).unwrap();
    }
    let log_event = rx.recv_timeout(WAIT).unwrap();
    assert!(started.elapsed() >= interval, "flushed before the interval");
    assert_eq!(log_event.visitor_count(), 3);
    // A second batch gets its own interval, counted from its first event.
    p.process(event(&c, "late")).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().visitor_count(), 1);
    assert_eq!(p.close().dispatched, 4);
}

#[test]
fn splits_on_context_change() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        // One request at a time, so the recorder sees them in the order they were built.
        .dispatch_concurrency(1)
        .batch_size(100)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    let a = ctx();
    // Equal by value though a different Arc: same batch.
    let a_again = ctx();
    let mut b = (*a).clone();
    b.revision = "132".into();
    let mut no_anon = (*a).clone();
    no_anon.anonymize_ip = false;
    let mut bots = (*a).clone();
    bots.bot_filtering = Some(true);
    let mut eu = (*a).clone();
    eu.region = Region::Eu;
    let mut other_project = (*a).clone();
    other_project.project_id = "999".into();
    let contexts = [
        a.clone(),
        a_again,
        Arc::new(b),
        Arc::new(no_anon),
        Arc::new(bots),
        Arc::new(eu),
        Arc::new(other_project),
        a.clone(),
    ];
    for (i, c) in contexts.iter().enumerate() {
        p.process(event(c, &format!("u{i}"))).unwrap();
    }
    assert!(p.flush_and_wait(WAIT));
    let got: Vec<LogEvent> = rx.try_iter().collect();
    let counts: Vec<usize> = got.iter().map(LogEvent::visitor_count).collect();
    assert_eq!(counts, [2, 1, 1, 1, 1, 1, 1]);
    let params: Vec<_> = got.iter().map(|l| l.params().unwrap()).collect();
    assert_eq!(params[1].revision, "132");
    assert!(!params[2].anonymize_ip);
    assert_eq!(got[4].url, "https://eu.logx.optimizely.com/v1/events");
    assert_eq!(got[3].url, "https://logx.optimizely.com/v1/events");
    assert_eq!(params[5].project_id, "999");
    p.close();
}

#[test]
fn flush_sends_what_is_queued() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(100)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    let c = ctx();
    for i in 0..7 {
        p.process(event(&c, &format!("u{i}"))).unwrap();
    }
    p.flush();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().visitor_count(), 7);
    // flush_and_wait returns once the dispatcher has returned.
    p.process(event(&c, "u7")).unwrap();
    assert!(p.flush_and_wait(WAIT));
    assert_eq!(rx.try_recv().unwrap().visitor_count(), 1);
    // Nothing queued: a flush sends nothing and still completes.
    assert!(p.flush_and_wait(WAIT));
    assert!(rx.try_recv().is_err());
    p.close();
    assert!(!p.flush_and_wait(WAIT), "a closed processor cannot flush");
}

#[test]
fn close_delivers_everything_queued() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(7)
        .queue_capacity(100)
        .flush_interval(NEVER)
        .start_on_init(false)
        .build()
        .unwrap();
    let c = ctx();
    let mut sent = HashSet::new();
    for i in 0..100 {
        let e = event(&c, &format!("u{i}"));
        sent.insert(e.uuid.to_string());
        p.process(e).unwrap();
    }
    // Not started: nothing has gone anywhere.
    assert_eq!(p.queue_len(), 100);
    assert!(rx.is_empty());
    let report = p.close();
    assert!(report.completed());
    assert_eq!(report.dispatched, 100);
    assert_eq!((report.failed, report.dropped), (0, 0));
    let got: HashSet<String> = rx.try_iter().flat_map(|l| uuids(&l)).collect();
    assert_eq!(got, sent);
    assert_eq!(p.process(event(&c, "late")), Err(ProcessError::Stopped));
}

#[test]
fn start_begins_dispatching() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(2)
        .start_on_init(false)
        .build()
        .unwrap();
    let c = ctx();
    p.process(event(&c, "a")).unwrap();
    p.process(event(&c, "b")).unwrap();
    assert!(!p.flush_and_wait(Duration::from_millis(1)));
    p.start().unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().visitor_count(), 2);
    p.start().unwrap();
    p.close();
}

#[test]
fn drop_flushes() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(100)
        .flush_interval(NEVER)
        .build()
        .unwrap();
    let c = ctx();
    for i in 0..5 {
        p.process(event(&c, &format!("u{i}"))).unwrap();
    }
    drop(p);
    assert_eq!(rx.try_recv().unwrap().visitor_count(), 5);
}

#[test]
fn close_is_bounded_when_the_dispatcher_hangs() {
    let (gate_tx, gate) = bounded::<()>(0);
    let (entered, entered_rx) = bounded(1);
    let timeout = Duration::from_millis(200);
    let p = BatchEventProcessor::builder()
        .dispatcher(Hanging { gate, entered })
        .batch_size(1)
        .max_pending_batches(2)
        .close_timeout(timeout)
        .build()
        .unwrap();
    let c = ctx();
    let mut accepted = 0;
    for i in 0..30 {
        if p.process(event(&c, &format!("u{i}"))).is_ok() {
            accepted += 1;
        }
    }
    entered_rx.recv_timeout(WAIT).unwrap();
    let report = p.close();
    assert!(report.waited >= timeout);
    assert!(
        report.waited < timeout + Duration::from_secs(3),
        "{report:?}"
    );
    assert!(!report.completed());
    assert_eq!(report.dispatched, 0);
    assert_eq!(report.pending_at_timeout, accepted);
    // A second close does not wait again.
    let again = p.close();
    assert!(again.waited < timeout);
    assert_eq!(again.pending_at_timeout, accepted);
    // Releasing the dispatcher lets the detached threads finish everything.
    drop(gate_tx);
    let deadline = Instant::now() + WAIT;
    while p.stats().events_dispatched < accepted && Instant::now() < deadline {
        thread::yield_now();
    }
    assert_eq!(p.stats().events_dispatched, accepted);
    assert!(p.close().completed());
}

#[test]
fn close_within_waits_until_the_given_deadline_not_close_timeout() {
    let (gate_tx, gate) = bounded::<()>(0);
    let (entered, entered_rx) = bounded(1);
    let p = BatchEventProcessor::builder()
        .dispatcher(Hanging { gate, entered })
        .batch_size(1)
        // Far beyond the deadline given below: a close that used it would wait minutes.
        .close_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    p.process(event(&ctx(), "u")).expect("queued");
    entered_rx.recv_timeout(WAIT).unwrap();
    let budget = Duration::from_millis(200);
    let report = p.close_within(Instant::now() + budget);
    assert!(!report.completed(), "{report:?}");
    assert!(report.waited >= budget, "{report:?}");
    assert!(report.waited < WAIT, "{report:?}");
    drop(gate_tx);
}

#[test]
fn full_queue_drops_are_counted() {
    let (rec, _rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .queue_capacity(4)
        .start_on_init(false)
        .build()
        .unwrap();
    let c = ctx();
    let results: Vec<_> = (0..6)
        .map(|i| p.process(event(&c, &format!("u{i}"))))
        .collect();
    assert!(results[..4].iter().all(Result::is_ok));
    assert_eq!(results[4], Err(ProcessError::QueueFull));
    assert_eq!(results[5], Err(ProcessError::QueueFull));
    let stats = p.stats();
    assert_eq!((stats.accepted, stats.dropped_queue_full), (4, 2));
    let report = p.close();
    assert_eq!((report.dispatched, report.dropped), (4, 2));
    assert_eq!(p.process(event(&c, "late")), Err(ProcessError::Stopped));
    let stats = p.stats();
    assert_eq!((stats.dropped_queue_full, stats.dropped_stopped), (2, 1));
    assert_eq!(p.close().dropped, 3);
}

#[test]
fn slow_dispatcher_backpressure_becomes_queue_full() {
    let (gate_tx, gate) = bounded::<()>(0);
    let (entered, entered_rx) = bounded(1);
    let p = BatchEventProcessor::builder()
        .dispatcher(Hanging { gate, entered })
        // One worker, so one request in the dispatcher; with N, N are (see the bound below).
        .dispatch_concurrency(1)
        .batch_size(1)
        .queue_capacity(8)
        .max_pending_batches(2)
        .close_timeout(WAIT)
        .build()
        .unwrap();
    let c = ctx();
    p.process(event(&c, "first")).unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();
    // 1 in the dispatcher, 2 pending, 1 held by the blocked batcher, 8 queued: the rest drop.
    let mut ok = 1;
    let mut full = 0;
    for i in 0..100 {
        match p.process(event(&c, &format!("u{i}"))) {
            Ok(()) => ok += 1,
            Err(ProcessError::QueueFull) => full += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full > 0);
    assert!(ok <= 1 + 2 + 1 + 8 + 1, "memory is bounded: {ok} accepted");
    drop(gate_tx);
    let report = p.close();
    assert!(report.completed());
    assert_eq!(report.dispatched, ok);
    assert_eq!(report.dropped, full);
}

#[test]
fn dispatch_failures_are_counted() {
    let c = ctx();
    let cases = [
        (
            DispatchError::PartiallyRejected {
                rejected: 2,
                total: 5,
                status: 400,
            },
            3,
            2,
        ),
        (
            DispatchError::Permanent {
                status: 400,
                message: "bad".into(),
            },
            0,
            5,
        ),
        (
            DispatchError::Transient {
                message: "503".into(),
                retry_after: None,
            },
            0,
            5,
        ),
    ];
    for (error, dispatched, failed) in cases {
        let p = BatchEventProcessor::builder()
            .dispatcher(Failing(error.clone()))
            .batch_size(5)
            .build()
            .unwrap();
        for i in 0..5 {
            p.process(event(&c, &format!("u{i}"))).unwrap();
        }
        let report = p.close();
        assert_eq!(
            (report.dispatched, report.failed),
            (dispatched, failed),
            "{error}"
        );
        assert!(report.completed());
    }
}

#[test]
fn panicking_dispatcher_is_contained() {
    struct Panics;
    impl EventDispatcher for Panics {
        fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
            if log_event.visitor_count() == 1 {
                panic!("dispatcher bug");
            }
            Ok(())
        }
    }
    let p = BatchEventProcessor::builder()
        .dispatcher(Panics)
        .batch_size(2)
        .build()
        .unwrap();
    let c = ctx();
    p.process(event(&c, "a")).unwrap();
    assert!(p.flush_and_wait(WAIT));
    p.process(event(&c, "b")).unwrap();
    p.process(event(&c, "c")).unwrap();
    let report = p.close();
    assert_eq!((report.dispatched, report.failed), (2, 1));
    assert!(report.completed());
}

#[test]
fn oversized_event_fails_alone() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(3)
        .max_batch_bytes(2048)
        .build()
        .unwrap();
    let c = ctx();
    let mut big = event(&c, "big");
    big.attributes.push(VisitorAttribute::custom(
        "1",
        "blob",
        AttributeValue::String("x".repeat(4096).into()),
    ));
    p.process(event(&c, "a")).unwrap();
    p.process(big).unwrap();
    p.process(event(&c, "b")).unwrap();
    let report = p.close();
    assert_eq!((report.dispatched, report.failed), (2, 1));
    let got: Vec<usize> = rx.try_iter().map(|l| l.visitor_count()).collect();
    assert_eq!(got.iter().sum::<usize>(), 2);
}

#[test]
fn listeners_run_before_dispatch_and_panics_are_contained() {
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    struct Logged(Arc<Mutex<Vec<String>>>);
    impl EventDispatcher for Logged {
        fn dispatch(&self, l: &LogEvent) -> Result<(), DispatchError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("dispatch {}", uuids(l)[0]));
            Ok(())
        }
    }
    let center = Arc::new(NotificationCenter::new());
    center.add_log_event_listener(|_| panic!("listener bug"));
    let seen = order.clone();
    center.add_log_event_listener(move |l| {
        seen.lock()
            .unwrap()
            .push(format!("listener {}", uuids(l)[0]));
    });
    let p = BatchEventProcessor::builder()
        .dispatcher(Logged(order.clone()))
        .notification_center(center.clone())
        .batch_size(1)
        // One request at a time keeps requests in order; with more, only each request's
        // listener-before-dispatch order holds (tests/latency.rs).
        .dispatch_concurrency(1)
        .build()
        .unwrap();
    let c = ctx();
    let mut expected = Vec::new();
    for i in 0..3 {
        let e = event(&c, &format!("u{i}"));
        expected.push(format!("listener {}", e.uuid));
        expected.push(format!("dispatch {}", e.uuid));
        p.process(e).unwrap();
    }
    let report = p.close();
    assert_eq!(report.dispatched, 3);
    assert_eq!(*order.lock().unwrap(), expected);
}

#[test]
fn notification_center_add_remove_clear() {
    let center = NotificationCenter::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let add = |center: &NotificationCenter| {
        let calls = calls.clone();
        center.add_log_event_listener(move |_| {
            calls.fetch_add(1, Ordering::Relaxed);
        })
    };
    let first = add(&center);
    let second = add(&center);
    assert_ne!(first, second);
    assert_eq!(center.listener_count(NotificationType::LogEvent), 2);
    let (rec, rx) = recorder();
    let p = ForwardingEventProcessor::new(rec);
    p.process(event(&ctx(), "u")).unwrap();
    let log_event = rx.try_recv().unwrap();
    assert_eq!(center.send_log_event(&log_event), 0);
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    assert!(center.remove_notification_listener(first));
    assert!(!center.remove_notification_listener(first));
    center.send_log_event(&log_event);
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    add(&center);
    center.clear_notification_listeners(NotificationType::LogEvent);
    assert_eq!(center.listener_count(NotificationType::LogEvent), 0);
    add(&center);
    center.clear_all_notification_listeners();
    center.send_log_event(&log_event);
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    // A listener may remove itself while being called.
    let center = Arc::new(NotificationCenter::new());
    let weak = Arc::downgrade(&center);
    let slot = Arc::new(Mutex::new(None));
    let slot2 = slot.clone();
    let id = center.add_log_event_listener(move |_| {
        let id = slot2.lock().unwrap().unwrap();
        weak.upgrade().unwrap().remove_notification_listener(id);
    });
    *slot.lock().unwrap() = Some(id);
    center.send_log_event(&log_event);
    assert_eq!(center.listener_count(NotificationType::LogEvent), 0);
}

#[test]
fn forwarding_dispatches_on_the_callers_thread() {
    struct OnThread(Sender<thread::ThreadId>);
    impl EventDispatcher for OnThread {
        fn dispatch(&self, l: &LogEvent) -> Result<(), DispatchError> {
            assert_eq!(l.visitor_count(), 1);
            self.0.send(thread::current().id()).unwrap();
            Ok(())
        }
    }
    let (tx, rx) = unbounded();
    let center = Arc::new(NotificationCenter::new());
    let heard = Arc::new(AtomicUsize::new(0));
    let h = heard.clone();
    center.add_log_event_listener(move |_| {
        h.fetch_add(1, Ordering::Relaxed);
    });
    let p = ForwardingEventProcessor::new(OnThread(tx)).with_notification_center(center);
    let c = ctx();
    for i in 0..3 {
        p.process(event(&c, &format!("u{i}"))).unwrap();
        assert_eq!(rx.try_recv().unwrap(), thread::current().id());
    }
    assert_eq!(heard.load(Ordering::Relaxed), 3);
    let report = p.close();
    assert_eq!((report.dispatched, report.pending_at_timeout), (3, 0));
    assert_eq!(p.process(event(&c, "late")), Err(ProcessError::Stopped));

    let failing = ForwardingEventProcessor::new(Failing(DispatchError::Permanent {
        status: 400,
        message: "no".into(),
    }));
    assert!(matches!(
        failing.process(event(&c, "x")),
        Err(ProcessError::Dispatch(DispatchError::Permanent {
            status: 400,
            ..
        }))
    ));
    assert_eq!(failing.stats().events_failed, 1);
}

#[test]
fn builder_rejects_invalid_settings() {
    let (rec, _rx) = recorder();
    let invalid = |b: tributary::BatchEventProcessorBuilder| match b.build() {
        Err(BuildError::Invalid { setting, .. }) => setting,
        other => panic!("expected Invalid, got {other:?}"),
    };
    let base = || BatchEventProcessor::builder().start_on_init(false);
    assert_eq!(invalid(base().batch_size(0)), "batch_size");
    assert_eq!(invalid(base().queue_capacity(0)), "queue_capacity");
    assert_eq!(
        invalid(base().flush_interval(Duration::ZERO)),
        "flush_interval"
    );
    assert_eq!(invalid(base().max_batch_bytes(10)), "max_batch_bytes");
    assert_eq!(
        invalid(base().max_pending_batches(0)),
        "max_pending_batches"
    );
    assert_eq!(
        invalid(base().dispatch_concurrency(0)),
        "dispatch_concurrency"
    );
    assert_eq!(
        invalid(base().dispatch_concurrency(65)),
        "dispatch_concurrency"
    );
    assert!(
        base()
            .dispatch_concurrency(64)
            .dispatcher(recorder().0)
            .build()
            .is_ok()
    );
    // Without a dispatcher the default HTTP dispatcher is used.
    let default = base().start_on_init(false).build().unwrap();
    assert_eq!(default.close().dispatched, 0);
    // Huge durations are valid and do not overflow.
    let p = base()
        .dispatcher(rec)
        .flush_interval(Duration::MAX)
        .close_timeout(Duration::MAX)
        .start_on_init(true)
        .build()
        .unwrap();
    p.process(event(&ctx(), "u")).unwrap();
    assert_eq!(p.close().dispatched, 1);
}

#[test]
fn settings_from_the_environment() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let b = BatchEventProcessor::builder()
        .with_env_lookup(vars(&[
            (env::BATCH_SIZE, "25"),
            (env::BATCH_SIZE_ENV, "99"),
            (env::BATCH_INTERVAL_ENV, "1500"),
            (env::CLOSE_TIMEOUT, "250"),
        ]))
        .unwrap();
    let debug = format!("{b:?}");
    assert!(debug.contains("batch_size: 25"), "{debug}");
    assert!(debug.contains("flush_interval: 1.5s"), "{debug}");
    assert!(debug.contains("close_timeout: 250ms"), "{debug}");
    for bad in ["0", "-5", "ten", "1.5"] {
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(Box::new([(env::BATCH_INTERVAL, bad)]));
        match BatchEventProcessor::builder().with_env_lookup(vars(pairs)) {
            Err(BuildError::InvalidEnv { name, value, .. }) => {
                assert_eq!((name, value.as_str()), (env::BATCH_INTERVAL, bad));
            }
            other => panic!("{bad}: expected InvalidEnv, got {other:?}"),
        }
    }
    // Nothing set: defaults stay.
    let b = BatchEventProcessor::builder()
        .with_env_lookup(|_| None)
        .unwrap();
    assert!(format!("{b:?}").contains("batch_size: 10"));
}

#[tokio::test(flavor = "current_thread")]
async fn use_and_drop_inside_a_current_thread_runtime() {
    let (rec, rx) = recorder();
    let p = BatchEventProcessor::builder()
        .dispatcher(rec)
        .batch_size(4)
        .flush_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let c = ctx();
    for i in 0..10 {
        p.process(event(&c, &format!("u{i}"))).unwrap();
        tokio::task::yield_now().await;
    }
    assert!(p.flush_and_wait(WAIT));
    p.process(event(&c, "last")).unwrap();
    // Dropped on the runtime's only thread: must flush and return.
    drop(p);
    let total: usize = rx.try_iter().map(|l| l.visitor_count()).sum();
    assert_eq!(total, 11);

    // Closed from a task, while another task keeps the runtime busy.
    let (rec, rx) = recorder();
    let p = Arc::new(
        BatchEventProcessor::builder()
            .dispatcher(rec)
            .build()
            .unwrap(),
    );
    let p2 = p.clone();
    let ticker = tokio::spawn(async {
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    });
    p.process(event(&c, "x")).unwrap();
    let report = tokio::spawn(async move { p2.close() }).await.unwrap();
    ticker.await.unwrap();
    assert_eq!(report.dispatched, 1);
    assert_eq!(rx.try_iter().count(), 1);
}

/// Many producers, random flushes, a close in the middle of production: every event whose
/// process() returned Ok reaches the dispatcher exactly once, and nothing else does.
#[test]
fn stress_no_loss_no_duplicates() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let seed: u64 = rand::random();
    eprintln!("stress seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..4 {
        let (rec, rx) = recorder();
        let p = Arc::new(
            BatchEventProcessor::builder()
                .dispatcher(rec)
                .batch_size(rng.random_range(1..20))
                .queue_capacity(rng.random_range(16..512))
                .max_pending_batches(rng.random_range(1..4))
                .flush_interval(Duration::from_millis(rng.random_range(1..20)))
                .close_timeout(WAIT)
                .build()
                .unwrap(),
        );
        let producers = 6;
        let per_producer = 3000;
        let close_after = rng.random_range(0..producers * per_producer);
        let produced = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for t in 0..producers {
            let p = p.clone();
            let produced = produced.clone();
            handles.push(thread::spawn(move || {
                let c = ctx();
                let mut ok = Vec::new();
                let mut refused = 0u64;
                for i in 0..per_producer {
                    let e = event(&c, &format!("t{t}-{i}"));
                    let uuid = e.uuid.clone();
                    match p.process(e) {
                        Ok(()) => ok.push(uuid),
                        Err(ProcessError::QueueFull | ProcessError::Stopped) => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                    produced.fetch_add(1, Ordering::Relaxed);
                }
                (ok, refused)
            }));
        }
        let flusher = {
            let p = p.clone();
            let seed = rng.random::<u64>();
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                for _ in 0..50 {
                    if rng.random_bool(0.5) {
                        p.flush();
                    } else {
                        p.flush_and_wait(Duration::from_millis(50));
                    }
                    thread::yield_now();
                }
            })
        };
        let deadline = Instant::now() + WAIT;
        while produced.load(Ordering::Relaxed) < close_after && Instant::now() < deadline {
            thread::yield_now();
        }
        let report = p.close();
        let mut ok = Vec::new();
        let mut refused = 0;
        for h in handles {
            let (o, r) = h.join().unwrap();
            ok.extend(o);
            refused += r;
        }
        flusher.join().unwrap();
        assert!(report.completed(), "round {round}: {report:?}");
        let stats = p.stats();
        let mut got: Vec<String> = rx.try_iter().flat_map(|l| uuids(&l)).collect();
        let received = got.len();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), received, "round {round}: duplicates");
        let mut ok_sorted = ok.clone();
        ok_sorted.sort();
        assert_eq!(got, ok_sorted, "round {round}: lost or invented events");
        assert_eq!(stats.accepted, ok.len() as u64);
        assert_eq!(stats.events_dispatched, ok.len() as u64);
        assert_eq!(stats.dropped(), refused);
        assert_eq!(p.close().dropped, refused);
    }
}
