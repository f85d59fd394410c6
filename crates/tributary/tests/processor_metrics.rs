//! The processor's counters reach the `metrics` facade. A binary of its own, because the
//! global recorder can be set once per process.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tributary::processor::{
    METRIC_ACCEPTED, METRIC_BATCHES, METRIC_DISPATCHED, METRIC_DROPPED, METRIC_FAILED,
};
use tributary::{
    BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher, LogEvent,
    ProcessError, UserEvent, UserEventKind,
};

/// Counters by `name{label=value,...}`.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>);

impl Collect {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Recorder for Collect {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        let counter = self.0.lock().unwrap().entry(name).or_default().clone();
        Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Delivers requests of one visitor, fails the others.
struct OnlySingles;

impl EventDispatcher for OnlySingles {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        if log_event.visitor_count() == 1 {
            Ok(())
        } else {
            Err(DispatchError::Permanent {
                status: 400,
                message: "no".into(),
            })
        }
    }
}

#[test]
fn counters_are_exported() {
    let collect = Collect::default();
    metrics::set_global_recorder(collect.clone()).unwrap();
    let p = BatchEventProcessor::builder()
        .dispatcher(OnlySingles)
        .batch_size(3)
        .queue_capacity(5)
        .start_on_init(false)
        .build()
        .unwrap();
    let ctx = Arc::new(EventContext::new("1", "2", "3"));
    let event = || {
        UserEvent::new(
            ctx.clone(),
            "u",
            vec![],
            UserEventKind::Conversion(Conversion {
                event_id: "7".into(),
                event_key: "buy".into(),
                revenue: None,
                value: None,
                tags: None,
            }),
        )
    };
    // Not started: 5 fit, the 6th is refused.
    for _ in 0..5 {
        p.process(event()).unwrap();
    }
    assert_eq!(p.process(event()), Err(ProcessError::QueueFull));
    // Batches of 3 and 2 fail; nothing is delivered.
    let report = p.close();
    assert_eq!(
        (report.dispatched, report.failed, report.dropped),
        (0, 5, 1)
    );
    assert_eq!(p.process(event()), Err(ProcessError::Stopped));

    assert_eq!(collect.get(METRIC_ACCEPTED), 5);
    assert_eq!(
        collect.get(&format!("{METRIC_DROPPED}{{reason=queue_full}}")),
        1
    );
    assert_eq!(
        collect.get(&format!("{METRIC_DROPPED}{{reason=stopped}}")),
        1
    );
    assert_eq!(collect.get(METRIC_BATCHES), 2);
    assert_eq!(collect.get(METRIC_FAILED), 5);
    assert_eq!(collect.get(METRIC_DISPATCHED), 0);
}
