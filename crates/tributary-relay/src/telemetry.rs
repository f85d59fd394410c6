//! Prometheus metrics: the recorder behind `GET /metrics`, and spool gauges.
//!
//! Every metric the relay exports, its own and the libraries' (all prefixed `tributary_`);
//! each event is counted once, under one name:
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `ingest_requests_total{status}` | counter | ingest answers by HTTP status |
//! | `ingest_events_total`, `ingest_bytes_total` | counter | accepted visitors and stored bytes |
//! | `spool_pending_payloads`, `spool_pending_bytes`, `spool_pending_events` | gauge | what waits |
//! | `spool_oldest_age_seconds` | gauge | age of the oldest pending payload |
//! | `spool_dead_letters` | gauge | dead letters held |
//! | `http_requests_total{status}` | counter | upstream attempts by answer: the status code, or `timeout` / `error` for none |
//! | `http_retries_total` | counter | attempts retried within one send |
//! | `http_rejected_visitors_total` | counter | visitors the upstream refused alone (isolated) |
//! | `upstream_retries_total` | counter | batches released to the spool for a later retry |
//! | `dead_letters_total` | counter | dead letters created (a visitor refused alone, or a payload past retention) |
//! | `connections_refused_total` | counter | connections closed at once because `--max-connections` were open |
//! | `isolation_requests_total` | counter | upstream requests spent isolating refused visitors |
//! | `isolation_budget_exhausted_total` | counter | cycles whose isolation budget ran out (the rest was released as suspect) |
//! | `spool_events{state}`, `spool_payloads{state}` | gauge | the spool's durable totals: `accepted`, `delivered`, `dead`, `purged`, `pending` (and `split` for payloads); SQLite only |
//! | `spool_balanced` | gauge | 1 when the durable totals balance (accepted = delivered + dead + purged + pending), else 0 |
//! | `spool_ready` | gauge | 1 when the spool takes appends, 0 when it refuses them (full disk, damaged file) |
//! | `forwarded_events_total` | counter | visitors delivered upstream |
//! | `upstream_batch_events`, `upstream_batch_bytes` | histogram | merged batch sizes |
//! | `upstream_latency_seconds` | histogram | one upstream send, its in-request retries included |
//! | `upstream_consecutive_failures` | gauge, `route` (`us`, `eu`) | transient failures in a row of that route's upstream (no answer, timeout, 5xx, 408, 429); 0 once it answers |
//! | `upstream_last_success_timestamp_seconds` | gauge, `route` | Unix time of the last 2xx from that route's upstream (absent until one) |
//! | `spool_held_bytes` | gauge | pending plus dead-letter bytes: what `--spool-max-bytes` counts (SQLite; 0 on SQS) |
//! | `spool_max_bytes` | gauge | the SQLite spool's size limit (`--spool-max-bytes`), for "near full" alerts; not exported for an SQS spool |
//! | `privacy_attributes_dropped_total{account}` | counter | visitor attributes removed by `--drop-attributes` / `--allow-attributes` |
//! | `privacy_visitor_ids_hashed_total{account}` | counter | visitor ids replaced by their HMAC (`--hash-visitor-ids`) |
//! | `privacy_visitors_rewritten_total{account}` | counter | visitors a privacy rule changed (written again) |
//! | `ingest_duplicate_events_total{account}` | counter | events dropped at ingest: their uuid was accepted within `--dedup-window` |
//! | `ingest_duplicate_visitors_dropped_total{account}` | counter | visitors dropped because no event was left |
//! | `quota_refused_requests_total{account}` | counter | requests answered 429: the account over `--max-pending-bytes-per-account` |
//! | `token_rate_limited_total{token}` | counter | requests answered 429 by `--token-rate-limit`; `token` is the token's position in the list, never the token |
//!
//! The `account` label is bounded ([`crate::account_labels`]): the accounts of
//! `[[privacy.account]]` tables and the first `--max-account-labels` others seen (default
//! 100) have their own value; every later account is counted under `account="other"`.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tributary_spool::Spool;

/// The process-wide Prometheus recorder, installed on first use. Histograms get buckets fit
/// for batch sizes and latencies rather than summaries, so they aggregate across relays.
///
/// `metrics` has one global recorder per process: relays run in one process (tests, an
/// embedding program) share it and its counters. A program that installed a recorder of its
/// own keeps it: the relay's metrics go there, and `/metrics` serves an empty page (logged).
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = match with_buckets(PrometheusBuilder::new()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "histogram buckets refused; using the defaults");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder is already installed in this process; the relay's \
                     metrics go to it and /metrics serves nothing"
                );
            }
            handle
        })
        .clone()
}

/// Buckets for the histograms, so they aggregate across relays.
fn with_buckets(
    builder: PrometheusBuilder,
) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    builder
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
        )
}

/// Exports the configured limits alerts compare against: `--spool-max-bytes` bounds only
/// a SQLite spool, so an SQS spool exports none.
pub fn record_limits(config: &crate::config::RelayConfig) {
    if !config.spool.starts_with("sqs://") {
        metrics::gauge!("tributary_spool_max_bytes").set(config.spool_max_bytes as f64);
    }
}

/// Refreshes the spool gauges every few seconds until `stop`.
pub async fn spool_gauges(spool: Arc<dyn Spool>, mut stop: watch::Receiver<bool>) {
    loop {
        match spool.stats().await {
            Ok(s) => {
                metrics::gauge!("tributary_spool_pending_payloads").set(s.pending as f64);
                metrics::gauge!("tributary_spool_pending_bytes").set(s.pending_bytes as f64);
                // What --spool-max-bytes counts: pending and dead letters.
                metrics::gauge!("tributary_spool_held_bytes")
                    .set(s.pending_bytes.saturating_add(s.dead_bytes) as f64);
                metrics::gauge!("tributary_spool_pending_events").set(s.pending_events as f64);
                metrics::gauge!("tributary_spool_oldest_age_seconds")
                    .set(s.oldest_age_ms as f64 / 1000.0);
                metrics::gauge!("tributary_spool_dead_letters").set(s.dead_letters as f64);
            }
            Err(e) => tracing::warn!(error = %e, "spool stats unavailable"),
        }
        if let Ok(Some(t)) = spool.totals().await {
            for (kind, ledger) in [("events", t.events), ("payloads", t.payloads)] {
                for (state, v) in [
                    ("accepted", ledger.accepted),
                    ("delivered", ledger.delivered),
                    ("dead", ledger.dead),
                    ("purged", ledger.purged),
                    ("pending", ledger.pending),
                ] {
                    let name = if kind == "events" {
                        "tributary_spool_events"
                    } else {
                        "tributary_spool_payloads"
                    };
                    metrics::gauge!(name, "state" => state).set(v as f64);
                }
            }
            metrics::gauge!("tributary_spool_payloads", "state" => "split")
                .set(t.split_payloads as f64);
            let balanced = if t.imbalances().is_empty() { 1.0 } else { 0.0 };
            metrics::gauge!("tributary_spool_balanced").set(balanced);
        }
        let ready = if spool.check_ready().await.is_ok() {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("tributary_spool_ready").set(ready);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
}
