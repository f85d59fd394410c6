//! The upstreams a relay forwards to, one per route, over one pooled HTTP client.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary::DispatchError;
use tributary::dispatcher::transport::{HttpConfig, HttpTransport};
use tributary::retry::RetryPolicy;

use crate::config::RelayConfig;

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
    pub fn new(config: &RelayConfig) -> anyhow::Result<Upstreams> {
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
            us: config.upstream.clone(),
            eu: config.eu_upstream.clone(),
            transport: HttpTransport::new(&http)?,
        })
    }

    /// Sends `body` to the upstream of `route`.
    pub async fn send(&self, route: &str, body: Bytes) -> Result<(), DispatchError> {
        let url = match route {
            "us" => &self.us,
            "eu" => &self.eu,
            other => {
                // A route this relay does not know (written by a newer version): never guess
                // an endpoint, EU data must not reach the US.
                return Err(DispatchError::Unavailable(format!(
                    "no upstream for route {other:?}"
                )));
            }
        };
        let started = Instant::now();
        let result = self.transport.send(url, body).await;
        metrics::histogram!("tributary_upstream_latency_seconds")
            .record(started.elapsed().as_secs_f64());
        let status = match &result {
            Ok(()) => "2xx".to_owned(),
            Err(DispatchError::Permanent { status, .. }) => status.to_string(),
            Err(DispatchError::Transient { .. }) => "transient".to_owned(),
            Err(_) => "error".to_owned(),
        };
        metrics::counter!("tributary_upstream_requests_total", "status" => status).increment(1);
        result
    }
}
