//! Event dispatchers: where [`LogEvent`]s go once built.
//!
//! [`EventDispatcher`] is the seeds' `dispatch_event(log_event)` contract. The processor calls
//! it from its own thread, one request at a time, so an implementation may block; it must
//! return (with an error if need be) rather than hang forever, and it owns its retries.
//!
//! With the `http` feature (on by default): [`transport`] is the async HTTP delivery that
//! the library and the relay share, and [`http`] the synchronous
//! [`HttpDispatcher`](http::HttpDispatcher) over it.

use std::time::Duration;

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
}

impl<D: EventDispatcher + ?Sized> EventDispatcher for std::sync::Arc<D> {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        (**self).dispatch(log_event)
    }
}

impl<D: EventDispatcher + ?Sized> EventDispatcher for Box<D> {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        (**self).dispatch(log_event)
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
