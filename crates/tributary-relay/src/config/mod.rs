//! Relay settings: flags, environment variables and a TOML file, layered over one set of
//! defaults into one [`RelayConfig`].
//!
//! Precedence: a flag, then its environment variable, then the `--config` file, then the
//! default. Every setting has all three forms: `--max-batch-bytes`, `TRIBUTARY_MAX_BATCH_BYTES`,
//! and `max-batch-bytes = 3500000` in the file.
//!
//! - [`RelaySettings`]: what one source sets. clap reads the flags and their variables into
//!   one (a flag over its variable); the file is another ([`RelaySettings::from_file`]).
//! - [`LayeredSettings`]: the sources over the defaults. [`LayeredSettings::default`] is
//!   the only place a default is written; `--help` shows it ([`document_defaults`]).
//! - [`RelayConfig`]: resolved (tokens read, lease decided) and checked; what the relay
//!   runs with, and what `tributary serve --print-config` prints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

mod check;
mod files;
mod settings;
#[cfg(test)]
mod tests;

pub use settings::{
    AccountPrivacy, DEFAULT_MAX_CONNECTIONS, HumanDuration, LayeredSettings, PrivacyTable,
    RelaySettings, described_default, document_defaults,
};
/// How appends are made durable in the SQLite spool (the spool crate's own type).
pub use tributary_spool::{Compression, SyncMode};

use settings::human;

/// The resolved relay configuration. Serialized, it is a `--config` file of these values
/// (without the tokens, with passwords in URLs as `***`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RelayConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// US upstream URL.
    #[serde(serialize_with = "redacted")]
    pub upstream: String,
    /// EU upstream URL.
    #[serde(serialize_with = "redacted")]
    pub eu_upstream: String,
    /// Spool address.
    pub spool: String,
    /// Request body limit after decompression.
    pub max_body_bytes: usize,
    /// Upstream payload size limit.
    pub max_batch_bytes: usize,
    /// Upstream payload visitor limit.
    pub max_batch_events: usize,
    /// Merge window.
    #[serde(with = "human")]
    pub flush_interval: Duration,
    /// Upstream requests in flight.
    pub concurrency: usize,
    /// Upstream request timeout.
    #[serde(with = "human")]
    pub request_timeout: Duration,
    /// Cap on the delay before a failed payload is retried.
    #[serde(with = "human")]
    pub max_retry_delay: Duration,
    /// Spool size limit.
    pub spool_max_bytes: u64,
    /// Free space kept for delivery on the SQLite spool's file system.
    pub spool_reserve_bytes: u64,
    /// Isolation requests per forwarding cycle.
    pub isolation_budget: usize,
    /// Request-body bytes held in memory at once, all requests together.
    pub max_buffered_bytes: usize,
    /// Ingest requests handled at once.
    pub max_concurrent_requests: usize,
    /// Longest time a request body may take to arrive.
    #[serde(with = "human")]
    pub body_timeout: Duration,
    /// Client connections at once, if set (else what the file limit leaves, at most
    /// [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: Option<usize>,
    /// Longest wait for a request head.
    #[serde(with = "human")]
    pub header_timeout: Duration,
    /// Header bytes buffered per connection.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection.
    pub h2_max_streams: u32,
    /// Retention before dead-lettering.
    #[serde(with = "human")]
    pub retention: Duration,
    /// SQLite sync mode.
    pub spool_sync: SyncMode,
    /// How the SQLite spool stores visitor runs.
    pub spool_compression: Compression,
    /// Accepted bearer tokens; empty means no auth. Never printed.
    #[serde(skip)]
    pub auth_tokens: Vec<String>,
    /// Shutdown drain time.
    #[serde(with = "human")]
    pub shutdown_grace: Duration,
    /// How long a forwarder's lease hides payloads from other forwarders.
    #[serde(with = "human")]
    pub lease_timeout: Duration,
    /// SQS dead-letter queue (name or URL), if set.
    pub sqs_dead_letter_queue: Option<String>,
    /// SQS receive count past which a message is dead-lettered; 0 = never.
    pub sqs_max_receives: u32,
    /// SQS long-polling wait.
    #[serde(with = "human")]
    pub sqs_wait_time: Duration,
    /// SQS receives in flight per lease.
    pub sqs_receivers: usize,
    /// SQS message size limit.
    pub sqs_max_message_bytes: usize,
    /// Attributes removed (privacy), relay-wide.
    pub drop_attributes: Option<Vec<String>>,
    /// Attributes kept (privacy), relay-wide.
    pub allow_attributes: Option<Vec<String>>,
    /// Visitor ids replaced by their HMAC, relay-wide.
    pub hash_visitor_ids: bool,
    /// The HMAC key's file (the key itself is never printed).
    pub hash_key_file: Option<PathBuf>,
    /// Duplicate-filter window; zero: off.
    #[serde(with = "human")]
    pub dedup_window: Duration,
    /// Duplicate-filter uuids in memory.
    pub dedup_cache_uuids: usize,
    /// Duplicate-filter uuids on disk.
    pub dedup_max_uuids: u64,
    /// Pending bytes per account before 429.
    pub max_pending_bytes_per_account: Option<u64>,
    /// Requests per second per bearer token.
    pub token_rate_limit: Option<f64>,
    /// Token-bucket size per bearer token.
    pub token_burst: Option<u32>,
    /// Accounts with a metric label of their own, besides the per-account tables'.
    pub max_account_labels: usize,
    /// The rules resolved: relay-wide and per account, with the key read.
    #[serde(skip)]
    pub privacy_rules: crate::privacy::PrivacyRules,
    /// Per-account privacy rules as the file gave them (printed last: a TOML table).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyTable>,
}

fn redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&tributary::dispatcher::transport::redact_url(url))
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is too large or not a regular file.
    #[error("config file {path}: {message}")]
    Unfit {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value out of range.
    #[error("invalid setting {name}: {message}")]
    Invalid {
        /// Setting name as in the file.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The settings could not be layered or printed: a value serde cannot carry, such as a
    /// path that is not UTF-8.
    #[error("cannot represent the settings: {0}")]
    Layering(String),
}

impl ConfigError {
    fn layering(e: impl std::fmt::Display) -> ConfigError {
        ConfigError::Layering(e.to_string())
    }
}

impl RelaySettings {
    /// Resolves `self` (flags and env) over `file` over the defaults, and checks the result.
    pub fn resolve(self, file: RelaySettings) -> Result<RelayConfig, ConfigError> {
        // Checked before layering: the layers meet as JSON, where NaN becomes null, which
        // would read as "no limit".
        if [&file, &self]
            .iter()
            .any(|s| s.token_rate_limit.is_some_and(f64::is_nan))
        {
            return Err(ConfigError::Invalid {
                name: "token-rate-limit",
                message: "must be at least 0.001 and at most 1000000".to_owned(),
            });
        }
        LayeredSettings::layer(&[&file, &self])?.into_config()
    }
}

impl LayeredSettings {
    /// The configuration these settings make: the token file read, the lease decided
    /// ([`LayeredSettings::lease_timeout`]), every range checked.
    pub fn into_config(self) -> Result<RelayConfig, ConfigError> {
        let lease_timeout = self.lease_timeout();
        let config = RelayConfig {
            auth_tokens: files::auth_tokens(self.auth_tokens, self.auth_tokens_file.as_deref())?,
            lease_timeout,
            listen: self.listen,
            upstream: self.upstream,
            eu_upstream: self.eu_upstream,
            spool: self.spool,
            max_body_bytes: self.max_body_bytes,
            max_batch_bytes: self.max_batch_bytes,
            max_batch_events: self.max_batch_events,
            flush_interval: self.flush_interval,
            concurrency: self.concurrency,
            request_timeout: self.request_timeout,
            max_retry_delay: self.max_retry_delay,
            spool_max_bytes: self.spool_max_bytes,
            spool_reserve_bytes: self.spool_reserve_bytes,
            isolation_budget: self.isolation_budget,
            max_buffered_bytes: self.max_buffered_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            body_timeout: self.body_timeout,
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
            max_header_bytes: self.max_header_bytes,
            h2_max_streams: self.h2_max_streams,
            retention: self.retention,
            spool_sync: self.spool_sync,
            spool_compression: self.spool_compression,
            shutdown_grace: self.shutdown_grace,
            sqs_dead_letter_queue: self.sqs_dead_letter_queue,
            sqs_max_receives: self.sqs_max_receives,
            sqs_wait_time: self.sqs_wait_time,
            sqs_receivers: self.sqs_receivers,
            sqs_max_message_bytes: self.sqs_max_message_bytes,
            privacy_rules: files::privacy_rules(
                self.drop_attributes.as_deref(),
                self.allow_attributes.as_deref(),
                self.hash_visitor_ids,
                self.hash_key_file.as_deref(),
                self.privacy.as_ref(),
            )?,
            drop_attributes: self.drop_attributes,
            allow_attributes: self.allow_attributes,
            hash_visitor_ids: self.hash_visitor_ids,
            hash_key_file: self.hash_key_file,
            dedup_window: self.dedup_window,
            dedup_cache_uuids: self.dedup_cache_uuids,
            dedup_max_uuids: self.dedup_max_uuids,
            max_pending_bytes_per_account: self.max_pending_bytes_per_account,
            token_rate_limit: self.token_rate_limit,
            token_burst: self.token_burst,
            max_account_labels: self.max_account_labels,
            privacy: self.privacy,
        };
        config.check()?;
        Ok(config)
    }
}

impl RelayConfig {
    /// The configuration as a `--config` TOML file, for `tributary serve --print-config`.
    /// Tokens are counted, not shown; passwords in URLs are `***`; settings not set are
    /// comments that say what happens without them.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let mut out = String::from(
            "# The settings this relay runs with: flags over TRIBUTARY_* variables over the\n\
             # --config file over the defaults.\n",
        );
        out.push_str(&match self.auth_tokens.len() {
            0 => "# auth-tokens: none (no authentication)\n".to_owned(),
            n => format!("# auth-tokens: {n} accepted, not shown\n"),
        });
        out.push_str(&toml::to_string(self).map_err(ConfigError::layering)?);
        let values = serde_json::to_value(self).map_err(ConfigError::layering)?;
        let unset = values
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.is_null());
        for (key, _) in unset {
            let default = described_default(key).unwrap_or_else(|| "none".to_owned());
            out.push_str(&format!("# {key}: not set ({default})\n"));
        }
        Ok(out)
    }
}
