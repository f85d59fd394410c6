//! The synchronous HTTP dispatcher: [`HttpDispatcher`], what the processor thread calls,
//! over the async [`HttpTransport`], with a hook for the visitors a destination refused.
//!
//! It runs the transport on a [`RuntimeBridge`], a private thread with its own
//! single-threaded tokio runtime, so it can be built, used and dropped anywhere, inside an
//! async runtime or not.
//!
//! ```no_run
//! use std::time::Duration;
//! use tributary::dispatcher::http::HttpDispatcher;
//!
//! let dispatcher = HttpDispatcher::builder()
//!     .endpoint("http://127.0.0.1:8080/v1/events") // a relay; default: each LogEvent's url
//!     .header("X-Tenant", "shop")
//!     .gzip(true)
//!     .request_timeout(Duration::from_secs(5))
//!     .on_rejected(|r| eprintln!("{} of {} visitors rejected", r.visitors.len(), r.total))
//!     .build()?;
//! # Ok::<(), tributary::dispatcher::transport::HttpDispatcherError>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::transport::{HttpConfig, HttpDispatcherError, HttpStats, HttpTransport};
use super::{DispatchDeadline, DispatchError, EventDispatcher};
use crate::bridge::RuntimeBridge;
use crate::isolate::BisectOutcome;
use crate::log_event::LogEvent;
#[cfg(doc)]
use crate::raw::RawBatch;
use crate::retry::RetryPolicy;

/// Visitors of one [`LogEvent`] that the destination refused, as given to the
/// [`HttpDispatcherBuilder::on_rejected`] hook.
#[derive(Clone)]
pub struct RejectedVisitors {
    /// Where the LogEvent was sent.
    pub url: String,
    /// Visitors in the LogEvent.
    pub total: usize,
    /// The LogEvent's header (see [`RawBatch::header`]): with a visitor it rebuilds a
    /// payload, e.g. to keep it as a dead letter.
    pub header: Bytes,
    /// The refused visitors, by ascending index.
    pub visitors: Vec<RejectedVisitor>,
}

/// One refused visitor.
#[derive(Clone)]
pub struct RejectedVisitor {
    /// Index in the LogEvent's visitors.
    pub index: usize,
    /// The status it was refused with.
    pub status: u16,
    /// What the destination said.
    pub message: String,
    /// The visitor's JSON, as sent.
    pub visitor: Bytes,
}

impl fmt::Debug for RejectedVisitors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectedVisitors")
            .field("url", &self.url)
            .field("total", &self.total)
            .field("visitors", &self.visitors)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RejectedVisitor {
    // Visitors hold personal data: never print their content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectedVisitor")
            .field("index", &self.index)
            .field("status", &self.status)
            .field("message", &self.message)
            .field("visitor_bytes", &self.visitor.len())
            .finish()
    }
}

type RejectedHook = dyn Fn(&RejectedVisitors) + Send + Sync;

/// The synchronous HTTP [`EventDispatcher`]: what the processor thread calls.
///
/// It owns a [`RuntimeBridge`] (a private thread running a single-threaded tokio runtime)
/// and an [`HttpTransport`]; [`EventDispatcher::dispatch`] hands the request to that thread
/// and blocks until it is settled (delivered, retries exhausted, or bisected). So it never needs
/// the caller's runtime, and it can be built, used and dropped inside or outside one (but a
/// caller on a current-thread runtime must not dispatch to a server running on that same
/// runtime: blocking it would starve the server). Dropping it stops and joins the thread.
///
/// **Concurrency.** Concurrent callers are served concurrently: each call is a task of its
/// own on the bridge's runtime, over one pooled keep-alive client
/// ([`HttpConfig::pool_max_idle_per_host`], default 32, keeps that many connections warm),
/// so nothing serialises requests. In-flight requests are bounded by the number of blocked
/// callers, i.e. by the processor's
/// [`dispatch_concurrency`](crate::BatchEventProcessorBuilder::dispatch_concurrency)
/// (default 32); calls beyond the bridge's job queue (1024) wait for room.
///
/// **Time.** One `dispatch` takes at most about `retry.total_budget` (default 60 s) per
/// request it makes: one request normally, up to `isolation_budget` more when a batch is
/// isolated. Under the processor's `close()` it is cut to the close deadline instead
/// ([`EventDispatcher::dispatch_with_deadline`]).
pub struct HttpDispatcher {
    // Dropped first: its runtime stops before the client it served is dropped.
    bridge: RuntimeBridge,
    transport: HttpTransport,
    on_rejected: Option<Arc<RejectedHook>>,
}

impl fmt::Debug for HttpDispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpDispatcher")
            .field("transport", &self.transport)
            .field("on_rejected", &self.on_rejected.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpDispatcher {
    /// A builder with [`HttpConfig::default`] settings.
    pub fn builder() -> HttpDispatcherBuilder {
        HttpDispatcherBuilder {
            config: HttpConfig::default(),
            on_rejected: None,
        }
    }

    /// A dispatcher with `config` and no rejection hook.
    pub fn new(config: HttpConfig) -> Result<Self, HttpDispatcherError> {
        Self::builder().config(config).build()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HttpStats {
        self.transport.stats()
    }

    fn report_rejected(&self, url: &str, log_event: &LogEvent, outcome: &BisectOutcome) {
        let Some(hook) = &self.on_rejected else {
            return;
        };
        if outcome.rejected.is_empty() {
            return;
        }
        let batch = log_event.batch();
        let report = RejectedVisitors {
            url: url.to_owned(),
            total: batch.visitors().len(),
            header: batch.header().clone(),
            visitors: outcome
                .rejected
                .iter()
                .filter_map(|r| {
                    Some(RejectedVisitor {
                        index: r.index,
                        status: r.status,
                        message: r.message.clone(),
                        visitor: batch.visitors().get(r.index)?.clone(),
                    })
                })
                .collect(),
        };
        // A panicking hook must not take the processor thread down with it.
        let run = std::panic::AssertUnwindSafe(|| hook(&report));
        if std::panic::catch_unwind(run).is_err() {
            tracing::error!("the on_rejected hook panicked");
        }
    }
}

impl EventDispatcher for HttpDispatcher {
    fn dispatch(&self, log_event: &LogEvent) -> Result<(), DispatchError> {
        self.dispatch_with_deadline(log_event, &DispatchDeadline::none())
    }

    /// Delivers as [`dispatch`](EventDispatcher::dispatch) does, but settled by
    /// `deadline` (see [`HttpTransport::send_until`]): attempt timeouts are cut to it, no
    /// retry starts whose backoff ends past it, and a request still in flight when it passes
    /// is abandoned, so the call returns by then with the last error.
    fn dispatch_with_deadline(
        &self,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        let url = self.transport.endpoint_for(&log_event.url).to_owned();
        let (transport, job_url, job_event, job_deadline) = (
            self.transport.clone(),
            url.clone(),
            log_event.clone(),
            deadline.clone(),
        );
        let outcome = self.bridge.call(move || async move {
            transport
                .deliver_log_event_until(&job_url, &job_event, &job_deadline)
                .await
        })?;
        self.report_rejected(&url, log_event, &outcome);
        outcome.into_result(log_event.visitor_count())
    }
}

/// Builds an [`HttpDispatcher`]; every setting defaults as in [`HttpConfig::default`].
pub struct HttpDispatcherBuilder {
    config: HttpConfig,
    on_rejected: Option<Arc<RejectedHook>>,
}

impl fmt::Debug for HttpDispatcherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpDispatcherBuilder")
            .field("config", &self.config)
            .field("on_rejected", &self.on_rejected.is_some())
            .finish()
    }
}

impl HttpDispatcherBuilder {
    /// Replaces every setting with `config`.
    pub fn config(mut self, config: HttpConfig) -> Self {
        self.config = config;
        self
    }

    /// Sends everything to `url` instead of each LogEvent's URL. See [`HttpConfig::endpoint`].
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.config.endpoint = Some(url.into());
        self
    }

    /// Adds a request header. See [`HttpConfig::headers`].
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.headers.push((name.into(), value.into()));
        self
    }

    /// See [`HttpConfig::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// See [`HttpConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// See [`HttpConfig::gzip`].
    pub fn gzip(mut self, on: bool) -> Self {
        self.config.gzip = on;
        self
    }

    /// See [`HttpConfig::pool_idle_timeout`].
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.pool_idle_timeout = timeout;
        self
    }

    /// See [`HttpConfig::pool_max_idle_per_host`].
    pub fn pool_max_idle_per_host(mut self, n: usize) -> Self {
        self.config.pool_max_idle_per_host = n;
        self
    }

    /// See [`HttpConfig::retry`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// See [`HttpConfig::user_agent`].
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.config.user_agent = user_agent.into();
        self
    }

    /// See [`HttpConfig::isolation_budget`].
    pub fn isolation_budget(mut self, n: usize) -> Self {
        self.config.isolation_budget = n;
        self
    }

    /// The old name of [`HttpDispatcherBuilder::isolation_budget`].
    #[deprecated(
        since = "0.1.0",
        note = "renamed isolation_budget, as the relay's setting"
    )]
    pub fn max_bisect_requests(self, n: usize) -> Self {
        self.isolation_budget(n)
    }

    /// Called, on the dispatching thread, with the visitors of a LogEvent that the
    /// destination refused (after bisection isolated them). A panic in it is caught.
    pub fn on_rejected(mut self, hook: impl Fn(&RejectedVisitors) + Send + Sync + 'static) -> Self {
        self.on_rejected = Some(Arc::new(hook));
        self
    }

    /// Validates the settings and starts the dispatcher's thread.
    pub fn build(self) -> Result<HttpDispatcher, HttpDispatcherError> {
        let transport = HttpTransport::new(&self.config)?;
        let bridge = RuntimeBridge::builder("tributary-http")
            .build()
            .map_err(|e| HttpDispatcherError::Worker(e.to_string()))?;
        Ok(HttpDispatcher {
            bridge,
            transport,
            on_rejected: self.on_rejected,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn builder_rejects_bad_settings() {
        let e = HttpDispatcher::builder()
            .endpoint("ftp://x/")
            .build()
            .unwrap_err();
        assert!(
            matches!(e, HttpDispatcherError::InvalidEndpoint { .. }),
            "{e}"
        );
        let e = HttpDispatcher::builder()
            .header("bad name", "v")
            .build()
            .unwrap_err();
        assert!(
            matches!(e, HttpDispatcherError::InvalidHeader { .. }),
            "{e}"
        );
        let e = HttpDispatcher::builder()
            .header("X-Secret", "a\nb")
            .build()
            .unwrap_err();
        assert!(!e.to_string().contains("a\nb"));
    }
}
