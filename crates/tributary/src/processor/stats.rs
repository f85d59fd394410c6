//! Processor counters: lock-free, readable at any time, mirrored to the `metrics` facade.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Metric: events `process()` accepted (counter).
pub const METRIC_ACCEPTED: &str = "tributary_processor_events_accepted_total";
/// Metric: events `process()` refused, labelled `reason` = `queue_full` | `stopped` (counter).
pub const METRIC_DROPPED: &str = "tributary_processor_events_dropped_total";
/// Metric: LogEvents handed to the dispatcher (counter).
pub const METRIC_BATCHES: &str = "tributary_processor_batches_total";
/// Metric: events the dispatcher reported delivered (counter).
pub const METRIC_DISPATCHED: &str = "tributary_processor_events_dispatched_total";
/// Metric: events that will not be delivered: dispatch failed, or too large to send (counter).
pub const METRIC_FAILED: &str = "tributary_processor_events_failed_total";
/// Metric: events waiting in the queue between `process()` and the batcher (gauge).
pub const METRIC_QUEUE_DEPTH: &str = "tributary_processor_queue_depth";

/// A point-in-time copy of a processor's counters.
///
/// Every accepted event ends up exactly once in `events_dispatched` or `events_failed`, so
/// [`ProcessorStats::pending`] is what is still on its way.
///
/// ```
/// use tributary::ProcessorStats;
/// let s = ProcessorStats { accepted: 10, events_dispatched: 7, events_failed: 1, ..Default::default() };
/// assert_eq!(s.pending(), 2);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorStats {
    /// Events `process()` returned `Ok` for.
    pub accepted: u64,
    /// Events refused because the queue was full.
    pub dropped_queue_full: u64,
    /// Events refused because the processor was stopped.
    pub dropped_stopped: u64,
    /// Requests handed to the dispatcher: one per [`LogEvent`](crate::LogEvent), i.e. per
    /// HTTP request with the HTTP dispatcher. Named `batches` after the seeds, but it is not
    /// the batcher's batch count: a batch over `max_batch_bytes`, or of several contexts,
    /// becomes several requests. (Exported as `tributary_processor_batches_total`.)
    pub batches: u64,
    /// Events the dispatcher reported delivered.
    pub events_dispatched: u64,
    /// Events that will not be delivered: the dispatcher failed, or the event alone was over
    /// `max_batch_bytes`.
    pub events_failed: u64,
}

impl ProcessorStats {
    /// All refused events, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_stopped
    }

    /// Requests handed to the dispatcher: the clearer name of [`ProcessorStats::batches`].
    ///
    /// ```
    /// use tributary::ProcessorStats;
    /// let s = ProcessorStats { batches: 3, ..Default::default() };
    /// assert_eq!(s.requests(), 3);
    /// ```
    pub fn requests(&self) -> u64 {
        self.batches
    }

    /// Accepted events neither dispatched nor failed yet.
    pub fn pending(&self) -> u64 {
        self.accepted
            .saturating_sub(self.events_dispatched)
            .saturating_sub(self.events_failed)
    }
}

/// Counters written by producer threads on the hot path. Kept on their own cache line so
/// the worker threads' writes do not bounce it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct ProducerCounters {
    pub(crate) accepted: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_stopped: AtomicU64,
    /// Set by the first queue-full drop, so only that one logs a warning.
    pub(crate) warned_full: AtomicBool,
}

/// Counters written by the batcher and dispatch threads.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct WorkerCounters {
    pub(crate) batches: AtomicU64,
    pub(crate) events_dispatched: AtomicU64,
    pub(crate) events_failed: AtomicU64,
}

/// All counters of one processor.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) producer: ProducerCounters,
    pub(crate) worker: WorkerCounters,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ProcessorStats {
        // Read the outcomes before `accepted` so a concurrent snapshot never shows more
        // events finished than accepted.
        let events_dispatched = self.worker.events_dispatched.load(Ordering::Acquire);
        let events_failed = self.worker.events_failed.load(Ordering::Acquire);
        let batches = self.worker.batches.load(Ordering::Acquire);
        ProcessorStats {
            accepted: self.producer.accepted.load(Ordering::Acquire),
            dropped_queue_full: self.producer.dropped_queue_full.load(Ordering::Relaxed),
            dropped_stopped: self.producer.dropped_stopped.load(Ordering::Relaxed),
            batches,
            events_dispatched,
            events_failed,
        }
    }

    /// Counts a queue-full refusal; the first one logs a warning.
    pub(crate) fn drop_full(&self) {
        self.producer
            .dropped_queue_full
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(METRIC_DROPPED, "reason" => "queue_full").increment(1);
        if !self.producer.warned_full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "event queue full: dropping events (this is logged once; the total is logged at close)"
            );
        }
    }

    /// Counts a refusal after stop.
    pub(crate) fn drop_stopped(&self) {
        self.producer
            .dropped_stopped
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(METRIC_DROPPED, "reason" => "stopped").increment(1);
    }

    /// Counts events that will not be delivered.
    pub(crate) fn fail(&self, n: u64) {
        if n > 0 {
            self.worker.events_failed.fetch_add(n, Ordering::AcqRel);
            metrics::counter!(METRIC_FAILED).increment(n);
        }
    }

    /// Counts one dispatch attempt of `total` events of which `delivered` got through.
    pub(crate) fn dispatched(&self, delivered: u64, total: u64) {
        self.worker.batches.fetch_add(1, Ordering::AcqRel);
        metrics::counter!(METRIC_BATCHES).increment(1);
        if delivered > 0 {
            self.worker
                .events_dispatched
                .fetch_add(delivered, Ordering::AcqRel);
            metrics::counter!(METRIC_DISPATCHED).increment(delivered);
        }
        self.fail(total.saturating_sub(delivered));
    }
}
