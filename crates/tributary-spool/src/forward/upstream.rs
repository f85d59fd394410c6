//! The upstreams a forwarder sends to, one per region, over one pooled HTTP client.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary::retry::RetryPolicy;
use tributary::{DispatchError, HttpConfig, HttpTransport, Region};

use crate::Route;

/// Where each region's payloads go, and how long one request may take.
///
/// ```
/// use tributary_spool::forward::UpstreamConfig;
/// let config = UpstreamConfig::default();
/// assert_eq!(config.eu, "https://eu.logx.optimizely.com/v1/events");
/// ```
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// URL for [`Route::US`] payloads (default: the US Event API).
    pub us: String,
    /// URL for [`Route::EU`] payloads (default: the EU Event API).
    pub eu: String,
    /// Timeout of one attempt (default 10 s).
    pub request_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            us: Region::Us.endpoint().to_owned(),
            eu: Region::Eu.endpoint().to_owned(),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The US and EU upstream URLs and the client that reaches them.
pub struct Upstreams {
    us: String,
    eu: String,
    transport: HttpTransport,
    health: Mutex<RouteHealth>,
}

/// How each region's upstream has been answering: one outage does not hide behind the
/// other region's successes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteHealth {
    /// The US upstream ([`Route::US`]).
    pub us: UpstreamHealth,
    /// The EU upstream ([`Route::EU`]).
    pub eu: UpstreamHealth,
}

/// How one upstream has been answering, for a status page: kept in memory, reset on start.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UpstreamHealth {
    /// When a send last succeeded (2xx), in milliseconds since the Unix epoch.
    pub last_success_ms: Option<u64>,
    /// When a send last failed transiently (no answer, timeout, 5xx, 408, 429), in
    /// milliseconds since the Unix epoch.
    pub last_failure_ms: Option<u64>,
    /// Transient failures in a row since the upstream last answered (2xx, or a refusal of
    /// some visitors: a 4xx means it is up).
    pub consecutive_failures: u64,
    /// The last failure's message (status or I/O error; no payload content), at most
    /// [`UpstreamHealth::MAX_ERROR_CHARS`] characters.
    pub last_error: Option<String>,
}

impl UpstreamHealth {
    /// Longest `last_error` kept.
    pub const MAX_ERROR_CHARS: usize = 300;

    /// Notes one send's result and sets the route's gauges (`route` is `us` or `eu`).
    fn record(&mut self, route: &'static str, result: &Result<(), DispatchError>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match result {
            Ok(()) => {
                self.last_success_ms = Some(now);
                self.consecutive_failures = 0;
            }
            Err(e @ (DispatchError::Transient { .. } | DispatchError::Unavailable(_))) => {
                self.last_failure_ms = Some(now);
                self.consecutive_failures += 1;
                self.last_error = Some(e.to_string().chars().take(Self::MAX_ERROR_CHARS).collect());
            }
            // A refusal is an answer: the upstream is up, the payload is the problem.
            Err(_) => self.consecutive_failures = 0,
        }
        metrics::gauge!("tributary_upstream_consecutive_failures", "route" => route)
            .set(self.consecutive_failures as f64);
        if let Some(t) = self.last_success_ms {
            metrics::gauge!("tributary_upstream_last_success_timestamp_seconds", "route" => route)
                .set(t as f64 / 1000.0);
        }
    }
}

impl Upstreams {
    /// Builds the shared client. Retries inside one send are few and short: a payload that
    /// keeps failing goes back to the durable spool with a growing delay instead of holding a
    /// connection and a lease.
    pub fn new(config: &UpstreamConfig) -> Result<Upstreams, tributary::HttpDispatcherError> {
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            total_budget: config.request_timeout * 3,
            ..RetryPolicy::default()
        };
        let http = HttpConfig {
            request_timeout: config.request_timeout,
            retry,
            ..HttpConfig::default()
        };
        Ok(Upstreams {
            us: config.us.clone(),
            eu: config.eu.clone(),
            transport: HttpTransport::new(&http)?,
            health: Mutex::default(),
        })
    }

    /// Sends `body` to the upstream of `route`.
    pub async fn send(&self, route: &Route, body: Bytes) -> Result<(), DispatchError> {
        let (url, region) = match route.region() {
            Some(Region::Us) => (&self.us, Region::Us),
            Some(Region::Eu) => (&self.eu, Region::Eu),
            None => {
                // A route this version does not know (written by a newer one): never guess
                // an endpoint, EU data must not reach the US.
                return Err(DispatchError::Unavailable(format!(
                    "no upstream for route {:?}",
                    route.as_str()
                )));
            }
        };
        let started = Instant::now();
        let result = self.transport.send(url, body).await;
        metrics::histogram!("tributary_upstream_latency_seconds")
            .record(started.elapsed().as_secs_f64());
        let mut health = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match region {
            Region::Us => health.us.record("us", &result),
            Region::Eu => health.eu.record("eu", &result),
        }
        drop(health);
        result
    }

    /// How each upstream has been answering since this client was built.
    pub fn health(&self) -> RouteHealth {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
