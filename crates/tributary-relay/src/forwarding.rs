//! The relay's forwarder, built from its settings: shared by `serve` and `drain`.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::Notify;
use tributary_spool::Spool;
use tributary_spool::forward::{
    DEFAULT_TURN_BYTES, Forwarder, ForwarderConfig, UpstreamConfig, Upstreams,
};

use crate::config::RelayConfig;
use crate::spool_addr::SpoolAddr;

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

/// Whether ingest appends to the spool while this forwarder reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beside {
    /// `serve`: ingest shares the spool.
    Ingest,
    /// `drain` and the Lambda modes: nothing else writes.
    Nothing,
}

/// A forwarder from `spool` to the configured upstreams, woken early by `wake` once
/// `appended` bytes fill a batch (ingest counts them; `drain` passes fresh ones).
///
/// Turns ([`Forwarder::with_turn_bytes`], 1 MiB) are on only beside ingest over a SQLite
/// spool: there every lease and ack queues in front of ingest's appends on the one writer
/// thread. Over SQS each extra lease is a request that can long-poll, and with nothing
/// beside it a drain only loses throughput to them (0.64-0.77x measured), so it is off.
pub fn forwarder(
    config: &RelayConfig,
    spool: Arc<dyn Spool>,
    wake: Arc<Notify>,
    appended: Arc<AtomicUsize>,
    beside: Beside,
) -> anyhow::Result<Forwarder> {
    let upstreams = Arc::new(Upstreams::new(&config.upstream_config())?);
    let forwarder = Forwarder::new(spool, upstreams, config.forwarder_config(), wake, appended);
    let sqlite = matches!(SpoolAddr::parse(&config.spool), SpoolAddr::Sqlite(_));
    if beside == Beside::Ingest && sqlite {
        return Ok(forwarder.with_turn_bytes(DEFAULT_TURN_BYTES.min(config.max_batch_bytes))?);
    }
    Ok(forwarder)
}
