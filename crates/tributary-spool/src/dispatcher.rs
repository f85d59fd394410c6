//! [`SpoolDispatcher`]: an [`EventDispatcher`] that appends each [`LogEvent`] to a spool
//! instead of sending it over HTTP.
//!
//! With an [`SqsSpool`](crate::SqsSpool) it is the producer half of the SQS bulk
//! dispatcher: a Rust service writes its batches straight to the queue (one persistent
//! client, `SendMessageBatch`, retries) and `tributary drain` nodes merge them into large
//! upstream requests. With a [`SqliteSpool`](crate::SqliteSpool) it gives a single host a
//! durable buffer that a `tributary drain` (or `serve`) on the same directory forwards.
//!
//! `dispatch` is synchronous (the processor calls it from its own thread) while spools are
//! async, so the dispatcher owns a [`RuntimeBridge`] (a private thread with a
//! single-threaded tokio runtime) and blocks the caller until the append is settled, like
//! the HTTP dispatcher: it never needs, and never blocks, the caller's runtime.
//!
//! ```no_run
//! # #[cfg(feature = "sqs")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tributary::BatchEventProcessor;
//! use tributary_spool::{SpoolDispatcherBuilder, SqsConfig, SqsSpool};
//!
//! // The spool is opened on the dispatcher's own runtime, where it will be used.
//! let dispatcher = SpoolDispatcherBuilder::new()
//!     .attempts(5)
//!     .build_with(|| SqsSpool::from_env(SqsConfig::new("events")))?;
//! let processor = BatchEventProcessor::builder().dispatcher(dispatcher).build()?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "sqs"))]
//! # fn main() {}
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tributary::bridge::RuntimeBridge;
use tributary::dispatcher::DispatchDeadline;
use tributary::retry::{Jitter, RetryPolicy};
use tributary::{DispatchError, EventDispatcher, LogEvent};

use crate::{Payload, Spool, SpoolError};

/// Why a [`SpoolDispatcher`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpoolDispatcherError {
    /// The worker thread or its runtime could not be started.
    #[error("cannot start the spool dispatcher thread: {0}")]
    Worker(String),
    /// The spool could not be opened.
    #[error("cannot open the spool: {0}")]
    Open(#[from] SpoolError),
}

/// Counters of a [`SpoolDispatcher`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolDispatcherStats {
    /// LogEvents appended.
    pub appended: u64,
    /// Append attempts that failed and were retried.
    pub retries: u64,
    /// LogEvents given up on (the error was returned to the processor).
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
}

/// Settings; see the builder methods for defaults.
#[derive(Debug, Clone)]
struct Settings {
    /// Attempts, and the pause between them; its time budget is not used (each attempt
    /// has `attempt_timeout`).
    retry: RetryPolicy,
    attempt_timeout: Duration,
}

/// Builds a [`SpoolDispatcher`].
#[derive(Debug, Clone)]
pub struct SpoolDispatcherBuilder {
    settings: Settings,
}

impl Default for SpoolDispatcherBuilder {
    fn default() -> Self {
        SpoolDispatcherBuilder {
            settings: Settings {
                retry: RetryPolicy {
                    max_attempts: 5,
                    initial_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    multiplier: 2.0,
                    jitter: Jitter::Equal,
                    ..RetryPolicy::default()
                },
                attempt_timeout: Duration::from_secs(10),
            },
        }
    }
}

impl SpoolDispatcherBuilder {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tries per LogEvent before `dispatch` fails with [`DispatchError::Transient`]
    /// (default 5; at least 1).
    pub fn attempts(mut self, n: u32) -> Self {
        self.settings.retry.max_attempts = n.max(1);
        self
    }

    /// Pause after the first failed try, doubled after each next one up to `max`, with
    /// equal jitter (each pause between half and all of its step; defaults 100 ms and 2 s).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.settings.retry.initial_backoff = first;
        self.settings.retry.max_backoff = max.max(first);
        self
    }

    /// Bound on one append (default 10 s), so `dispatch` returns even if the spool hangs:
    /// one `dispatch` takes at most about `attempts × (attempt_timeout + max backoff)`.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.settings.attempt_timeout = timeout;
        self
    }

    /// A dispatcher appending to `spool`. Use this for spools that do not care which
    /// runtime they run on (the SQLite spool); for SQS prefer [`Self::build_with`].
    pub fn build<S: Spool>(self, spool: S) -> Result<SpoolDispatcher<S>, SpoolDispatcherError> {
        self.build_with(move || async move { Ok(spool) })
    }

    /// A dispatcher appending to the spool `open` makes, run on the dispatcher's own
    /// runtime: network clients (the SQS one) then keep their connections on the runtime
    /// that uses them.
    pub fn build_with<S, F, Fut>(self, open: F) -> Result<SpoolDispatcher<S>, SpoolDispatcherError>
    where
        S: Spool,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<S, SpoolError>> + 'static,
    {
        let bridge = RuntimeBridge::builder("tributary-spool-dispatcher")
            .build()
            .map_err(|e| SpoolDispatcherError::Worker(e.to_string()))?;
        let spool = bridge
            .call(open)
            .map_err(|e| SpoolDispatcherError::Worker(e.to_string()))??;
        Ok(SpoolDispatcher {
            bridge,
            spool: Arc::new(spool),
            settings: Arc::new(self.settings),
            counters: Arc::new(Counters::default()),
        })
    }
}

/// The [`EventDispatcher`] into a [`Spool`]. See the [module docs](self).
///
/// Each [`LogEvent`] becomes one [`Payload`] routed `eu` when its context's region (or,
/// without a context, its URL) is the EU endpoint and `us` otherwise, the routes the relay
/// uses. `dispatch` returns once the spool has made it durable. Failures are retried
/// (see [`SpoolDispatcherBuilder`]); then `dispatch` returns
/// [`DispatchError::Transient`] (the spool is full or unreachable),
/// [`DispatchError::Permanent`] with status 413 (a visitor too large for the spool) or
/// [`DispatchError::Unavailable`] (the spool is closed or misconfigured, or the dispatcher
/// was dropped). Concurrent callers are served concurrently; in-flight appends are bounded
/// by the number of blocked callers (the processor's `dispatch_concurrency`). Dropping it
/// stops and joins its thread.
///
/// **At exit nothing pending is lost.** An append takes milliseconds (it does not wait for
/// the upstream), so the processor's `close()` drains its queue into the spool well within
/// its timeout, and it waits for every append in flight: once `close()` reports
/// `pending_at_timeout == 0` and `failed == 0`, every accepted event is durable in the
/// spool, for a `tributary drain` to forward. Under the processor's close deadline
/// ([`EventDispatcher::dispatch_with_deadline`]) an append already running is left to
/// finish (bounded by `attempt_timeout`: cancelling it could not tell whether it was
/// written), but no retry starts whose pause would end past the deadline; the error is
/// then counted failed and named in the close report.
pub struct SpoolDispatcher<S: Spool> {
    // Dropped first: its runtime stops before the spool it served is dropped.
    bridge: RuntimeBridge,
    spool: Arc<S>,
    settings: Arc<Settings>,
    counters: Arc<Counters>,
}

impl<S: Spool> std::fmt::Debug for SpoolDispatcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolDispatcher")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<S: Spool> SpoolDispatcher<S> {
    /// A dispatcher with the default settings appending to `spool`.
    pub fn new(spool: S) -> Result<Self, SpoolDispatcherError> {
        SpoolDispatcherBuilder::new().build(spool)
    }

    /// The spool, for stats or for draining it in-process. Its async methods may be called
    /// from any runtime.
    pub fn spool(&self) -> &Arc<S> {
        &self.spool
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SpoolDispatcherStats {
        SpoolDispatcherStats {
            appended: self.counters.appended.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }
}

/// Appends with retries, none past `deadline`; maps the last error to a [`DispatchError`].
async fn append<S: Spool>(
    spool: &S,
    payload: Payload,
    settings: &Settings,
    counters: &Counters,
    deadline: &DispatchDeadline,
) -> Result<(), DispatchError> {
    let mut attempt = 1;
    loop {
        let result = match tokio::time::timeout(
            settings.attempt_timeout,
            spool.append(vec![payload.clone()]),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(SpoolError::Storage(format!(
                "append timed out after {:?}",
                settings.attempt_timeout
            ))),
        };
        let error = match result {
            Ok(()) => {
                counters.appended.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(SpoolError::TooLarge(m)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(DispatchError::Permanent {
                    status: 413,
                    message: m,
                });
            }
            Err(e @ (SpoolError::Closed | SpoolError::Config(_))) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(DispatchError::Unavailable(e.to_string()));
            }
            Err(e) => e,
        };
        if attempt >= settings.retry.max_attempts {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %error, attempts = attempt, "spool append failed; giving up");
            return Err(DispatchError::Transient {
                message: error.to_string(),
                retry_after: None,
            });
        }
        let pause = settings.retry.backoff(attempt, &mut rand::rng());
        if deadline.remaining().is_some_and(|left| left <= pause) {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %error, attempts = attempt, "spool append failed; no time left to retry before the close deadline");
            return Err(DispatchError::Transient {
                message: format!("{error} (gave up after {attempt} attempt(s): close deadline)"),
                retry_after: None,
            });
        }
        tracing::debug!(error = %error, attempt, "spool append failed; retrying");
        counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

impl<S: Spool> EventDispatcher for SpoolDispatcher<S> {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        self.dispatch_with_deadline(log_event, &DispatchDeadline::none())
    }

    /// Appends as [`dispatch`](EventDispatcher::dispatch) does; no retry starts whose pause
    /// would end past `deadline` (an append already running finishes).
    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        let payload = Payload::from_batch(log_event.region(), log_event.batch());
        let (spool, settings, counters, deadline) = (
            self.spool.clone(),
            self.settings.clone(),
            self.counters.clone(),
            deadline.clone(),
        );
        self.bridge.call(move || async move {
            append(&*spool, payload, &settings, &counters, &deadline).await
        })?
    }
}
