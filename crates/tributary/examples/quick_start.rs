//! Quick start: a batch event processor sending up to 15 events per request, and at the
//! latest 50 seconds after the first event of a batch (the seeds' example settings).
//!
//! Run: `cargo run -p tributary --example quick_start`
//!
//! This example prints requests instead of sending them. In an application, pass the HTTP
//! dispatcher from [`tributary::dispatcher::http`] (or a relay's URL) to `.dispatcher(...)`.

use std::sync::Arc;
use std::time::Duration;

use tributary::{
    BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher, Impression,
    LogEvent, ProcessError, UserEvent, UserEventKind,
};

/// Prints one line per request.
struct Print;

impl EventDispatcher for Print {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        println!(
            "POST {} ({} events, {} bytes)",
            log_event.url,
            log_event.visitor_count(),
            log_event.body().len()
        );
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let processor = BatchEventProcessor::builder()
        .dispatcher(Print)
        .batch_size(15)
        .flush_interval(Duration::from_secs(50))
        .build()?;

    // One context per datafile revision, shared by all its events.
    let context = Arc::new(EventContext::new("12133785640", "21537940595", "131"));
    // process() never blocks: when the queue is full it drops the event and says so. Count
    // drops rather than `?` them: an error here must not end the program.
    let mut queue_full = 0;
    let mut record = |event: UserEvent| match processor.process(event) {
        Ok(()) => {}
        Err(ProcessError::QueueFull) => queue_full += 1,
        Err(e) => eprintln!("event not recorded: {e}"),
    };
    for i in 0..20 {
        let user = format!("user-{i}");
        let impression = UserEventKind::Impression(Impression {
            campaign_id: "9300000010000".into(),
            experiment_id: "9300000010001".into(),
            variation_id: "410102".into(),
            variation_key: "treatment".into(),
            flag_key: "checkout_redesign".into(),
            rule_key: "checkout_redesign_ab".into(),
            rule_type: "feature-test".into(),
            enabled: true,
            cmab_uuid: None,
        });
        record(UserEvent::new(context.clone(), &user, vec![], impression));
        let purchase = UserEventKind::Conversion(Conversion {
            event_id: "21549340108".into(),
            event_key: "purchase".into(),
            revenue: Some(4200),
            value: None,
            tags: None,
        });
        record(UserEvent::new(context.clone(), &user, vec![], purchase));
    }

    // 40 events: two full batches of 15 went out already; close sends the last 10 and waits
    // (up to the close timeout, 5 s by default) for the dispatcher. Dropping the processor
    // would do the same; calling close() gives you the report.
    let report = processor.close();
    println!(
        "dispatched {}, failed {}, dropped {} (queue full: {queue_full}), pending {}",
        report.dispatched, report.failed, report.dropped, report.pending_at_timeout
    );
    Ok(())
}
