//! The upstreams a forwarder sends to, one per region, over one pooled HTTP client.

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
        })
    }

    /// Sends `body` to the upstream of `route`.
    pub async fn send(&self, route: &Route, body: Bytes) -> Result<(), DispatchError> {
        let url = match route.region() {
            Some(Region::Us) => &self.us,
            Some(Region::Eu) => &self.eu,
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
        result
    }
}
