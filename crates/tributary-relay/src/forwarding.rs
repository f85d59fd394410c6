//! The relay's forwarder, built from its settings: shared by `serve` and `drain`.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::Notify;
use tributary_spool::Spool;
use tributary_spool::forward::{Forwarder, ForwarderConfig, UpstreamConfig, Upstreams};

use crate::config::RelayConfig;

impl RelayConfig {
    /// The forwarder's limits from the relay's settings.
    pub fn forwarder_config(&self) -> ForwarderConfig {
        ForwarderConfig {
            max_batch_bytes: self.max_batch_bytes,
            max_batch_events: self.max_batch_events,
            concurrency: self.concurrency,
            flush_interval: self.flush_interval,
            max_retry_delay: self.max_retry_delay,
            lease_for: self.lease_timeout,
            isolation_budget: self.isolation_budget,
            ..ForwarderConfig::default()
        }
    }

    /// Where each route's payloads go.
    pub fn upstream_config(&self) -> UpstreamConfig {
        UpstreamConfig {
            us: self.upstream.clone(),
            eu: self.eu_upstream.clone(),
            request_timeout: self.request_timeout,
        }
    }
}

/// A forwarder from `spool` to the configured upstreams, woken early by `wake` once
/// `appended` bytes fill a batch (ingest counts them; `drain` passes fresh ones).
pub fn forwarder(
    config: &RelayConfig,
    spool: Arc<dyn Spool>,
    wake: Arc<Notify>,
    appended: Arc<AtomicUsize>,
) -> anyhow::Result<Forwarder> {
    let upstreams = Arc::new(Upstreams::new(&config.upstream_config())?);
    Ok(Forwarder::new(
        spool,
        upstreams,
        config.forwarder_config(),
        wake,
        appended,
    ))
}
