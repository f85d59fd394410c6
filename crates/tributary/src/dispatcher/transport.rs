//! HTTP transport: the Event API (or a relay) over one pooled keep-alive client, with
//! retries, `Retry-After`, optional gzip, and isolation of the visitors a destination
//! refuses.
//!
//! [`HttpTransport`] is async and cheap to clone, so the library's processor thread (through
//! [`HttpDispatcher`]) and the relay's async forwarder share one
//! implementation. [`HttpTransport::send`] is one logical delivery of one body, retried per
//! its [`RetryPolicy`]; [`HttpTransport::deliver_bisecting`] also isolates the visitors a
//! `400` is about, with [`crate::isolate`]'s rules: only a visitor refused alone is reported
//! rejected.
//!
//! ```no_run
//! use bytes::Bytes;
//! use tributary::dispatcher::transport::{HttpConfig, HttpTransport};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = HttpTransport::new(&HttpConfig::default())?;
//! let body = Bytes::from_static(br#"{"account_id":"1","visitors":[]}"#);
//! transport.send("http://127.0.0.1:8080/v1/events", body).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

#[cfg(doc)]
use super::http::HttpDispatcher;
use super::{DispatchDeadline, DispatchError};
use crate::isolate::{BisectOutcome, IsolationBudget, bisect};
use crate::log_event::LogEvent;
use crate::raw::RawBatch;
use crate::retry::{Classification, RetryPolicy, classify, parse_retry_after};

/// Longest excerpt of a response body kept in an error message.
const MAX_MESSAGE_BYTES: usize = 512;
/// Most bytes of a response body read (and discarded) so the connection can be reused;
/// a longer body closes the connection instead.
const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// Settings of an [`HttpTransport`] / [`HttpDispatcher`]. Every field has a documented
/// default ([`HttpConfig::default`]).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Send every request here instead of each [`LogEvent::url`] (a relay or proxy).
    /// Default: `None`. Used by [`HttpDispatcher`]; [`HttpTransport::send`] takes its URL
    /// from the caller (see [`HttpTransport::endpoint_for`]).
    pub endpoint: Option<String>,
    /// Extra request headers (authentication for a relay, routing for a proxy). They
    /// replace defaults of the same name, `Content-Type` included. Default: none.
    pub headers: Vec<(String, String)>,
    /// Bound on one attempt, from connecting to the end of the response (default 10 s).
    pub request_timeout: Duration,
    /// Bound on establishing a connection (default 5 s).
    pub connect_timeout: Duration,
    /// Compress request bodies (`Content-Encoding: gzip`). Default: `false`, since the
    /// Event API does not document gzip; relays accept it.
    pub gzip: bool,
    /// How long an idle pooled connection is kept (default 90 s).
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host (default 32).
    pub pool_max_idle_per_host: usize,
    /// When and how often to retry (default [`RetryPolicy::default`]).
    pub retry: RetryPolicy,
    /// `User-Agent` header (default `tributary/<version>`).
    pub user_agent: String,
    /// Most isolation requests one dispatch may make after a content refusal (default
    /// 64; see [`crate::isolate`]). Visitors not isolated when it is spent are reported
    /// undelivered ([`DispatchError::Incomplete`]), never rejected.
    pub isolation_budget: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            endpoint: None,
            headers: Vec::new(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            gzip: false,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 32,
            retry: RetryPolicy::default(),
            user_agent: format!("tributary/{}", env!("CARGO_PKG_VERSION")),
            isolation_budget: 64,
        }
    }
}

/// Why an [`HttpTransport`] or [`HttpDispatcher`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpDispatcherError {
    /// The endpoint is not an `http`/`https` URL.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header name or value is not valid HTTP. The value is not repeated: it may be a
    /// secret.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The dispatcher's worker thread or its runtime could not be started.
    #[error("cannot start the dispatcher thread: {0}")]
    Worker(String),
}

impl From<HttpDispatcherError> for DispatchError {
    fn from(e: HttpDispatcherError) -> Self {
        DispatchError::Unavailable(e.to_string())
    }
}

/// Counters of an [`HttpTransport`] (shared by its clones) or [`HttpDispatcher`].
/// They are also exported through `metrics` as `tributary_http_requests_total{status}`,
/// `tributary_http_retries_total` and `tributary_http_rejected_visitors_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// HTTP attempts made (each retry and each bisection request counts).
    pub requests: u64,
    /// Attempts that were retries of a failed attempt.
    pub retries: u64,
    /// Visitors isolated by bisection and reported rejected.
    pub rejected_visitors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    rejected_visitors: AtomicU64,
}

/// Async HTTP delivery with retries over one pooled keep-alive client. Cheap to clone;
/// clones share the connection pool and the counters. Safe to use from many tasks at once.
#[derive(Clone)]
pub struct HttpTransport {
    inner: Arc<TransportInner>,
}

struct TransportInner {
    client: reqwest::Client,
    endpoint: Option<String>,
    gzip: bool,
    request_timeout: Duration,
    retry: RetryPolicy,
    isolation_budget: usize,
    counters: Counters,
    /// The last failed attempt's message, for errors of requests never sent.
    last_failure: std::sync::Mutex<Option<String>>,
}

impl fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTransport")
            .field("endpoint", &self.inner.endpoint)
            .field("gzip", &self.inner.gzip)
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    Retryable {
        message: String,
        retry_after: Option<Duration>,
        /// No answer in time (the attempt's timeout, or the close deadline).
        timed_out: bool,
    },
    Permanent {
        status: u16,
        message: String,
    },
}

impl HttpTransport {
    /// Builds the client. Needs no tokio runtime; requests must run inside one.
    pub fn new(config: &HttpConfig) -> Result<Self, HttpDispatcherError> {
        if let Some(endpoint) = &config.endpoint {
            check_endpoint(endpoint)?;
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &config.headers {
            let invalid = |reason: String| HttpDispatcherError::InvalidHeader {
                name: name.clone(),
                reason,
            };
            let n = HeaderName::try_from(name.as_str()).map_err(|e| invalid(e.to_string()))?;
            let mut v =
                HeaderValue::try_from(value.as_str()).map_err(|e| invalid(e.to_string()))?;
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        let user_agent = HeaderValue::try_from(config.user_agent.as_str()).map_err(|e| {
            HttpDispatcherError::InvalidHeader {
                name: "User-Agent".into(),
                reason: e.to_string(),
            }
        })?;
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(user_agent)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .tcp_keepalive(Duration::from_secs(30))
            // A redirected POST may turn into a GET and lose its body: report it instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HttpDispatcherError::Client(error_chain(&e)))?;
        Ok(HttpTransport {
            inner: Arc::new(TransportInner {
                client,
                endpoint: config.endpoint.clone(),
                gzip: config.gzip,
                request_timeout: config.request_timeout,
                retry: config.retry.clone(),
                isolation_budget: config.isolation_budget.max(1),
                counters: Counters::default(),
                last_failure: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The configured endpoint if any, else `event_url`.
    pub fn endpoint_for<'a>(&'a self, event_url: &'a str) -> &'a str {
        self.inner.endpoint.as_deref().unwrap_or(event_url)
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HttpStats {
        let c = &self.inner.counters;
        HttpStats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            rejected_visitors: c.rejected_visitors.load(Ordering::Relaxed),
        }
    }

    /// POSTs `body` (JSON) to `url`: one logical delivery, retried per the policy.
    ///
    /// `Ok` on any 2xx. Connection errors, timeouts, 5xx, 408 and 429 are retried with
    /// backoff (or after `Retry-After` when longer) until the attempts or the time budget
    /// run out, then reported as [`DispatchError::Transient`], carrying the last
    /// `Retry-After`. Other statuses are [`DispatchError::Permanent`] at once (status `0`
    /// for a malformed URL). Each attempt's timeout is cut to what the budget has left.
    pub async fn send(&self, url: &str, body: Bytes) -> Result<(), DispatchError> {
        self.send_until(url, body, &DispatchDeadline::none()).await
    }

    /// [`HttpTransport::send`], settled by `deadline` if it has (or gets) one: each
    /// attempt's timeout is cut to what is left of it, no retry starts whose backoff would
    /// end past it, and an attempt still running when it passes is abandoned. Nothing is
    /// sent once it has passed. The error is then [`DispatchError::Transient`] with the last
    /// failure and "close deadline" in its message.
    pub async fn send_until(
        &self,
        url: &str,
        body: Bytes,
        deadline: &DispatchDeadline,
    ) -> Result<(), DispatchError> {
        let body = if self.inner.gzip { gzip(&body)? } else { body };
        let policy = &self.inner.retry;
        let start = Instant::now();
        let mut attempt: u32 = 1;
        let mut last: Option<(String, Option<Duration>)> = None;
        let cut = |attempts: u32, last: Option<(String, Option<Duration>)>| {
            let (message, retry_after) = match last {
                Some((m, r)) => (
                    format!("{m} (gave up after {attempts} attempt(s): close deadline)"),
                    r,
                ),
                None => {
                    let previous = self
                        .inner
                        .last_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let message = match previous {
                        Some(p) => format!(
                            "close deadline passed before the request was sent (last failure: {p})"
                        ),
                        None => "close deadline passed before the request was sent".to_owned(),
                    };
                    (message, None)
                }
            };
            tracing::debug!(attempts, %message, "HTTP delivery cut by the close deadline");
            DispatchError::Transient {
                message,
                retry_after,
            }
        };
        loop {
            let left = policy.total_budget.saturating_sub(start.elapsed());
            let mut timeout = match self.inner.request_timeout.min(left) {
                t if t.is_zero() && attempt == 1 => self.inner.request_timeout,
                t => t,
            };
            // Whether the deadline, not the policy, bounds this attempt.
            let mut cut_short = false;
            if let Some(until_deadline) = deadline.remaining() {
                if until_deadline.is_zero() {
                    return Err(cut(attempt - 1, last));
                }
                cut_short = until_deadline < timeout;
                timeout = timeout.min(until_deadline);
            }
            let outcome = tokio::select! {
                biased;
                a = self.attempt(url, body.clone(), timeout) => a,
                () = deadline.reached() => Attempt::Retryable {
                    message: String::new(),
                    retry_after: None,
                    timed_out: true,
                },
            };
            let outcome = match outcome {
                // Timed out at (or because of) the close deadline: say so, not "timed out".
                Attempt::Retryable {
                    timed_out: true, ..
                } if deadline.passed() => Attempt::Retryable {
                    message: format!("no answer by the close deadline ({})", redact_url(url)),
                    retry_after: None,
                    timed_out: true,
                },
                other => other,
            };
            match &outcome {
                Attempt::Delivered => {}
                Attempt::Retryable { message, .. } | Attempt::Permanent { message, .. } => {
                    *self
                        .inner
                        .last_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
                }
            }
            let (message, retry_after) = match outcome {
                Attempt::Delivered => return Ok(()),
                Attempt::Permanent { status, message } => {
                    return Err(DispatchError::Permanent { status, message });
                }
                Attempt::Retryable {
                    message,
                    retry_after,
                    ..
                } => (message, retry_after),
            };
            if cut_short && deadline.passed() {
                // The deadline has passed (the attempt most likely timed out because of it):
                // report the failure that made retries necessary, if there was one.
                return Err(cut(attempt, last.or(Some((message, retry_after)))));
            }
            let delay = policy.next_delay(attempt, start.elapsed(), retry_after, &mut rand::rng());
            let Some(delay) = delay else {
                tracing::debug!(attempt, %message, "giving up on HTTP delivery");
                return Err(DispatchError::Transient {
                    message: format!("{message} (gave up after {attempt} attempt(s))"),
                    retry_after,
                });
            };
            if deadline.remaining().is_some_and(|left| left <= delay) {
                return Err(cut(attempt, Some((message, retry_after))));
            }
            tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, %message, "retrying HTTP delivery");
            self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tributary_http_retries_total").increment(1);
            tokio::select! {
                biased;
                () = tokio::time::sleep(delay) => {}
                () = deadline.reached() => return Err(cut(attempt, Some((message, retry_after)))),
            }
            last = Some((message, retry_after));
            attempt += 1;
        }
    }

    /// Delivers `batch` to `url`; when it is refused for its content (400, 413, 422), splits
    /// it with [`bisect`] until the refused visitors are alone, and delivers the rest.
    /// Rejected visitors are counted ([`crate::isolate::isolate`] exports
    /// `tributary_http_rejected_visitors_total`); reporting
    /// them is the caller's job.
    pub async fn deliver_bisecting(&self, url: &str, batch: &RawBatch) -> BisectOutcome {
        self.deliver_inner(url, batch, None, &DispatchDeadline::none())
            .await
    }

    /// [`HttpTransport::deliver_bisecting`] of a [`LogEvent`]'s batch, reusing its encoded
    /// body for the first request.
    pub async fn deliver_log_event(&self, url: &str, log_event: &LogEvent) -> BisectOutcome {
        self.deliver_log_event_until(url, log_event, &DispatchDeadline::none())
            .await
    }

    /// [`HttpTransport::deliver_log_event`] with every request it makes settled by
    /// `deadline` (see [`HttpTransport::send_until`]).
    pub async fn deliver_log_event_until(
        &self,
        url: &str,
        log_event: &LogEvent,
        deadline: &DispatchDeadline,
    ) -> BisectOutcome {
        self.deliver_inner(url, log_event.batch(), Some(log_event.body()), deadline)
            .await
    }

    async fn deliver_inner(
        &self,
        url: &str,
        batch: &RawBatch,
        encoded: Option<&Bytes>,
        deadline: &DispatchDeadline,
    ) -> BisectOutcome {
        let n = batch.visitors().len();
        let budget = IsolationBudget::new(self.inner.isolation_budget);
        let outcome = bisect(n, &budget, |range: Range<usize>| {
            let body = match encoded {
                Some(b) if range == (0..n) => b.clone(),
                _ => batch.slice(range).encode(),
            };
            self.send_until(url, body, deadline)
        })
        .await;
        if !outcome.rejected.is_empty() {
            let k = outcome.rejected.len() as u64;
            self.inner
                .counters
                .rejected_visitors
                .fetch_add(k, Ordering::Relaxed);
            tracing::warn!(
                rejected = k,
                total = n,
                requests = outcome.requests,
                "visitors rejected by the destination were isolated"
            );
        }
        outcome
    }

    async fn attempt(&self, url: &str, body: Bytes, timeout: Duration) -> Attempt {
        self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = self.inner.client.post(url).timeout(timeout).body(body);
        if self.inner.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let label = if e.is_timeout() { "timeout" } else { "error" };
                metrics::counter!("tributary_http_requests_total", "status" => label).increment(1);
                let (is_builder, timed_out) = (e.is_builder(), e.is_timeout());
                // reqwest names the URL in its message, password included: name it redacted.
                let message = format!("{} ({})", error_chain(&e.without_url()), redact_url(url));
                return if is_builder {
                    Attempt::Permanent { status: 0, message }
                } else {
                    Attempt::Retryable {
                        message,
                        retry_after: None,
                        timed_out,
                    }
                };
            }
        };
        let status = response.status();
        metrics::counter!("tributary_http_requests_total", "status" => status.as_str().to_owned())
            .increment(1);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let excerpt = read_excerpt(&mut response).await;
        let message = if excerpt.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {excerpt}")
        };
        match classify(status.as_u16()) {
            Classification::Success => Attempt::Delivered,
            Classification::Retryable => Attempt::Retryable {
                message,
                retry_after,
                timed_out: false,
            },
            Classification::Permanent => Attempt::Permanent {
                status: status.as_u16(),
                message,
            },
        }
    }
}

/// Reads up to [`MAX_DRAIN_BYTES`] of the body, so a small body leaves the connection
/// reusable, and returns its first [`MAX_MESSAGE_BYTES`] as text.
async fn read_excerpt(response: &mut reqwest::Response) -> String {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while read < MAX_DRAIN_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                let room = MAX_MESSAGE_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).trim().to_owned()
}

fn gzip(body: &[u8]) -> Result<Bytes, DispatchError> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::default(),
    );
    enc.write_all(body)
        .and_then(|()| enc.finish())
        .map(Bytes::from)
        .map_err(|e| DispatchError::Unavailable(format!("gzip: {e}")))
}

/// Checks that `url` can be an endpoint: it parses as a URL, its scheme is `http` or
/// `https`, it names a host, and any port it gives is not 0 (a malformed port does not
/// parse). The error shows the URL through [`redact_url`], so a password never reaches a
/// log.
///
/// ```
/// use tributary::dispatcher::transport::check_endpoint;
/// assert!(check_endpoint("https://relay.example:8443/v1/events").is_ok());
/// assert!(check_endpoint("ftp://relay.example/").is_err());
/// assert!(check_endpoint("http://relay.example:0/").is_err());
/// let e = check_endpoint("redis://me:s3cret@relay.example/").unwrap_err();
/// assert!(!e.to_string().contains("s3cret"));
/// ```
pub fn check_endpoint(url: &str) -> Result<(), HttpDispatcherError> {
    let invalid = |reason: String| HttpDispatcherError::InvalidEndpoint {
        endpoint: redact_url(url),
        reason,
    };
    // The parser's messages never repeat the input, so they are safe to keep.
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(invalid(format!("scheme {other:?} is not http or https"))),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    if parsed.port() == Some(0) {
        return Err(invalid("port 0 cannot be connected to".into()));
    }
    Ok(())
}

/// `url` with any password replaced by `***`, for logs and error messages; unparsable text
/// comes back as `<invalid URL>` (it may hold anything).
///
/// ```
/// use tributary::dispatcher::transport::redact_url;
/// assert_eq!(redact_url("https://me:s3cret@relay.example/v1/events"), "https://me:***@relay.example/v1/events");
/// assert_eq!(redact_url("http://127.0.0.1:8080/v1/events"), "http://127.0.0.1:8080/v1/events");
/// ```
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<invalid URL>".to_owned(),
    }
}

/// An error and its sources, `: `-separated (reqwest's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let t = HttpTransport::new(&HttpConfig::default()).unwrap();
        let batch = RawBatch::from_parts(Bytes::new(), vec![]);
        assert_send(&t.send("http://127.0.0.1:9/", Bytes::new()));
        assert_send(&t.deliver_bisecting("http://127.0.0.1:9/", &batch));
    }

    #[test]
    fn check_endpoint_wants_http_a_host_and_a_port() {
        for good in [
            "http://127.0.0.1:8080/v1/events",
            "https://logx.optimizely.com/v1/events",
            "http://[::1]:9/",
            "https://user:pw@relay.example/v1/events",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "relay.example/v1/events",
            "ftp://relay.example/",
            "file:///etc/passwd",
            "http://",
            "http://relay.example:99999/",
            "http://relay.example:port/",
            "http://relay.example:0/",
            "mailto:me@relay.example",
        ] {
            let e = check_endpoint(bad).unwrap_err();
            assert!(
                matches!(e, HttpDispatcherError::InvalidEndpoint { .. }),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn check_endpoint_errors_hide_passwords() {
        for url in [
            "ftp://me:s3cret@relay.example/",
            "http://me:s3cret@relay.example:0/",
        ] {
            let e = check_endpoint(url).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
            assert!(e.contains("me:***@relay.example"), "{e}");
        }
        let e = check_endpoint("http://me:s3cret@relay.example:99999/")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
