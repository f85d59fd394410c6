//! [`BatchEventProcessor`]: a bounded queue, a batcher thread and `dispatch_concurrency`
//! dispatch worker threads.
//!
//! ```text
//! process() --try_send--> data queue (queue_capacity) --\
//! flush()/close() -----> control queue (CONTROL_CAPACITY) --> batcher thread
//!     batcher: batch by size / age / context, numbered
//!     --> dispatch queue (max_pending_batches) --> dispatch workers (dispatch_concurrency)
//!     worker: EventFactory -> LogEvents -> LOG_EVENT listeners
//!             -> EventDispatcher::dispatch_with_deadline -> counters -> Progress::finish(seq)
//! ```
//!
//! The workers, not the batcher, turn batches into requests: serialising is most of the
//! pipeline's work, and the batcher is one thread while the workers are as many as the
//! load needs, so with a fast dispatcher serialisation runs on every core instead of one.
//!
//! Control messages have their own channel, so `flush()` and `close()` never wait behind a
//! full data queue. A flush ack is fired by [`Progress`] once every request numbered before
//! it has returned from the dispatcher, whichever worker ran it. No thread needs an async
//! runtime, so using or dropping the processor inside one (a current-thread tokio runtime
//! included) cannot deadlock: at worst `close()` blocks the calling thread for
//! `close_timeout` (`close_async` does not block it at all).

use std::collections::BTreeSet;
use std::mem;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{
    Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError, TrySendError, bounded,
    select_biased,
};

use crate::dispatcher::{DispatchDeadline, EventDispatcher};
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

/// How long before `close()`'s own deadline the dispatch deadline falls, at most: the time
/// left for workers to count their last results and exit, so the report is exact.
const CLOSE_MARGIN: Duration = Duration::from_millis(250);

/// How long batches may sit in the dispatch queue, with no worker waiting to take them,
/// before the idle batcher starts more workers (see [`Workers::top_up`]).
const TOP_UP_AFTER: Duration = Duration::from_millis(1);

/// State shared by callers and worker threads.
#[derive(Debug, Default)]
struct Shared {
    /// `STOPPED` bit, plus the number of `process()` calls between their stop check and the
    /// end of their enqueue. The batcher waits for that number to reach zero after stop is
    /// set, so no event is enqueued after its final drain (an `Ok` would otherwise be lost).
    state: AtomicU64,
    counters: Counters,
    /// Given to every dispatch; `close()` sets it a little before its own deadline.
    deadline: DispatchDeadline,
    /// The last dispatch error (or oversized event), for the close report.
    last_error: Mutex<Option<String>>,
    progress: Mutex<Progress>,
}

impl Shared {
    fn set_last_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which numbered batches have been dispatched (every request made of them returned from
/// the dispatcher), and the flush acks waiting for them. Batches are numbered by the
/// batcher from 0; several workers finish them in any order.
#[derive(Debug, Default)]
struct Progress {
    /// Every batch numbered below this has finished.
    finished_below: u64,
    /// Finished batches at or above `finished_below` (at most one per worker).
    finished_ahead: BTreeSet<u64>,
    /// Acks to send once `finished_below` reaches their number.
    acks: Vec<(u64, Sender<()>)>,
}

impl Progress {
    fn finish(&mut self, seq: u64) {
        self.finished_ahead.insert(seq);
        while self.finished_ahead.remove(&self.finished_below) {
            self.finished_below += 1;
        }
        let below = self.finished_below;
        self.acks.retain(|(target, ack)| {
            if *target <= below {
                let _ = ack.try_send(());
                false
            } else {
                true
            }
        });
    }

    /// Sends `ack` once every batch numbered below `target` has finished.
    fn ack_when(&mut self, target: u64, ack: Sender<()>) {
        if target <= self.finished_below {
            let _ = ack.try_send(());
        } else {
            self.acks.push((target, ack));
        }
    }
}

enum Control {
    /// Dispatch everything queued; the sender, if any, is told once it was dispatched.
    Flush(Option<Sender<()>>),
    /// Stop: drain, dispatch, exit.
    Stop,
}

/// A batch for the dispatch workers, numbered for [`Progress`]. The worker serialises it
/// into requests and frees its events, both off the batcher's thread: the batcher is one
/// thread for the whole pipeline, and these were nearly all of its time.
struct Numbered {
    seq: u64,
    batch: Vec<UserEvent>,
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
    dispatch_concurrency: usize,
}

/// A close under way: what waiting for it needs.
struct Closing {
    started: Instant,
    done: Receiver<()>,
    deadline: Option<Instant>,
}

enum Lifecycle {
    NotStarted(Box<Parts>),
    /// `done` disconnects when the last dispatch worker exits.
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
/// differ), on [`flush`](EventProcessor::flush), and on [`close`](Self::close) or drop.
///
/// # Throughput and latency
///
/// Up to [`dispatch_concurrency`](BatchEventProcessorBuilder::dispatch_concurrency) requests
/// (default 32) are in flight at once, each of up to `batch_size` events (default 10), so
/// the processor delivers about `dispatch_concurrency × batch_size / round-trip` events per
/// second: 6,400/s against an upstream 50 ms away with the defaults. Plan on about half
/// that, **3,000 events/s at 50 ms**, for sustained load; the default queue
/// ([`queue_capacity`](BatchEventProcessorBuilder::queue_capacity), 10,000 events) absorbs
/// bursts above it. See `docs/library.md` for sizing.
///
/// # Refusals and back-pressure
///
/// [`process`](Self::process) never blocks: when the queue is full it returns
/// [`ProcessError::QueueFull`] and counts the drop (the first drop logs a warning, close
/// logs and reports the total). Callers who prefer to wait use
/// [`process_timeout`](Self::process_timeout). The processor does not retry: the dispatcher
/// owns retries.
///
/// # Ordering
///
/// Several requests are in flight at once, so they may reach the upstream in any order;
/// events of one batch stay together. [`flush_and_wait`](Self::flush_and_wait) returns
/// only when every event batched before it has returned from the dispatcher, whichever
/// worker sent it. `LOG_EVENT` listeners are called once per request, on the worker thread
/// that sends it, so several may run at once.
///
/// # Exit
///
/// [`close`](Self::close) (also run on drop) stops intake, dispatches everything accepted
/// and waits up to `close_timeout` (default 5 s). A dispatcher that honours
/// [`EventDispatcher::dispatch_with_deadline`] (the HTTP dispatcher does) cuts its retries,
/// also of requests already in flight, to end a little before that, so the
/// [`CloseReport`] says exactly what was not delivered and why (the last error) rather than
/// leaving it pending. A spool dispatcher (`tributary_spool::SpoolDispatcher`) appends in
/// milliseconds and close waits for its appends: nothing accepted is lost at exit.
///
/// # In async services
///
/// `close()` blocks the calling thread for up to `close_timeout`. On a tokio runtime use
/// [`close_async`](Self::close_async), which waits on a thread of its own and never blocks
/// a runtime thread. This matters most on a **current-thread** runtime (`#[tokio::main(flavor
/// = "current_thread")]`, `#[tokio::test]`) with a dispatcher that hands each request to a
/// task spawned on that runtime and waits for it: a sync `close()` on the runtime's only
/// thread keeps those tasks from running, so no dispatch can finish, and close stalls for
/// its whole timeout and reports everything pending (the requests go out later, after it
/// returned). `close_async().await` lets the tasks run. The same applies to dropping the
/// processor there: call `close_async().await` first, then the drop does not wait.
/// The dispatchers of this crate and of `tributary-spool` run on private runtimes of their
/// own and do not need this, but `close_async` is right for them too. See the
/// `async_dispatcher` example.
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
/// assert!(report.is_complete(), "{report}");
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
            dispatch_concurrency: b.dispatch_concurrency,
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

    /// Takes `event` if there is room in the queue. Never blocks: when the queue is full it
    /// returns [`ProcessError::QueueFull`] (counted in
    /// [`ProcessorStats::dropped_queue_full`]); after close, [`ProcessError::Stopped`].
    #[inline]
    pub fn process(&self, event: UserEvent) -> Result<(), ProcessError> {
        self.enqueue(event, |tx, event| {
            tx.try_send(event).map_err(|e| match e {
                TrySendError::Full(_) => SendTimeoutError::Timeout(()),
                TrySendError::Disconnected(_) => SendTimeoutError::Disconnected(()),
            })
        })
    }

    /// Takes `event`, waiting up to `timeout` for room in the queue when it is full; then
    /// [`ProcessError::QueueFull`] (counted as a drop, as with [`process`](Self::process)).
    /// For callers who prefer to slow down over losing events, off async runtime threads
    /// (it blocks the calling thread). A zero `timeout` is `process`. If the processor is
    /// closed while this waits, the event is still taken and dispatched.
    ///
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// # use tributary::{BatchEventProcessor, Conversion, DispatchError, EventContext,
    /// #     EventDispatcher, LogEvent, UserEvent, UserEventKind};
    /// # struct Discard;
    /// # impl EventDispatcher for Discard {
    /// #     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
    /// # }
    /// let processor = BatchEventProcessor::builder().dispatcher(Discard).build()?;
    /// # let ctx = Arc::new(EventContext::new("1", "2", "3"));
    /// # let event = UserEvent::new(ctx, "user-1", vec![], UserEventKind::Conversion(Conversion {
    /// #     event_id: "7".into(), event_key: "purchase".into(), revenue: None, value: None, tags: None,
    /// # }));
    /// processor.process_timeout(event, Duration::from_millis(100))?;
    /// assert_eq!(processor.close().dispatched, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn process_timeout(&self, event: UserEvent, timeout: Duration) -> Result<(), ProcessError> {
        if timeout.is_zero() {
            return self.process(event);
        }
        let deadline = deadline_after(timeout);
        self.enqueue(event, move |tx, event| match deadline {
            Some(d) => tx.send_deadline(event, d).map_err(|e| match e {
                SendTimeoutError::Timeout(_) => SendTimeoutError::Timeout(()),
                SendTimeoutError::Disconnected(_) => SendTimeoutError::Disconnected(()),
            }),
            None => tx
                .send(event)
                .map_err(|_| SendTimeoutError::Disconnected(())),
        })
    }

    /// The stop check, the counters, and `send` in between.
    #[inline]
    fn enqueue(
        &self,
        event: UserEvent,
        send: impl FnOnce(&Sender<UserEvent>, UserEvent) -> Result<(), SendTimeoutError<()>>,
    ) -> Result<(), ProcessError> {
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
        let sent = send(&self.data_tx, event);
        shared.state.fetch_sub(1, Ordering::Release);
        match sent {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(())) => {
                counters.producer.accepted.fetch_sub(1, Ordering::Relaxed);
                counters.drop_full();
                Err(ProcessError::QueueFull)
            }
            Err(SendTimeoutError::Disconnected(())) => {
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
    /// dispatcher and the dispatcher returned (with several requests in flight: all of
    /// them). Returns false if that did not happen within `timeout`, or if the processor is
    /// not running.
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

    /// Same as [`close`](Self::close), under the seeds' name.
    #[deprecated(
        since = "0.1.0",
        note = "use close() (or close_async().await): the same, under one name"
    )]
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
    /// dispatcher, and reports. Blocks the calling thread (see
    /// [`close_async`](Self::close_async) for async code).
    ///
    /// Once close starts, the processor's [`DispatchDeadline`] is set to a little before
    /// the close deadline (`close_timeout` less 10 %, at most 250 ms less), so a dispatcher
    /// that honours it returns by then and every event is reported delivered or failed.
    ///
    /// Idempotent: a later call (or one made while another close waits) reports at once
    /// without waiting.
    pub fn close(&self) -> CloseReport {
        self.close_for(self.close_timeout)
    }

    /// [`close`](Self::close), waiting until `deadline` instead of `close_timeout`: for a
    /// caller whose own time budget already started (a stop that first drained a queue of
    /// its own).
    pub fn close_within(&self, deadline: Instant) -> CloseReport {
        self.close_for(deadline.saturating_duration_since(Instant::now()))
    }

    fn close_for(&self, timeout: Duration) -> CloseReport {
        let closing = match self.begin_close(timeout) {
            Ok(closing) => closing,
            Err(report) => return report,
        };
        let finished = wait_stopped(&self.ctrl_tx, &closing.done, closing.deadline, false);
        self.finish_close(closing, finished)
    }

    /// [`close`](Self::close) for async code: the same, but the wait runs on a thread of its
    /// own (`tributary-close`) and this awaits it, so no runtime thread is ever blocked,
    /// also on a current-thread runtime where a dispatcher's own tasks must keep running
    /// for the close to finish (see [In async services](Self#in-async-services)). Needs no
    /// particular runtime (it awaits a `tokio::sync::oneshot`).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tributary::{BatchEventProcessor, DispatchError, EventDispatcher, LogEvent};
    /// # struct Discard;
    /// # impl EventDispatcher for Discard {
    /// #     fn dispatch(&self, _: &LogEvent) -> Result<(), DispatchError> { Ok(()) }
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let processor = BatchEventProcessor::builder().dispatcher(Discard).build().unwrap();
    /// // ... processor.process(event) ...
    /// let report = processor.close_async().await;
    /// assert!(report.is_complete(), "{report}");
    /// # });
    /// ```
    pub async fn close_async(&self) -> CloseReport {
        let closing = match self.begin_close(self.close_timeout) {
            Ok(closing) => closing,
            Err(report) => return report,
        };
        // Usually there is room (the control queue holds 64); if not, the waiter sends it.
        let stop_sent = self.ctrl_tx.try_send(Control::Stop).is_ok();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (ctrl, done, deadline) = (self.ctrl_tx.clone(), closing.done.clone(), closing.deadline);
        let spawned = thread::Builder::new()
            .name("tributary-close".into())
            .spawn(move || {
                let _ = tx.send(wait_stopped(&ctrl, &done, deadline, stop_sent));
            });
        let finished = match spawned {
            Ok(_) => rx.await.unwrap_or(false),
            Err(e) => {
                // Never block the runtime: report what is pending; the threads finish alone.
                tracing::error!(error = %e, "could not start a thread to wait for close; not waiting");
                matches!(closing.done.try_recv(), Err(TryRecvError::Disconnected))
            }
        };
        self.finish_close(closing, finished)
    }

    /// Moves to `Closed`, stops intake and sets the dispatch deadline; `Err` is the report
    /// when there is nothing to wait for.
    fn begin_close(&self, timeout: Duration) -> Result<Closing, CloseReport> {
        let started = Instant::now();
        let mut lifecycle = self.lifecycle();
        let done = match mem::replace(&mut *lifecycle, Lifecycle::Closed { done: None }) {
            Lifecycle::NotStarted(parts) => match spawn(*parts, self.shared.clone()) {
                Ok(done) => done,
                Err(e) => {
                    self.shared.state.fetch_or(STOPPED, Ordering::AcqRel);
                    tracing::error!(error = %e, "event processor could not start to drain its queue at close");
                    self.shared
                        .set_last_error(format!("could not start to drain the queue: {e}"));
                    return Err(self.report(started, true));
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
                return Err(self.report(started, still_running));
            }
        };
        // From here on process() refuses events; the batcher drains what was accepted.
        self.shared.state.fetch_or(STOPPED, Ordering::AcqRel);
        let deadline = deadline_after(timeout);
        if let Some(d) = deadline {
            let margin = (timeout / 10).min(CLOSE_MARGIN);
            self.shared
                .deadline
                .set(d.checked_sub(margin).unwrap_or(started));
        }
        *lifecycle = Lifecycle::Closed {
            done: Some(done.clone()),
        };
        Ok(Closing {
            started,
            done,
            deadline,
        })
    }

    fn finish_close(&self, closing: Closing, finished: bool) -> CloseReport {
        if finished {
            let mut lifecycle = self.lifecycle();
            if let Lifecycle::Closed { done } = &mut *lifecycle {
                *done = None;
            }
        }
        let report = self.report(closing.started, !finished);
        if !finished {
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
        if report.failed > 0 {
            tracing::warn!(
                failed = report.failed,
                last_error = report.last_error.as_deref().unwrap_or(""),
                "events not delivered"
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

    fn report(&self, started: Instant, timed_out: bool) -> CloseReport {
        CloseReport::from_stats(
            &self.stats(),
            started.elapsed(),
            timed_out,
            self.shared.last_error(),
        )
    }
}

impl EventProcessor for BatchEventProcessor {
    fn process(&self, event: UserEvent) -> Result<(), ProcessError> {
        BatchEventProcessor::process(self, event)
    }

    fn process_timeout(&self, event: UserEvent, timeout: Duration) -> Result<(), ProcessError> {
        BatchEventProcessor::process_timeout(self, event, timeout)
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

/// Sends `Stop` (unless already sent) and waits for the last dispatch worker to exit, until
/// `deadline`. Returns whether it exited.
fn wait_stopped(
    ctrl_tx: &Sender<Control>,
    done: &Receiver<()>,
    deadline: Option<Instant>,
    stop_sent: bool,
) -> bool {
    match deadline {
        Some(d) => {
            (stop_sent || ctrl_tx.send_deadline(Control::Stop, d).is_ok())
                && !matches!(done.recv_deadline(d), Err(RecvTimeoutError::Timeout))
        }
        None => {
            if !stop_sent {
                let _ = ctrl_tx.send(Control::Stop);
            }
            let _ = done.recv();
            true
        }
    }
}

/// `now + d`, or `None` (no deadline) if that is past what `Instant` can hold.
fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// Starts the dispatch workers and the batcher thread. Returns the receiver that
/// disconnects when the last dispatch worker (the last thread to finish) exits.
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
        dispatch_concurrency,
    } = parts;
    let (dispatch_tx, dispatch_rx) = bounded::<Numbered>(max_pending_batches);
    let factory = Arc::new(factory);
    // Never sent on: the workers and the batcher each hold a clone; the last to exit
    // disconnects it.
    let (done_tx, done_rx) = bounded::<()>(1);
    let mut workers = Workers {
        rx: dispatch_rx,
        factory,
        dispatcher: Arc::from(dispatcher),
        center: notification_center,
        shared: shared.clone(),
        done: done_tx,
        idle: Arc::new(AtomicUsize::new(0)),
        started: 0,
        max: dispatch_concurrency.max(1),
    };
    // If this fails, `dispatch_tx` is dropped on return and nothing was started.
    workers.start_one().map_err(|source| BuildError::Spawn {
        thread: "dispatch",
        source,
    })?;
    let batcher = Batcher {
        data_rx,
        ctrl_rx,
        dispatch_tx,
        workers,
        batch_size,
        flush_interval,
        batch: Vec::with_capacity(batch_size.min(4096)),
        deadline: None,
        received: 0,
        next_seq: 0,
        shared,
    };
    // If this fails the closure, with `dispatch_tx`, is dropped and the workers exit.
    thread::Builder::new()
        .name("tributary-batcher".into())
        .spawn(move || batcher.run())
        .map_err(|source| BuildError::Spawn {
            thread: "batcher",
            source,
        })?;
    Ok(done_rx)
}

/// The dispatch workers, started on demand up to `max`: the batcher starts one more when a
/// batch is ready and no worker is waiting for it, and more when batches have waited in the
/// queue with no worker to take them ([`Workers::top_up`]). A fast dispatcher then runs on a
/// few threads, and a slow upstream still gets `dispatch_concurrency` requests in flight.
/// (With all 32 started up front, the idle ones spinning on the queue after each request
/// took a third to a half of the batcher's throughput on two cores.)
///
/// Field order matters: dropping the dispatcher before `done` keeps the rule that the
/// last holder drops the dispatcher (joining its threads, flushing a spool) before `done`
/// disconnects, so close() waits for that too.
struct Workers {
    rx: Receiver<Numbered>,
    factory: Arc<EventFactory>,
    dispatcher: Arc<dyn EventDispatcher>,
    center: Option<Arc<NotificationCenter>>,
    shared: Arc<Shared>,
    done: Sender<()>,
    /// Workers waiting in `recv`.
    idle: Arc<AtomicUsize>,
    started: usize,
    max: usize,
}

impl Workers {
    fn start_one(&mut self) -> std::io::Result<()> {
        let (rx, factory, dispatcher, center, shared, done, idle) = (
            self.rx.clone(),
            self.factory.clone(),
            self.dispatcher.clone(),
            self.center.clone(),
            self.shared.clone(),
            self.done.clone(),
            self.idle.clone(),
        );
        thread::Builder::new()
            .name(format!("tributary-dispatch-{}", self.started))
            .spawn(move || {
                let worker = Worker {
                    factory: &factory,
                    dispatcher: &*dispatcher,
                    center: center.as_deref(),
                    shared: &shared,
                };
                worker.run(&rx, &idle);
                drop(dispatcher);
                drop(done);
            })?;
        self.started += 1;
        Ok(())
    }

    /// Starts a worker, as the bound allows, for each batch queued beyond the number of
    /// workers counted as waiting in `recv`. [`Self::ensure_free`] alone can leave batches
    /// behind: a worker just woken for one batch still counts as waiting, so a burst handed
    /// over before it runs again starts no worker and queues behind it. The count is rough
    /// either way (a worker started a moment ago is not waiting yet, one that just took a
    /// batch still is), so the batcher calls this again every [`TOP_UP_AFTER`] while it is
    /// idle with batches queued; at stop it calls [`Self::start_for`] with the whole queue.
    fn top_up(&mut self) {
        let unserved = self
            .rx
            .len()
            .saturating_sub(self.idle.load(Ordering::Acquire));
        self.start_for(unserved);
    }

    /// Starts up to `batches` workers, as the bound allows.
    fn start_for(&mut self, batches: usize) {
        for _ in 0..batches.min(self.max.saturating_sub(self.started)) {
            if let Err(e) = self.start_one() {
                tracing::warn!(error = %e, workers = self.started, "cannot start another dispatch worker; going on with those running");
                self.max = self.started;
                return;
            }
        }
    }

    /// Starts a worker if none is free to take the next request and the bound allows.
    fn ensure_free(&mut self) {
        if self.idle.load(Ordering::Acquire) == 0 {
            self.start_for(1);
        }
    }
}

struct Batcher {
    data_rx: Receiver<UserEvent>,
    ctrl_rx: Receiver<Control>,
    dispatch_tx: Sender<Numbered>,
    workers: Workers,
    batch_size: usize,
    flush_interval: Duration,
    batch: Vec<UserEvent>,
    /// When the current batch must go: its first event's arrival plus `flush_interval`.
    deadline: Option<Instant>,
    /// Events taken from the queue and not yet reported to the metrics facade.
    received: u64,
    /// The number of the next batch; every batch below it was handed to the workers.
    next_seq: u64,
    shared: Arc<Shared>,
}

// Lives on the batcher's stack for one loop turn; boxing the event would allocate per event.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Control(Control),
    Event(UserEvent),
    Deadline,
    /// Batches have waited [`TOP_UP_AFTER`] in the dispatch queue.
    TopUp,
    /// The processor is gone (dropped without close): treat as stop.
    Disconnected,
}

impl Batcher {
    fn run(mut self) {
        loop {
            // While batches are queued for the workers and the bound allows more workers, wake
            // after TOP_UP_AFTER at the latest to see whether they need them.
            let top_up = (self.workers.started < self.workers.max && !self.workers.rx.is_empty())
                .then(|| Instant::now() + TOP_UP_AFTER);
            let wake_at = match (self.deadline, top_up) {
                (Some(d), Some(t)) if t < d => Some((t, Wake::TopUp)),
                (Some(d), _) => Some((d, Wake::Deadline)),
                (None, Some(t)) => Some((t, Wake::TopUp)),
                (None, None) => None,
            };
            // Biased to control so that a flood of events cannot delay stop or flush.
            let wake = match wake_at {
                None => select_biased! {
                    recv(self.ctrl_rx) -> c => c.map_or(Wake::Disconnected, Wake::Control),
                    recv(self.data_rx) -> e => e.map_or(Wake::Disconnected, Wake::Event),
                },
                Some((at, timeout)) => select_biased! {
                    recv(self.ctrl_rx) -> c => c.map_or(Wake::Disconnected, Wake::Control),
                    recv(self.data_rx) -> e => e.map_or(Wake::Disconnected, Wake::Event),
                    default(at.saturating_duration_since(Instant::now())) => timeout,
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
                Wake::TopUp => self.workers.top_up(),
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
                        self.shared.progress().ack_when(self.next_seq, ack);
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
        let batch = mem::replace(
            &mut self.batch,
            Vec::with_capacity(self.batch_size.min(4096)),
        );
        let n = batch.len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.workers.ensure_free();
        // Blocks while the workers are `max_pending_batches` behind: the data queue then
        // fills and process() reports QueueFull, instead of memory growing.
        if self.dispatch_tx.send(Numbered { seq, batch }).is_err() {
            // The workers are gone (they cannot panic, but be safe): count, not lose.
            self.shared.counters.fail(n);
            self.shared
                .set_last_error("the dispatch workers have stopped".into());
            self.shared.progress().finish(seq);
        }
    }

    fn stop(&mut self) {
        let shared = self.shared.clone();
        shared.state.fetch_or(STOPPED, Ordering::AcqRel);
        // Wait for process() calls that passed the stop check to finish their send; each
        // takes nanoseconds, so yielding is enough. A process_timeout() call may be waiting
        // for room: taking events makes room for it.
        while shared.state.load(Ordering::Acquire) & !STOPPED != 0 {
            match self.data_rx.try_recv() {
                Ok(event) => self.add(event),
                Err(_) => thread::yield_now(),
            }
        }
        while let Ok(event) = self.data_rx.try_recv() {
            self.add(event);
        }
        self.flush_batch();
        // What is queued now is all there will be and the batcher will not look again: a
        // worker for every queued batch, as the bound allows (the idle ones leave when the
        // queue is empty).
        let queued = self.workers.rx.len();
        self.workers.start_for(queued);
        // Returning drops `dispatch_tx`: the workers finish what is queued and exit.
    }
}

fn same_context(a: &Arc<EventContext>, b: &Arc<EventContext>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// One dispatch worker's view of what the workers share.
struct Worker<'a> {
    factory: &'a EventFactory,
    dispatcher: &'a dyn EventDispatcher,
    center: Option<&'a NotificationCenter>,
    shared: &'a Shared,
}

impl Worker<'_> {
    /// Runs batches until the batcher is gone and the queue is empty.
    fn run(&self, rx: &Receiver<Numbered>, idle: &AtomicUsize) {
        loop {
            idle.fetch_add(1, Ordering::AcqRel);
            let next = rx.recv();
            idle.fetch_sub(1, Ordering::AcqRel);
            let Ok(Numbered { seq, batch }) = next else {
                break;
            };
            self.dispatch_batch(batch);
            self.shared.progress().finish(seq);
        }
    }

    /// Serialises `batch` (one request, or several when it passes `max_batch_bytes`) and
    /// sends each request.
    fn dispatch_batch(&self, batch: Vec<UserEvent>) {
        let out = self.factory.create_log_events(&batch);
        // Before the requests, so slow upstreams do not hold the events' memory.
        drop(batch);
        for oversized in &out.oversized {
            tracing::error!(
                uuid = %oversized.uuid,
                size = oversized.size,
                limit = oversized.limit,
                "event too large to send on its own; counted as failed"
            );
            self.shared.set_last_error(oversized.to_string());
        }
        self.shared.counters.fail(out.oversized.len() as u64);
        for log_event in out.log_events {
            self.dispatch(&log_event);
        }
    }

    fn dispatch(&self, log_event: &LogEvent) {
        let shared = self.shared;
        if let Some(center) = self.center {
            center.send_log_event(log_event);
        }
        let total = log_event.visitor_count();
        let run = AssertUnwindSafe(|| {
            self.dispatcher
                .dispatch_with_deadline(log_event, &shared.deadline)
        });
        let delivered = match catch_unwind(run) {
            Ok(Ok(())) => total,
            Ok(Err(e)) => {
                let delivered = e.delivered_of(total);
                tracing::warn!(
                    error = %e,
                    events = total,
                    delivered,
                    "dispatch failed; the processor does not retry"
                );
                shared.set_last_error(e.to_string());
                delivered
            }
            Err(_) => {
                tracing::error!(
                    events = total,
                    "event dispatcher panicked; its events are counted as failed"
                );
                shared.set_last_error("the event dispatcher panicked".into());
                0
            }
        };
        shared.counters.dispatched(delivered as u64, total as u64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_ack_waits_for_every_earlier_request_whatever_the_finishing_order() {
        let mut p = Progress::default();
        let (tx, rx) = bounded(1);
        // Requests 0..3 were handed out before the flush: the ack waits for all three.
        p.ack_when(3, tx);
        // 1, 2 and a later one (3) finish first, 0 is still in flight: no ack yet.
        p.finish(1);
        p.finish(2);
        p.finish(3);
        assert!(rx.try_recv().is_err());
        assert_eq!(p.finished_below, 0);
        p.finish(0);
        assert!(rx.try_recv().is_ok());
        assert_eq!(p.finished_below, 4);
        assert!(p.finished_ahead.is_empty() && p.acks.is_empty());
        // Nothing outstanding: an ack fires at once.
        let (tx, rx) = bounded(1);
        p.ack_when(4, tx);
        assert!(rx.try_recv().is_ok());
    }

    /// Batches queued beyond what the waiting workers will take get workers of their own
    /// at a top-up, up to the bound, however far the started worker has got.
    #[test]
    fn a_top_up_gives_every_queued_batch_a_worker_up_to_the_bound() {
        let (tx, rx) = bounded::<Numbered>(16);
        let (done, _done_rx) = bounded::<()>(1);
        let hold = Arc::new(Hold::new(usize::MAX));
        let mut workers = Workers {
            rx,
            factory: Arc::new(EventFactory::new()),
            dispatcher: hold.clone(),
            center: None,
            shared: Arc::default(),
            done,
            idle: Arc::default(),
            started: 0,
            max: 4,
        };
        // Lets the held requests go even if an assertion below fails.
        let _release = ReleaseOnDrop(hold.clone());
        workers.start_one().unwrap();
        let ctx = Arc::new(EventContext::new("1", "2", "3"));
        for seq in 0..6 {
            let batch = vec![conversion(&ctx, seq as usize)];
            tx.send(Numbered { seq, batch }).unwrap();
        }
        // Whether the first worker has not run yet, waits in `recv` or holds a batch, five
        // or six batches are queued beyond it, and the bound allows three more workers.
        workers.top_up();
        assert_eq!(workers.started, 4);
        hold.wait_for_in_flight(4);
        // At the bound, a top-up starts none.
        workers.top_up();
        assert_eq!(workers.started, 4);
        drop(tx);
    }

    /// A burst after a quiet spell, with the one worker started waiting for work, gets
    /// `dispatch_concurrency` requests in flight at once while the processor runs on, and
    /// (below) when it is closed right after the burst.
    #[test]
    fn a_burst_after_a_quiet_spell_gets_every_worker() {
        a_burst_after_a_quiet_spell(false);
    }

    #[test]
    fn a_burst_closed_at_once_gets_every_worker() {
        a_burst_after_a_quiet_spell(true);
    }

    fn a_burst_after_a_quiet_spell(close_at_once: bool) {
        let hold = Arc::new(Hold::new(1));
        let p = one_event_batches_to(&hold);
        let ctx = Arc::new(EventContext::new("1", "2", "3"));
        p.process(conversion(&ctx, 0)).unwrap();
        assert!(
            p.flush_and_wait(Duration::from_secs(10)),
            "the first request went"
        );
        // From now on every request waits until four are in flight together.
        hold.want.store(4, Ordering::Release);
        for i in 1..=4 {
            p.process(conversion(&ctx, i)).unwrap();
        }
        if !close_at_once {
            hold.wait_for_in_flight(4);
        }
        let report = p.close();
        assert_eq!(report.dispatched, 5);
        assert_eq!(
            hold.most_in_flight(),
            4,
            "the burst had four requests in flight"
        );
        assert!(
            !hold.timed_out.load(Ordering::Acquire),
            "no request waited out the 10 s"
        );
    }

    /// A processor sending each event alone to `hold`, with four workers at most.
    fn one_event_batches_to(hold: &Arc<Hold>) -> BatchEventProcessor {
        BatchEventProcessor::builder()
            .dispatcher(Box::new(hold.clone()))
            .batch_size(1)
            .dispatch_concurrency(4)
            .close_timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    fn conversion(ctx: &Arc<EventContext>, i: usize) -> UserEvent {
        let kind = crate::UserEventKind::Conversion(crate::Conversion {
            event_id: "7".into(),
            event_key: "k".into(),
            revenue: None,
            value: None,
            tags: None,
        });
        UserEvent::new(ctx.clone(), format!("u{i}"), vec![], kind)
    }

    /// Holds each request until `want` are in flight together, or until released, or 10 s
    /// (noted in `timed_out`); `want` can change between requests.
    struct Hold {
        /// (in flight now, most in flight at once, released)
        state: Mutex<(usize, usize, bool)>,
        cv: std::sync::Condvar,
        want: AtomicUsize,
        timed_out: std::sync::atomic::AtomicBool,
    }

    impl Hold {
        fn new(want: usize) -> Self {
            Hold {
                state: Mutex::new((0, 0, false)),
                cv: std::sync::Condvar::new(),
                want: AtomicUsize::new(want),
                timed_out: std::sync::atomic::AtomicBool::new(false),
            }
        }

        fn most_in_flight(&self) -> usize {
            self.state.lock().unwrap().1
        }

        /// Waits (10 s at most) until `n` requests have been in flight at once.
        fn wait_for_in_flight(&self, n: usize) {
            let g = self.state.lock().unwrap();
            let (g, _) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(10), |g| g.1 < n)
                .unwrap();
            assert_eq!(g.1, n, "most requests in flight at once");
        }

        fn release(&self) {
            self.state.lock().unwrap().2 = true;
            self.cv.notify_all();
        }
    }

    struct ReleaseOnDrop(Arc<Hold>);

    impl Drop for ReleaseOnDrop {
        fn drop(&mut self) {
            self.0.release();
        }
    }

    impl EventDispatcher for Hold {
        fn dispatch(&self, _: &LogEvent) -> Result<(), crate::DispatchError> {
            let mut g = self.state.lock().unwrap();
            g.0 += 1;
            g.1 = g.1.max(g.0);
            self.cv.notify_all();
            let want = self.want.load(Ordering::Acquire);
            let (mut g, wait) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(10), |g| {
                    g.0 < want && g.1 < want && !g.2
                })
                .unwrap();
            if wait.timed_out() {
                self.timed_out.store(true, Ordering::Release);
            }
            g.0 -= 1;
            Ok(())
        }
    }

    #[test]
    fn workers_started_on_demand_reach_the_concurrency_bound_and_not_beyond() {
        let hold = Arc::new(Hold::new(4));
        let p = one_event_batches_to(&hold);
        let ctx = Arc::new(EventContext::new("1", "2", "3"));
        for i in 0..12 {
            p.process(conversion(&ctx, i)).unwrap();
        }
        let report = p.close();
        assert_eq!(report.dispatched, 12);
        // Four in flight at once (the hold kept each until then), never five.
        assert_eq!(hold.most_in_flight(), 4, "most requests in flight at once");
    }
}
