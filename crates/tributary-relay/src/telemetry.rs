//! Prometheus metrics: the recorder behind `GET /metrics`, and spool gauges.
//!
//! Metric names (all prefixed `tributary_`):
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `ingest_requests_total{status}` | counter | ingest answers by HTTP status |
//! | `ingest_events_total`, `ingest_bytes_total` | counter | accepted visitors and stored bytes |
//! | `spool_pending_payloads`, `spool_pending_bytes`, `spool_pending_events` | gauge | what waits |
//! | `spool_oldest_age_seconds` | gauge | age of the oldest pending payload |
//! | `spool_dead_letters` | gauge | dead letters held |
//! | `upstream_requests_total{status}` | counter | upstream answers (`error` for no answer) |
//! | `upstream_retries_total` | counter | batches released for a later retry |
//! | `dead_letters_total` | counter | payloads moved to dead letters |
//! | `forwarded_events_total` | counter | visitors delivered upstream |
//! | `upstream_batch_events`, `upstream_batch_bytes` | histogram | merged batch sizes |
//! | `upstream_latency_seconds` | histogram | one upstream request |

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tributary_spool::Spool;

/// Installs the process-wide Prometheus recorder. Histograms get buckets fit for batch sizes
/// and latencies rather than summaries, so they aggregate across relays.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tributary_upstream_batch_events".into()),
            &[1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("tributary_upstream_batch_bytes".into()),
            &[1e3, 1e4, 1e5, 5e5, 1e6, 2e6, 3.5e6],
        )?
        .set_buckets_for_metric(
            Matcher::Full("tributary_upstream_latency_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install_recorder()?;
    Ok(handle)
}

/// Refreshes the spool gauges every few seconds until `stop`.
pub async fn spool_gauges(spool: Arc<dyn Spool>, mut stop: watch::Receiver<bool>) {
    loop {
        match spool.stats().await {
            Ok(s) => {
                metrics::gauge!("tributary_spool_pending_payloads").set(s.pending as f64);
                metrics::gauge!("tributary_spool_pending_bytes").set(s.pending_bytes as f64);
                metrics::gauge!("tributary_spool_pending_events").set(s.pending_events as f64);
                metrics::gauge!("tributary_spool_oldest_age_seconds")
                    .set(s.oldest_age_ms as f64 / 1000.0);
                metrics::gauge!("tributary_spool_dead_letters").set(s.dead_letters as f64);
            }
            Err(e) => tracing::warn!(error = %e, "spool stats unavailable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
}
