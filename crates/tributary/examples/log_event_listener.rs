//! A `LOG_EVENT` listener: see every request just before it is dispatched.
//!
//! Run: `cargo run -p tributary --example log_event_listener`
//!
//! Listeners are called once per request (not once per retry), before the dispatcher, on the
//! processor's dispatch workers (several requests may be in flight at once, so listeners may
//! run at the same time). They see the request, not its outcome. A listener that panics
//! is caught and logged; the processor and the other listeners carry on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tributary::{
    BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher, LogEvent,
    NotificationCenter, NotificationType, ProcessError, UserEvent, UserEventKind,
};

/// Sends nowhere.
struct Discard;

impl EventDispatcher for Discard {
    fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let center = Arc::new(NotificationCenter::new());
    let events_seen = Arc::new(AtomicUsize::new(0));
    let seen = events_seen.clone();
    let id = center.add_log_event_listener(move |log_event: &LogEvent| {
        seen.fetch_add(log_event.visitor_count(), Ordering::Relaxed);
        // `params()` parses the body into the typed EventBatch, as the SDKs' LogEvent has it.
        if let Ok(batch) = log_event.params() {
            println!(
                "LOG_EVENT: {} {} with {} visitors (revision {})",
                log_event.http_verb,
                log_event.url,
                batch.visitors.len(),
                batch.revision
            );
        }
    });

    let processor = BatchEventProcessor::builder()
        .dispatcher(Discard)
        .notification_center(center.clone())
        .batch_size(4)
        .build()?;
    let context = Arc::new(EventContext::new("12133785640", "21537940595", "131"));
    let mut queue_full = 0;
    for i in 0..10 {
        let result = processor.process(UserEvent::new(
            context.clone(),
            format!("user-{i}"),
            vec![],
            UserEventKind::Conversion(Conversion {
                event_id: "21549340108".into(),
                event_key: "purchase".into(),
                revenue: None,
                value: None,
                tags: None,
            }),
        ));
        // process() never blocks: a full queue drops the event. Count it, do not `?` it.
        match result {
            Ok(()) => {}
            Err(ProcessError::QueueFull) => queue_full += 1,
            Err(e) => eprintln!("event not recorded: {e}"),
        }
    }
    let report = processor.close();
    println!(
        "listener saw {} events; {} dispatched",
        events_seen.load(Ordering::Relaxed),
        report.dispatched
    );
    println!(
        "dispatched {}, failed {}, dropped {} (queue full: {queue_full}), pending {}",
        report.dispatched, report.failed, report.dropped, report.pending_at_timeout
    );

    center.remove_notification_listener(id);
    assert_eq!(center.listener_count(NotificationType::LogEvent), 0);
    Ok(())
}
