//! Range checks of the relay's own settings. The SQS settings are checked by the spool
//! crate ([`tributary_spool::SqsConfig::check`]), which owns them.

use std::time::Duration;

use tributary_spool::SqsSetting;

use super::{ConfigError, RelayConfig};
use crate::spool_addr::{self, SpoolAddr};

/// Checks an upstream URL with the library's endpoint check (http or https, a host, a
/// usable port; passwords redacted in the message), naming the setting.
fn check_url(name: &'static str, url: &str) -> Result<(), ConfigError> {
    tributary::dispatcher::transport::check_endpoint(url).map_err(|e| ConfigError::Invalid {
        name,
        message: e.to_string(),
    })
}

impl RelayConfig {
    /// Refuses values out of range, naming the setting as the file does.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_owned(),
            })
        };
        check_url("upstream", &self.upstream)?;
        check_url("eu-upstream", &self.eu_upstream)?;
        if self.spool.trim().is_empty() {
            return invalid("spool", "must name a directory or sqs://QUEUE");
        }
        if self.spool_max_bytes < 1024 {
            return invalid("spool-max-bytes", "must be at least 1024");
        }
        if self.max_retry_delay < Duration::from_millis(100) {
            return invalid(
                "max-retry-delay",
                "must be at least 100ms (shorter retries hammer a failing upstream)",
            );
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return invalid("shutdown-grace", "must be at most 1h");
        }
        // Smallest useful payload: a header and one small visitor.
        if self.max_batch_bytes < 1024 {
            return invalid("max-batch-bytes", "must be at least 1024");
        }
        // Body bytes are counted in semaphore permits, taken at most u32::MAX at a time.
        if !(1024..=1 << 30).contains(&self.max_body_bytes) {
            return invalid(
                "max-body-bytes",
                "must be between 1024 and 1073741824 (1 GiB)",
            );
        }
        if self.max_buffered_bytes > u32::MAX as usize {
            return invalid(
                "max-buffered-bytes",
                "must be at most 4294967295 (4 GiB less one byte)",
            );
        }
        if self.max_batch_events == 0 {
            return invalid("max-batch-events", "must be at least 1");
        }
        if self.max_buffered_bytes < self.max_body_bytes {
            return invalid(
                "max-buffered-bytes",
                "must be at least max-body-bytes, or the largest request could never be read",
            );
        }
        if self.max_concurrent_requests == 0 || self.max_concurrent_requests > 1_000_000 {
            return invalid("max-concurrent-requests", "must be between 1 and 1000000");
        }
        if self.max_connections == Some(0) {
            return invalid("max-connections", "must be at least 1");
        }
        if self.header_timeout < Duration::from_millis(100) {
            return invalid("header-timeout", "must be at least 100ms");
        }
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            return invalid("max-header-bytes", "must be between 8192 and 1048576");
        }
        if !(1..=1000).contains(&self.h2_max_streams) {
            return invalid("h2-max-streams", "must be between 1 and 1000");
        }
        if self.body_timeout < Duration::from_millis(100) {
            return invalid("body-timeout", "must be at least 100ms");
        }
        // One descent from a whole batch to one visitor costs 2·⌈log2 n⌉ requests; a budget
        // below that could spend every cycle without ever isolating anything.
        let descent = 2
            * (usize::BITS
                - self
                    .max_batch_events
                    .max(2)
                    .saturating_sub(1)
                    .leading_zeros()) as usize;
        if self.isolation_budget < descent || self.isolation_budget > 1_000_000 {
            return Err(ConfigError::Invalid {
                name: "isolation-budget",
                message: format!(
                    "must be between {descent} (2·⌈log2 max-batch-events⌉, one descent to a \
                     single visitor) and 1000000"
                ),
            });
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return invalid("concurrency", "must be between 1 and 256");
        }
        if self.flush_interval < Duration::from_millis(1) {
            return invalid(
                "flush-interval",
                "must be at least 1ms (shorter spins the forwarder on an idle relay)",
            );
        }
        if self.request_timeout < Duration::from_millis(10) {
            return invalid("request-timeout", "must be at least 10ms");
        }
        if self.retention < Duration::from_secs(60) {
            return invalid("retention", "must be at least 1m");
        }
        if self.lease_timeout < Duration::from_secs(1)
            || self.lease_timeout > Duration::from_secs(43_200)
        {
            return invalid("lease-timeout", "must be between 1s and 12h");
        }
        self.check_shared()?;
        // The SQS settings are checked whatever the spool, so a bad value fails at once and
        // not on the day the relay moves to SQS; the spool crate owns their ranges.
        let queue = match spool_addr::SpoolAddr::parse(&self.spool) {
            SpoolAddr::Sqs(queue) => queue,
            SpoolAddr::Sqlite(_) => "(not an SQS spool)".to_owned(),
        };
        spool_addr::sqs_config(queue, self).check().map_err(|e| {
            let name = match e.setting {
                SqsSetting::WaitTime => "sqs-wait-time",
                SqsSetting::Receivers => "sqs-receivers",
                SqsSetting::MaxMessageBytes => "sqs-max-message-bytes",
                // Not relay settings (the queue is part of spool; the others keep the spool
                // crate's defaults): the spool crate's words say which.
                SqsSetting::Queue | SqsSetting::Concurrency | SqsSetting::Attempts => {
                    return ConfigError::Invalid {
                        name: "spool",
                        message: e.to_string(),
                    };
                }
            };
            ConfigError::Invalid {
                name,
                message: e.requirement.to_owned(),
            }
        })?;
        Ok(())
    }
}

impl RelayConfig {
    /// The rules of a relay many teams share: duplicate filter, quota, rate limit.
    fn check_shared(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_owned(),
            })
        };
        if self.dedup_window > Duration::from_secs(30 * 86_400) {
            return invalid("dedup-window", "must be at most 30days");
        }
        if !(1..=100_000_000).contains(&self.dedup_cache_uuids) {
            return invalid("dedup-cache-uuids", "must be between 1 and 100000000");
        }
        if !(1..=1_000_000_000).contains(&self.dedup_max_uuids) {
            return invalid("dedup-max-uuids", "must be between 1 and 1000000000");
        }
        if self.max_account_labels > 100_000 {
            return invalid("max-account-labels", "must be at most 100000");
        }
        let sqlite = matches!(
            spool_addr::SpoolAddr::parse(&self.spool),
            SpoolAddr::Sqlite(_)
        );
        if let Some(limit) = self.max_pending_bytes_per_account {
            if limit < 1024 {
                return invalid("max-pending-bytes-per-account", "must be at least 1024");
            }
            if !sqlite {
                return invalid(
                    "max-pending-bytes-per-account",
                    "needs the SQLite spool, which counts pending bytes per account (an SQS \
                     queue does not say whose messages it holds)",
                );
            }
        }
        if let Some(rate) = self.token_rate_limit {
            // Below a request in 1000 s, the wait until the next one is not worth telling
            // (and a tiny rate would make that wait overflow a Duration).
            if !(rate.is_finite() && (0.001..=1_000_000.0).contains(&rate)) {
                return invalid(
                    "token-rate-limit",
                    "must be at least 0.001 and at most 1000000",
                );
            }
            if self.auth_tokens.is_empty() {
                return invalid(
                    "token-rate-limit",
                    "needs auth-tokens (or auth-tokens-file): the limit is per bearer token",
                );
            }
        } else if self.token_burst.is_some() {
            return invalid("token-burst", "needs token-rate-limit");
        }
        if self.token_burst == Some(0) {
            return invalid("token-burst", "must be at least 1");
        }
        Ok(())
    }
}
