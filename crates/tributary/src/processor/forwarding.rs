//! [`ForwardingEventProcessor`]: no queue, no batching, no thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dispatcher::EventDispatcher;
use crate::event::UserEvent;
use crate::factory::EventFactory;
use crate::notification::NotificationCenter;

use super::stats::{Counters, METRIC_ACCEPTED};
use super::{CloseReport, EventProcessor, ProcessError, ProcessorStats};

/// Sends one request per user event, on the caller's thread, before `process()` returns.
///
/// For scripts, serverless functions and tests, where batching buys nothing and the caller
/// wants to know the outcome. `process()` blocks for as long as the dispatcher does, so do not
/// call it from async code with a blocking dispatcher.
///
/// ```
/// use std::sync::Arc;
/// use tributary::{Conversion, DispatchError, EventContext, EventDispatcher, EventProcessor,
///     ForwardingEventProcessor, LogEvent, UserEvent, UserEventKind};
///
/// struct Discard;
/// impl EventDispatcher for Discard {
///     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
/// }
///
/// let processor = ForwardingEventProcessor::new(Discard);
/// let ctx = Arc::new(EventContext::new("1", "2", "3"));
/// let event = UserEvent::new(ctx, "user-1", vec![], UserEventKind::Conversion(Conversion {
///     event_id: "7".into(), event_key: "purchase".into(), revenue: None, value: None, tags: None,
/// }));
/// processor.process(event).unwrap();
/// assert_eq!(processor.stats().events_dispatched, 1);
/// ```
pub struct ForwardingEventProcessor {
    dispatcher: Box<dyn EventDispatcher>,
    notification_center: Option<Arc<NotificationCenter>>,
    factory: EventFactory,
    stopped: AtomicBool,
    counters: Counters,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for ForwardingEventProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardingEventProcessor")
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl ForwardingEventProcessor {
    /// A processor sending through `dispatcher`, with the 3,500,000-byte payload limit.
    pub fn new(dispatcher: impl EventDispatcher) -> Self {
        ForwardingEventProcessor {
            dispatcher: Box::new(dispatcher),
            notification_center: None,
            factory: EventFactory::new(),
            stopped: AtomicBool::new(false),
            counters: Counters::default(),
            last_error: Mutex::new(None),
        }
    }

    /// Tells `center`'s `LOG_EVENT` listeners about each request before it is dispatched.
    pub fn with_notification_center(mut self, center: Arc<NotificationCenter>) -> Self {
        self.notification_center = Some(center);
        self
    }

    fn set_last_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// Uses another payload limit (bytes).
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.factory = EventFactory::with_max_batch_bytes(bytes);
        self
    }
}

impl EventProcessor for ForwardingEventProcessor {
    /// Builds the event's request, tells the listeners, dispatches it and returns the outcome.
    /// A dispatch failure is returned as [`ProcessError::Dispatch`] and counted as failed
    /// (the event was accepted, so it counts as accepted too).
    fn process(&self, event: UserEvent) -> Result<(), ProcessError> {
        if self.stopped.load(Ordering::Acquire) {
            self.counters.drop_stopped();
            return Err(ProcessError::Stopped);
        }
        let counters = &self.counters;
        counters.producer.accepted.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(METRIC_ACCEPTED).increment(1);
        let mut out = self.factory.create_log_events(std::slice::from_ref(&event));
        if let Some(oversized) = out.oversized.pop() {
            tracing::error!(
                uuid = %oversized.uuid,
                size = oversized.size,
                limit = oversized.limit,
                "event too large to send; counted as failed"
            );
            counters.fail(1);
            self.set_last_error(oversized.to_string());
            return Err(ProcessError::Oversized(oversized));
        }
        let mut result = Ok(());
        for log_event in &out.log_events {
            if let Some(center) = &self.notification_center {
                center.send_log_event(log_event);
            }
            let total = log_event.visitor_count();
            match self.dispatcher.dispatch(log_event) {
                Ok(()) => counters.dispatched(total as u64, total as u64),
                Err(e) => {
                    counters.dispatched(e.delivered_of(total) as u64, total as u64);
                    self.set_last_error(e.to_string());
                    result = Err(ProcessError::Dispatch(e));
                }
            }
        }
        result
    }

    /// Nothing is ever held back, so there is nothing to flush.
    fn flush(&self) {}

    /// Refuses further events and reports. Nothing is pending: every accepted event was
    /// dispatched or failed before its `process()` returned.
    fn close(&self) -> CloseReport {
        let started = Instant::now();
        self.stopped.store(true, Ordering::Release);
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        CloseReport::from_stats(
            &self.counters.snapshot(),
            started.elapsed(),
            false,
            last_error,
        )
    }

    fn stats(&self) -> ProcessorStats {
        self.counters.snapshot()
    }
}
