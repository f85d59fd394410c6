//! [`BatchEventProcessor`]: a bounded queue, a batcher thread and a dispatch thread.
//!
//! ```text
//! process() --try_send--> data queue (queue_capacity) --\
//! flush()/close() -----> control queue (CONTROL_CAPACITY) --> batcher thread
//!     batcher: batch by size / age / context -> EventFactory -> LogEvents
//!     --> dispatch queue (max_pending_batches) --> dispatch thread
//!     dispatch: LOG_EVENT listeners -> EventDispatcher::dispatch -> counters
//! ```
//!
//! Control messages have their own channel, so `flush()` and `close()` never wait behind a
//! full data queue. Neither thread needs an async runtime, so using or dropping the processor
//! inside one (a current-thread tokio runtime included) cannot deadlock: at worst `close()`
//! blocks the calling thread for `close_timeout`.

use std::mem;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{
    Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError, bounded, select_biased,
};

use crate::dispatcher::EventDispatcher;
use crate::event::{EventContext, UserEvent};
use crate::factory::EventFactory;
use crate::log_event::LogEvent;
use crate::notification::NotificationCenter;

use super::builder::{BatchEventProcessorBuilder, BuildError};
use super::stats::{Counters, METRIC_ACCEPTED, METRIC_QUEUE_DEPTH};
use super::{CloseReport, EventProcessor, ProcessError, ProcessorStats};

/// Control messages that may wait in their queue; `flush()` drops a flush request when the
/// queue is full, since a flush already queued covers it.
const CONTROL_CAPACITY: usize = 64;

/// Set in [`Shared::state`] once the processor stops taking events.
const STOPPED: u64 = 1 << 63;

/// State shared by callers and worker threads.
#[derive(Debug, Default)]
struct Shared {
    /// `STOPPED` bit, plus the number of `process()` calls between their stop check and the
    /// end of their enqueue. The batcher waits for that number to reach zero after stop is
    /// set, so no event is enqueued after its final drain (an `Ok` would otherwise be lost).
    state: AtomicU64,
    counters: Counters,
}

enum Control {
    /// Dispatch everything queued; the sender, if any, is told once it was dispatched.
    Flush(Option<Sender<()>>),
    /// Stop: drain, dispatch, exit.
    Stop,
}

enum ToDispatch {
    Batch(LogEvent),
    /// Everything before this was dispatched.
    Ack(Sender<()>),
    Stop,
}

/// What the threads need, kept until they start.
struct Parts {
    data_rx: Receiver<UserEvent>,
    ctrl_rx: Receiver<Control>,
    dispatcher: Box<dyn EventDispatcher>,
    notification_center: Option<Arc<NotificationCenter>>,
    factory: EventFactory,
    batch_size: usize,
    flush_interval: Duration,
    max_pending_batches: usize,
}

enum Lifecycle {
    NotStarted(Box<Parts>),
    /// `done` fires (or disconnects) when the dispatch thread exits.
    Running {
        done: Receiver<()>,
    },
    /// Closed; `done` is kept while the threads may still be finishing after a timed-out close.
    Closed {
        done: Option<Receiver<()>>,
    },
}

/// Batches user events and dispatches them from background threads.
///
/// Built with [`BatchEventProcessor::builder`]. Requests are sent when a batch reaches
/// `batch_size`, when its oldest event is `flush_interval` old, when an event of another
/// context arrives (revision, project, account, client, anonymize_ip, bot filtering, region
/// differ), on [`flush`](EventProcessor::flush), and on [`close`](EventProcessor::close),
/// [`stop`](Self::stop) or drop.
///
/// `process()` never blocks: when the queue is full it returns
/// [`ProcessError::QueueFull`] and counts the drop (the first drop logs a warning, close logs
/// the total). The processor does not retry: the dispatcher owns retries.
///
/// Dropping the processor closes it, waiting up to `close_timeout`.
///
/// ```
/// use std::sync::Arc;
/// use tributary::{BatchEventProcessor, Conversion, DispatchError, EventContext, EventDispatcher,
///     EventProcessor, LogEvent, UserEvent, UserEventKind};
///
/// struct Discard;
/// impl EventDispatcher for Discard {
///     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
/// }
///
/// let processor = BatchEventProcessor::builder().dispatcher(Discard).build().unwrap();
/// let ctx = Arc::new(EventContext::new("1", "2", "3"));
/// let event = UserEvent::new(ctx, "user-1", vec![], UserEventKind::Conversion(Conversion {
///     event_id: "7".into(), event_key: "purchase".into(), revenue: None, value: None, tags: None,
/// }));
/// processor.process(event).unwrap();
/// let report = processor.close();
/// assert_eq!(report.dispatched, 1);
/// ```
pub struct BatchEventProcessor {
    shared: Arc<Shared>,
    data_tx: Sender<UserEvent>,
    ctrl_tx: Sender<Control>,
    close_timeout: Duration,
    lifecycle: Mutex<Lifecycle>,
}

impl std::fmt::Debug for BatchEventProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEventProcessor")
            .field("stats", &self.stats())
            .field("queued", &self.data_tx.len())
            .finish_non_exhaustive()
    }
}

impl BatchEventProcessor {
    /// A builder with the default settings (see [`BatchEventProcessorBuilder`]).
    pub fn builder() -> BatchEventProcessorBuilder {
        BatchEventProcessorBuilder::default()
    }

    pub(crate) fn from_builder(b: BatchEventProcessorBuilder) -> Result<Self, BuildError> {
        let Some(dispatcher) = b.dispatcher else {
            return Err(BuildError::MissingDispatcher("no dispatcher".into()));
        };
        let (data_tx, data_rx) = bounded(b.queue_capacity);
        let (ctrl_tx, ctrl_rx) = bounded(CONTROL_CAPACITY);
        let parts = Parts {
            data_rx,
            ctrl_rx,
            dispatcher,
            notification_center: b.notification_center,
            factory: EventFactory::with_max_batch_bytes(b.max_batch_bytes),
            batch_size: b.batch_size,
            flush_interval: b.flush_interval,
            max_pending_batches: b.max_pending_batches,
        };
        let processor = BatchEventProcessor {
            shared: Arc::new(Shared::default()),
            data_tx,
            ctrl_tx,
            close_timeout: b.close_timeout,
            lifecycle: Mutex::new(Lifecycle::NotStarted(Box::new(parts))),
        };
        if b.start_on_init {
            processor.start()?;
        }
        Ok(processor)
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        // Nothing panics while holding this lock; if something did, the state is still valid.
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the worker threads, if not started yet (see
    /// [`start_on_init`](BatchEventProcessorBuilder::start_on_init)). Does nothing once
    /// started or closed.
    pub fn start(&self) -> Result<(), BuildError> {
        let mut lifecycle = self.lifecycle();
        if let Lifecycle::NotStarted(_) = &*lifecycle {
            let Lifecycle::NotStarted(parts) =
                mem::replace(&mut *lifecycle, Lifecycle::Closed { done: None })
            else {
                unreachable!("checked above")
            };
            match spawn(*parts, self.shared.clone()) {
                Ok(done) => *lifecycle = Lifecycle::Running { done },
                Err(e) => {
                    // The queue's receiver is gone with the failed thread: refuse events.
                    self.shared.state.fetch_or(STOPPED, Ordering::AcqRel);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes `event` if there is room in the queue. Never blocks.
    #[inline]
    pub fn process(&self, event: UserEvent) -> Result<(), ProcessError> {
        let shared = &*self.shared;
        let counters = &shared.counters;
        let prev = shared.state.fetch_add(1, Ordering::AcqRel);
        if prev & STOPPED != 0 {
            shared.state.fetch_sub(1, Ordering::Release);
            counters.drop_stopped();
            return Err(ProcessError::Stopped);
        }
        // Counted before the send so that no snapshot shows an event dispatched but not
        // accepted; undone below if the send fails.
        counters.producer.accepted.fetch_add(1, Ordering::Relaxed);
        let sent = self.data_tx.try_send(event);
        shared.state.fetch_sub(1, Ordering::Release);
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                counters.producer.accepted.fetch_sub(1, Ordering::Relaxed);
                counters.drop_full();
                Err(ProcessError::QueueFull)
            }
            Err(TrySendError::Disconnected(_)) => {
                counters.producer.accepted.fetch_sub(1, Ordering::Relaxed);
                counters.drop_stopped();
                Err(ProcessError::Stopped)
            }
        }
    }

    /// Asks the batcher to dispatch everything queued so far. Does not wait.
    pub fn flush(&self) {
        // Full means flushes are already waiting; the first of them covers this one too.
        let _ = self.ctrl_tx.try_send(Control::Flush(None));
    }

    /// Flushes and waits until everything accepted before this call has been handed to the
    /// dispatcher and the dispatcher returned. Returns false if that did not happen within
    /// `timeout`, or if the processor is not running.
    pub fn flush_and_wait(&self, timeout: Duration) -> bool {
        if !matches!(&*self.lifecycle(), Lifecycle::Running { .. }) {
            return false;
        }
        let deadline = deadline_after(timeout);
        let (ack_tx, ack_rx) = bounded(1);
        let sent = match deadline {
            Some(d) => self
                .ctrl_tx
                .send_deadline(Control::Flush(Some(ack_tx)), d)
                .is_ok(),
            None => self.ctrl_tx.send(Control::Flush(Some(ack_tx))).is_ok(),
        };
        sent && match deadline {
            Some(d) => ack_rx.recv_deadline(d).is_ok(),
            None => ack_rx.recv().is_ok(),
        }
    }

    /// Same as [`close`](EventProcessor::close), under the seeds' name.
    pub fn stop(&self) -> CloseReport {
        self.close()
    }

    /// Events waiting in the queue for the batcher.
    pub fn queue_len(&self) -> usize {
        self.data_tx.len()
    }

    /// The processor's counters now.
    pub fn stats(&self) -> ProcessorStats {
        self.shared.counters.snapshot()
    }

    /// Stops intake, dispatches everything accepted, waits up to `close_timeout` for the
    /// dispatcher, and reports. Idempotent: a second call reports again without waiting.
    pub fn close(&self) -> CloseReport {
        let started = Instant::now();
        let mut lifecycle = self.lifecycle();
        let done = match mem::replace(&mut *lifecycle, Lifecycle::Closed { done: None }) {
            Lifecycle::NotStarted(parts) => match spawn(*parts, self.shared.clone()) {
                Ok(done) => done,
                Err(e) => {
                    self.shared.state.fetch_or(STOPPED, Ordering::AcqRel);
                    tracing::error!(error = %e, "event processor could not start to drain its queue at close");
                    return CloseReport::from_stats(&self.stats(), started.elapsed());
                }
            },
            Lifecycle::Running { done } => done,
            Lifecycle::Closed { done } => {
                // Already closed: report, and forget the threads once they are done.
                let still_running = done
                    .as_ref()
                    .is_some_and(|d| matches!(d.try_recv(), Err(TryRecvError::Empty)));
                if still_running {
                    *lifecycle = Lifecycle::Closed { done };
                }
                return CloseReport::from_stats(&self.stats(), started.elapsed());
            }
        };
        // From here on process() refuses events; the batcher drains what was accepted.
        self.shared.state.fetch_or(STOPPED, Ordering::AcqRel);
        let deadline = deadline_after(self.close_timeout);
        let finished = match deadline {
            Some(d) => {
                self.ctrl_tx.send_deadline(Control::Stop, d).is_ok()
                    && !matches!(done.recv_deadline(d), Err(RecvTimeoutError::Timeout))
            }
            None => {
                let _ = self.ctrl_tx.send(Control::Stop);
                let _ = done.recv();
                true
            }
        };
        let report = CloseReport::from_stats(&self.stats(), started.elapsed());
        if finished {
            *lifecycle = Lifecycle::Closed { done: None };
        } else {
            *lifecycle = Lifecycle::Closed { done: Some(done) };
            tracing::warn!(
                pending = report.pending_at_timeout,
                timeout_ms = self.close_timeout.as_millis() as u64,
                "event processor close timed out; pending events may be lost"
            );
        }
        if report.dropped > 0 {
            tracing::warn!(
                dropped = report.dropped,
                "event processor refused events during its life (queue full or stopped)"
            );
        }
        tracing::info!(
            dispatched = report.dispatched,
            failed = report.failed,
            dropped = report.dropped,
            pending = report.pending_at_timeout,
            "event processor closed"
        );
        report
    }
}

impl EventProcessor for BatchEventProcessor {
    fn process(&self, event: UserEvent) -> Result<(), ProcessError> {
        BatchEventProcessor::process(self, event)
    }

    fn flush(&self) {
        BatchEventProcessor::flush(self)
    }

    fn close(&self) -> CloseReport {
        BatchEventProcessor::close(self)
    }

    fn stats(&self) -> ProcessorStats {
        BatchEventProcessor::stats(self)
    }
}

impl Drop for BatchEventProcessor {
    fn drop(&mut self) {
        self.close();
    }
}

/// `now + d`, or `None` (no deadline) if that is past what `Instant` can hold.
fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// Starts the dispatch and batcher threads. Returns the receiver that fires when the
/// dispatch thread (the last to finish) exits.
fn spawn(parts: Parts, shared: Arc<Shared>) -> Result<Receiver<()>, BuildError> {
    let Parts {
        data_rx,
        ctrl_rx,
        dispatcher,
        notification_center,
        factory,
        batch_size,
        flush_interval,
        max_pending_batches,
    } = parts;
    let (dispatch_tx, dispatch_rx) = bounded(max_pending_batches);
    let (done_tx, done_rx) = bounded(1);
    let dispatch_shared = shared.clone();
    thread::Builder::new()
        .name("tributary-dispatch".into())
        .spawn(move || {
            let _done = DoneGuard(done_tx);
            dispatch_loop(
                &dispatch_rx,
                &*dispatcher,
                notification_center.as_deref(),
                &dispatch_shared,
            );
        })
        .map_err(|source| BuildError::Spawn {
            thread: "dispatch",
            source,
        })?;
    let batcher = Batcher {
        data_rx,
        ctrl_rx,
        dispatch_tx,
        factory,
        batch_size,
        flush_interval,
        batch: Vec::with_capacity(batch_size.min(4096)),
        deadline: None,
        received: 0,
        shared,
    };
    // If this fails the closure, with `dispatch_tx`, is dropped and the dispatch thread exits.
    thread::Builder::new()
        .name("tributary-batcher".into())
        .spawn(move || batcher.run())
        .map_err(|source| BuildError::Spawn {
            thread: "batcher",
            source,
        })?;
    Ok(done_rx)
}

/// Signals `done` when the dispatch thread ends, however it ends.
struct DoneGuard(Sender<()>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

struct Batcher {
    data_rx: Receiver<UserEvent>,
    ctrl_rx: Receiver<Control>,
    dispatch_tx: Sender<ToDispatch>,
    factory: EventFactory,
    batch_size: usize,
    flush_interval: Duration,
    batch: Vec<UserEvent>,
    /// When the current batch must go: its first event's arrival plus `flush_interval`.
    deadline: Option<Instant>,
    /// Events taken from the queue and not yet reported to the metrics facade.
    received: u64,
    shared: Arc<Shared>,
}

// Lives on the batcher's stack for one loop turn; boxing the event would allocate per event.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Control(Control),
    Event(UserEvent),
    Deadline,
    /// The processor is gone (dropped without close): treat as stop.
    Disconnected,
}

impl Batcher {
    fn run(mut self) {
        loop {
            // Biased to control so that a flood of events cannot delay stop or flush.
            let wake = match self.deadline {
                None => select_biased! {
                    recv(self.ctrl_rx) -> c => c.map_or(Wake::Disconnected, Wake::Control),
                    recv(self.data_rx) -> e => e.map_or(Wake::Disconnected, Wake::Event),
                },
                Some(deadline) => select_biased! {
                    recv(self.ctrl_rx) -> c => c.map_or(Wake::Disconnected, Wake::Control),
                    recv(self.data_rx) -> e => e.map_or(Wake::Disconnected, Wake::Event),
                    default(deadline.saturating_duration_since(Instant::now())) => Wake::Deadline,
                },
            };
            match wake {
                Wake::Event(event) => {
                    self.add(event);
                    // Take what is already queued without going through select again, up to
                    // one batch, then look at control messages again.
                    for _ in 1..self.batch_size {
                        match self.data_rx.try_recv() {
                            Ok(event) => self.add(event),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Deadline => self.flush_batch(),
                Wake::Control(Control::Flush(ack)) => {
                    // Events accepted before flush() was called are in the queue now; take
                    // only those, so a steady stream of new events cannot prolong the flush.
                    for _ in 0..self.data_rx.len() {
                        match self.data_rx.try_recv() {
                            Ok(event) => self.add(event),
                            Err(_) => break,
                        }
                    }
                    self.flush_batch();
                    if let Some(ack) = ack {
                        let _ = self.dispatch_tx.send(ToDispatch::Ack(ack));
                    }
                }
                Wake::Control(Control::Stop) | Wake::Disconnected => {
                    self.stop();
                    return;
                }
            }
        }
    }

    fn add(&mut self, event: UserEvent) {
        self.received += 1;
        if let Some(first) = self.batch.first()
            && !same_context(&first.context, &event.context)
        {
            self.flush_batch();
        }
        if self.batch.is_empty() {
            self.deadline = Instant::now().checked_add(self.flush_interval);
        }
        self.batch.push(event);
        if self.batch.len() >= self.batch_size {
            self.flush_batch();
        }
    }

    fn flush_batch(&mut self) {
        self.deadline = None;
        if self.received > 0 {
            metrics::counter!(METRIC_ACCEPTED).increment(self.received);
            self.received = 0;
        }
        metrics::gauge!(METRIC_QUEUE_DEPTH).set(self.data_rx.len() as f64);
        if self.batch.is_empty() {
            return;
        }
        let out = self.factory.create_log_events(&self.batch);
        let counters = &self.shared.counters;
        for oversized in &out.oversized {
            tracing::error!(
                uuid = %oversized.uuid,
                size = oversized.size,
                limit = oversized.limit,
                "event too large to send on its own; counted as failed"
            );
        }
        counters.fail(out.oversized.len() as u64);
        for log_event in out.log_events {
            let n = log_event.visitor_count() as u64;
            // Blocks while the dispatcher is `max_pending_batches` behind: the data queue
            // then fills and process() reports QueueFull, instead of memory growing.
            if self.dispatch_tx.send(ToDispatch::Batch(log_event)).is_err() {
                // The dispatch thread is gone (it cannot panic, but be safe): count, not lose.
                counters.fail(n);
            }
        }
        self.batch.clear();
    }

    fn stop(&mut self) {
        let shared = &self.shared;
        shared.state.fetch_or(STOPPED, Ordering::AcqRel);
        // Wait for process() calls that passed the stop check to finish their send; each
        // takes nanoseconds, so yielding is enough.
        while shared.state.load(Ordering::Acquire) & !STOPPED != 0 {
            thread::yield_now();
        }
        while let Ok(event) = self.data_rx.try_recv() {
            self.add(event);
        }
        self.flush_batch();
        let _ = self.dispatch_tx.send(ToDispatch::Stop);
    }
}

fn same_context(a: &Arc<EventContext>, b: &Arc<EventContext>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

fn dispatch_loop(
    rx: &Receiver<ToDispatch>,
    dispatcher: &dyn EventDispatcher,
    center: Option<&NotificationCenter>,
    shared: &Shared,
) {
    let counters = &shared.counters;
    while let Ok(msg) = rx.recv() {
        match msg {
            ToDispatch::Batch(log_event) => {
                if let Some(center) = center {
                    center.send_log_event(&log_event);
                }
                let total = log_event.visitor_count();
                let delivered =
                    match catch_unwind(AssertUnwindSafe(|| dispatcher.dispatch(&log_event))) {
                        Ok(Ok(())) => total,
                        Ok(Err(e)) => {
                            let delivered = e.delivered_of(total);
                            tracing::warn!(
                                error = %e,
                                events = total,
                                delivered,
                                "dispatch failed; the processor does not retry"
                            );
                            delivered
                        }
                        Err(_) => {
                            tracing::error!(
                                events = total,
                                "event dispatcher panicked; its events are counted as failed"
                            );
                            0
                        }
                    };
                counters.dispatched(delivered as u64, total as u64);
            }
            ToDispatch::Ack(ack) => {
                let _ = ack.try_send(());
            }
            ToDispatch::Stop => return,
        }
    }
}
