//! Event processors: where user events go in.
//!
//! - [`BatchEventProcessor`]: the default. `process()` puts the event on a bounded queue and
//!   returns at once; a background thread batches events and a pool of dispatch workers
//!   (`dispatch_concurrency`, default 32) sends them, several requests in flight at once.
//! - [`ForwardingEventProcessor`]: no batching; one request per event, sent on the caller's
//!   thread.
//!
//! Both implement [`EventProcessor`], count what they do ([`ProcessorStats`]) and tell
//! [`NotificationCenter`](crate::notification::NotificationCenter) `LOG_EVENT` listeners about
//! each request before it is dispatched.

use std::time::Duration;

use crate::dispatcher::DispatchError;
use crate::event::UserEvent;
use crate::factory::OversizedEvent;

mod batch;
mod builder;
mod forwarding;
mod stats;

pub use batch::BatchEventProcessor;
pub use builder::{
    BatchEventProcessorBuilder, BuildError, DEFAULT_DISPATCH_CONCURRENCY, DEFAULT_QUEUE_CAPACITY,
    MAX_DISPATCH_CONCURRENCY, env,
};
pub use forwarding::ForwardingEventProcessor;
pub use stats::{
    METRIC_ACCEPTED, METRIC_BATCHES, METRIC_DISPATCHED, METRIC_DROPPED, METRIC_FAILED,
    METRIC_QUEUE_DEPTH, ProcessorStats,
};

/// Takes user events and gets them to an [`EventDispatcher`](crate::EventDispatcher).
///
/// Implementations are shared between threads (`&self` everywhere) and must not block the
/// caller of [`process`](EventProcessor::process) for long.
pub trait EventProcessor: Send + Sync {
    /// Hands `event` over. `Ok` means the processor took responsibility for it: it will be
    /// dispatched, or counted as failed, and appear in the [`CloseReport`].
    fn process(&self, event: UserEvent) -> Result<(), ProcessError>;

    /// Like [`process`](EventProcessor::process), but may wait up to `timeout` for room
    /// instead of refusing at once with [`ProcessError::QueueFull`]. Blocks the calling
    /// thread. The default calls `process` (right for processors without a queue).
    ///
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// # use tributary::{Conversion, DispatchError, EventContext, EventDispatcher, EventProcessor,
    /// #     ForwardingEventProcessor, LogEvent, UserEvent, UserEventKind};
    /// # struct Discard;
    /// # impl EventDispatcher for Discard {
    /// #     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
    /// # }
    /// # let ctx = Arc::new(EventContext::new("1", "2", "3"));
    /// # let event = UserEvent::new(ctx, "user-1", vec![], UserEventKind::Conversion(Conversion {
    /// #     event_id: "7".into(), event_key: "purchase".into(), revenue: None, value: None, tags: None,
    /// # }));
    /// let processor: Box<dyn EventProcessor> = Box::new(ForwardingEventProcessor::new(Discard));
    /// processor.process_timeout(event, Duration::from_millis(50)).unwrap();
    /// ```
    fn process_timeout(&self, event: UserEvent, timeout: Duration) -> Result<(), ProcessError> {
        let _ = timeout;
        self.process(event)
    }

    /// Asks for everything accepted so far to be dispatched soon. Does not wait.
    fn flush(&self);

    /// Stops intake, dispatches everything accepted, waits up to the processor's close
    /// timeout, and reports. Calling it again returns a fresh report without waiting again.
    fn close(&self) -> CloseReport;

    /// The processor's counters now.
    fn stats(&self) -> ProcessorStats;
}

/// Why [`EventProcessor::process`] did not take an event. The event is dropped and counted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The queue between callers and the batcher is full: the dispatcher is not keeping up.
    #[error("event queue full; event dropped")]
    QueueFull,
    /// The processor was closed.
    #[error("event processor stopped; event dropped")]
    Stopped,
    /// [`ForwardingEventProcessor`] only: the dispatch made on the caller's thread failed.
    /// The event is counted as failed.
    #[error("dispatch failed: {0}")]
    Dispatch(DispatchError),
    /// [`ForwardingEventProcessor`] only: the event alone is larger than the payload limit.
    #[error(transparent)]
    Oversized(OversizedEvent),
}

/// What [`EventProcessor::close`] achieved, and what it did not.
///
/// Counts are totals over the processor's life: every accepted event is exactly once in
/// `dispatched`, `failed` or `pending_at_timeout`, so [`undelivered`](Self::undelivered)
/// (`failed + pending_at_timeout`) is what an exiting service loses, and `last_error` says
/// why. `pending_at_timeout` is non-zero only when the close timeout passed first (a
/// dispatcher that ignores the close deadline and hangs, say): those events were neither
/// delivered nor failed yet, and the worker threads were left to finish on their own.
///
/// [`Display`](std::fmt::Display) gives one plain sentence for a log line:
///
/// ```
/// use std::time::Duration;
/// use tributary::CloseReport;
/// let report = CloseReport {
///     accepted: 100,
///     dispatched: 90,
///     failed: 10,
///     dropped: 5,
///     pending_at_timeout: 0,
///     timed_out: false,
///     last_error: Some("transient failure: HTTP 503".into()),
///     waited: Duration::from_millis(4750),
/// };
/// assert_eq!(report.undelivered(), 10);
/// assert_eq!(
///     report.to_string(),
///     "event processor closed in 4.75 s: 90 of 100 accepted events delivered, 10 not \
///      delivered (10 failed, 0 still pending at the close timeout); 5 refused by process() \
///      (queue full or stopped); last error: transient failure: HTTP 503"
/// );
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Events `process()` accepted.
    pub accepted: u64,
    /// Events the dispatcher reported delivered.
    pub dispatched: u64,
    /// Events that will not be delivered (dispatch failed, cut by the close deadline, or
    /// too large).
    pub failed: u64,
    /// Events `process()` refused (queue full, or after stop); never accepted.
    pub dropped: u64,
    /// Accepted events still on their way when close gave up waiting.
    pub pending_at_timeout: u64,
    /// Whether close stopped waiting at its timeout with work still running.
    pub timed_out: bool,
    /// The last dispatch error (or oversized event) of the processor's life, if any: why
    /// `failed` is not zero.
    pub last_error: Option<String>,
    /// How long close waited.
    pub waited: Duration,
}

impl CloseReport {
    pub(crate) fn from_stats(
        stats: &ProcessorStats,
        waited: Duration,
        timed_out: bool,
        last_error: Option<String>,
    ) -> Self {
        CloseReport {
            accepted: stats.accepted,
            dispatched: stats.events_dispatched,
            failed: stats.events_failed,
            dropped: stats.dropped(),
            pending_at_timeout: stats.pending(),
            timed_out,
            last_error,
            waited,
        }
    }

    /// Whether close finished before its timeout (nothing left pending).
    pub fn completed(&self) -> bool {
        self.pending_at_timeout == 0
    }

    /// Accepted events that were not delivered: failed plus still pending.
    pub fn undelivered(&self) -> u64 {
        self.failed + self.pending_at_timeout
    }

    /// Whether every event offered was delivered: nothing failed, pending or refused.
    pub fn is_complete(&self) -> bool {
        self.undelivered() == 0 && self.dropped == 0
    }
}

impl std::fmt::Display for CloseReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "event processor closed in {:.2} s: ",
            self.waited.as_secs_f64()
        )?;
        if self.undelivered() == 0 {
            write!(f, "all {} accepted events delivered", self.accepted)?;
        } else {
            write!(
                f,
                "{} of {} accepted events delivered, {} not delivered ({} failed, {} still \
                 pending at the close timeout)",
                self.dispatched,
                self.accepted,
                self.undelivered(),
                self.failed,
                self.pending_at_timeout
            )?;
        }
        write!(
            f,
            "; {} refused by process() (queue full or stopped)",
            self.dropped
        )?;
        if self.timed_out {
            write!(f, "; close timed out with dispatches still running")?;
        }
        if self.undelivered() > 0
            && let Some(e) = &self.last_error
        {
            write!(f, "; last error: {e}")?;
        }
        Ok(())
    }
}
