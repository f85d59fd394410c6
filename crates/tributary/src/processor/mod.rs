//! Event processors: where user events go in.
//!
//! - [`BatchEventProcessor`]: the default. `process()` puts the event on a bounded queue and
//!   returns at once; a background thread batches events and a second one dispatches them.
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
pub use builder::{BatchEventProcessorBuilder, BuildError, env};
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

/// What [`EventProcessor::close`] achieved.
///
/// Counts are totals over the processor's life. `pending_at_timeout` is non-zero only when the
/// close timeout passed first (a hanging dispatcher, say): those accepted events were neither
/// delivered nor failed yet, and the worker threads were left to finish on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Events the dispatcher reported delivered.
    pub dispatched: u64,
    /// Events that will not be delivered (dispatch failed, or too large).
    pub failed: u64,
    /// Events `process()` refused (queue full, or after stop).
    pub dropped: u64,
    /// Accepted events still on their way when close gave up waiting.
    pub pending_at_timeout: u64,
    /// How long close waited.
    pub waited: Duration,
}

impl CloseReport {
    pub(crate) fn from_stats(stats: &ProcessorStats, waited: Duration) -> Self {
        CloseReport {
            dispatched: stats.events_dispatched,
            failed: stats.events_failed,
            dropped: stats.dropped(),
            pending_at_timeout: stats.pending(),
            waited,
        }
    }

    /// Whether close finished before its timeout.
    pub fn completed(&self) -> bool {
        self.pending_at_timeout == 0
    }
}
