//! Event dispatchers: where [`LogEvent`]s go once built.
//!
//! [`EventDispatcher`] is the seeds' `dispatch_event(log_event)` contract. The
//! [`BatchEventProcessor`](crate::BatchEventProcessor) calls it from its dispatch worker
//! threads, up to [`dispatch_concurrency`](crate::BatchEventProcessorBuilder::dispatch_concurrency)
//! requests at once (default 32), so an implementation may block, must be safe to call from
//! several threads at once, must return (with an error if need be) rather than hang forever,
//! and owns its retries. [`EventDispatcher::dispatch_with_deadline`] also passes the
//! processor's [`DispatchDeadline`]: a dispatcher that honours it cuts its retries to fit
//! what is left of `close()`'s timeout.
//!
//! With the `http` feature (on by default): [`transport`] is the async HTTP delivery that
//! the library and the relay share, and [`http`] the synchronous
//! [`HttpDispatcher`](http::HttpDispatcher) over it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::log_event::LogEvent;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "http")]
pub mod transport;

/// Sends one [`LogEvent`] somewhere: the Event API, a relay, a spool, a queue.
///
/// ```
/// use tributary::{DispatchError, EventDispatcher, LogEvent};
///
/// /// Prints instead of sending.
/// struct Stdout;
/// impl EventDispatcher for Stdout {
///     fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
///         println!("{} visitors to {}", log_event.visitor_count(), log_event.url);
///         Ok(())
///     }
/// }
/// ```
pub trait EventDispatcher: Send + Sync + 'static {
    /// Delivers `log_event`, retrying as the implementation sees fit. `Ok` means every
    /// visitor in it was accepted by the destination.
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError>;

    /// [`dispatch`](Self::dispatch), settled by `deadline` if it gets one.
    ///
    /// The [`BatchEventProcessor`](crate::BatchEventProcessor) calls this, never `dispatch`,
    /// with one [`DispatchDeadline`] shared by all its requests. It has no instant while the
    /// processor runs; `close()` sets it (a little before its own timeout), also for requests
    /// already in flight. A dispatcher that honours it stops retrying, and cuts its attempt
    /// timeouts, so that it returns by then, with the last error if it did not deliver: the
    /// events are then counted as failed and `close()` reports exactly what was not
    /// delivered, and why, instead of leaving them pending.
    ///
    /// The default calls `dispatch` and ignores the deadline: `close()` then waits for it
    /// up to its timeout and reports what is still in flight as pending.
    /// [`HttpDispatcher`](http::HttpDispatcher) honours it.
    ///
    /// ```
    /// use tributary::{DispatchError, EventDispatcher, LogEvent};
    /// use tributary::dispatcher::DispatchDeadline;
    ///
    /// /// Tries up to three times, but never past the deadline.
    /// struct Patient;
    /// impl EventDispatcher for Patient {
    ///     fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
    ///         self.dispatch_with_deadline(log_event, &DispatchDeadline::none())
    ///     }
    ///     fn dispatch_with_deadline(
    ///         &self,
    ///         _log_event: &LogEvent,
    ///         deadline: &DispatchDeadline,
    ///     ) -> Result<(), DispatchError> {
    ///         for _attempt in 0..3 {
    ///             if deadline.passed() {
    ///                 break;
    ///             }
    ///             // ... try, return Ok(()) on success ...
    ///         }
    ///         Err(DispatchError::Transient { message: "gave up".into(), retry_after: None })
    ///     }
    /// }
    /// ```
    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        let _ = deadline;
        self.dispatch(log_event)
    }
}

impl<D: EventDispatcher + ?Sized> EventDispatcher for std::sync::Arc<D> {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        (**self).dispatch(log_event)
    }

    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        (**self).dispatch_with_deadline(log_event, deadline)
    }
}

impl<D: EventDispatcher + ?Sized> EventDispatcher for Box<D> {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        (**self).dispatch(log_event)
    }

    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        (**self).dispatch_with_deadline(log_event, deadline)
    }
}

/// A deadline that may be set later, shared by the requests it bounds: the processor's way
/// of telling dispatches in flight that `close()` has started and by when they must end.
///
/// Cheap to clone (clones share it). Starts without an instant ([`none`](Self::none)) or
/// with one ([`at`](Self::at)); [`set`](Self::set) gives it one or moves it earlier, never
/// later. Readable from any thread ([`get`](Self::get), [`passed`](Self::passed),
/// [`remaining`](Self::remaining)); async code can await [`reached`](Self::reached) (it
/// needs a tokio runtime with its time driver).
///
/// ```
/// use std::time::{Duration, Instant};
/// use tributary::dispatcher::DispatchDeadline;
///
/// let deadline = DispatchDeadline::none();
/// let seen_by_a_request = deadline.clone();
/// assert_eq!(seen_by_a_request.get(), None);
/// assert!(!seen_by_a_request.passed());
/// deadline.set(Instant::now() + Duration::from_secs(2));
/// assert!(seen_by_a_request.remaining().is_some_and(|left| left <= Duration::from_secs(2)));
/// // Moving it later is ignored.
/// let first = deadline.get();
/// deadline.set(Instant::now() + Duration::from_secs(60));
/// assert_eq!(deadline.get(), first);
/// ```
#[derive(Clone, Default)]
pub struct DispatchDeadline {
    inner: Arc<DeadlineInner>,
}

#[derive(Default)]
struct DeadlineInner {
    at: Mutex<Option<Instant>>,
    changed: Notify,
}

impl std::fmt::Debug for DispatchDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchDeadline")
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl DispatchDeadline {
    /// No deadline (yet).
    pub fn none() -> Self {
        Self::default()
    }

    /// A deadline at `at`.
    pub fn at(at: Instant) -> Self {
        let d = Self::default();
        d.set(at);
        d
    }

    /// Sets the deadline to `at`, unless it already is earlier, and wakes
    /// [`reached`](Self::reached) waiters.
    pub fn set(&self, at: Instant) {
        {
            let mut slot = self.inner.at.lock().unwrap_or_else(|e| e.into_inner());
            match *slot {
                Some(current) if current <= at => return,
                _ => *slot = Some(at),
            }
        }
        self.inner.changed.notify_waiters();
    }

    /// The instant, if there is one.
    pub fn get(&self) -> Option<Instant> {
        *self.inner.at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time left, `None` without a deadline (zero once it passed).
    pub fn remaining(&self) -> Option<Duration> {
        self.get()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether there is a deadline and it has passed.
    pub fn passed(&self) -> bool {
        self.get().is_some_and(|at| at <= Instant::now())
    }

    /// Completes once there is a deadline and it has passed; pending forever without one.
    /// Notices a deadline set (or moved earlier) while waiting. Needs a tokio runtime with
    /// its time driver enabled.
    pub async fn reached(&self) {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            // Registered before reading, so a `set` in between wakes this waiter.
            notified.as_mut().enable();
            match self.get() {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => return,
                        () = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// Why a dispatch did not deliver everything.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    /// A failure that may pass: connection error, timeout, 5xx, 408, 429. Returned once the
    /// dispatcher's own retries are used up.
    #[error("transient failure: {message}")]
    Transient {
        /// What happened (status or I/O error); no payload content.
        message: String,
        /// How long the destination asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The destination refused the request and will refuse it again (4xx other than 408/429).
    #[error("rejected with status {status}: {message}")]
    Permanent {
        /// HTTP status, or 0 when not HTTP.
        status: u16,
        /// What the destination said, truncated.
        message: String,
    },
    /// Some visitors were refused and isolated; the rest were delivered.
    #[error("{rejected} of {total} visitors rejected with status {status}; the rest delivered")]
    PartiallyRejected {
        /// Visitors refused.
        rejected: usize,
        /// Visitors in the request.
        total: usize,
        /// The status they were refused with.
        status: u16,
    },
    /// Part of the request was settled and part was not: some visitors were delivered or
    /// refused alone, the others were not delivered because the destination failed
    /// part-way or the isolation budget ran out before the refused ones were found. The
    /// undelivered visitors were never judged bad.
    #[error(
        "{delivered} of {total} visitors delivered, {rejected} rejected, {undelivered} not delivered: {reason}"
    )]
    Incomplete {
        /// Visitors delivered.
        delivered: usize,
        /// Visitors refused alone.
        rejected: usize,
        /// Visitors neither delivered nor refused.
        undelivered: usize,
        /// Visitors in the request.
        total: usize,
        /// Why the rest was not delivered.
        reason: String,
    },
    /// The dispatcher cannot work at all (bad configuration, shut down).
    #[error("dispatcher unavailable: {0}")]
    Unavailable(String),
}

impl DispatchError {
    /// Whether trying the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DispatchError::Transient { .. })
    }

    /// How many of `total` visitors were delivered despite the error.
    pub fn delivered_of(&self, total: usize) -> usize {
        match self {
            DispatchError::PartiallyRejected { rejected, .. } => total.saturating_sub(*rejected),
            DispatchError::Incomplete { delivered, .. } => (*delivered).min(total),
            _ => 0,
        }
    }
}
