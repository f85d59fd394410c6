//! Relay settings: flags, environment variables and a TOML file, resolved into one
//! [`RelayConfig`] with documented defaults.
//!
//! Precedence: a flag, then its environment variable, then the `--config` file, then the
//! default. Every setting has all three forms: `--max-batch-bytes`, `TRIBUTARY_MAX_BATCH_BYTES`,
//! and `max-batch-bytes = 3500000` in the file.

// The field docs are also `--help` text, where URLs must stay bare.
#![allow(rustdoc::bare_urls)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// A duration written the human way: `500ms`, `30s`, `5m`, `4days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How appends are made durable in the SQLite spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every group commit: survives power loss.
    Full,
    /// fsync at checkpoints only: survives a crash of the relay (`kill -9`), not of the host.
    Normal,
}

/// Settings shared by `serve` and `drain`. Every field is optional here; [`RelayConfig`]
/// holds the resolved values.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RelaySettings {
    /// Address to accept Event API payloads on [default: 127.0.0.1:8080].
    #[arg(long, env = "TRIBUTARY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Where `POST /v1/events` payloads go [default: https://logx.optimizely.com/v1/events].
    #[arg(long, env = "TRIBUTARY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Where `POST /eu/v1/events` payloads go [default: https://eu.logx.optimizely.com/v1/events].
    #[arg(long, env = "TRIBUTARY_EU_UPSTREAM", value_name = "URL")]
    pub eu_upstream: Option<String>,

    /// Spool: a directory for the embedded SQLite spool, or sqs://QUEUE (a name or a queue
    /// URL) for AWS SQS [default: ./tributary-spool].
    #[arg(long, env = "TRIBUTARY_SPOOL", value_name = "DIR|sqs://QUEUE")]
    pub spool: Option<String>,

    /// Largest request body accepted, after decompression, in bytes [default: 16777216].
    /// Payloads over max-batch-bytes are accepted and split by visitors.
    #[arg(long, env = "TRIBUTARY_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Largest payload sent upstream, in bytes [default: 3500000, the Event API's limit].
    #[arg(long, env = "TRIBUTARY_MAX_BATCH_BYTES", value_name = "BYTES")]
    pub max_batch_bytes: Option<usize>,

    /// Most visitors (events) in one upstream payload [default: 10000].
    #[arg(long, env = "TRIBUTARY_MAX_BATCH_EVENTS", value_name = "N")]
    pub max_batch_events: Option<usize>,

    /// How long a payload may wait for others to merge with [default: 1s].
    #[arg(long, env = "TRIBUTARY_FLUSH_INTERVAL", value_name = "DURATION")]
    pub flush_interval: Option<HumanDuration>,

    /// Upstream requests in flight at once [default: 4].
    #[arg(long, env = "TRIBUTARY_CONCURRENCY", value_name = "N")]
    pub concurrency: Option<usize>,

    /// Upstream request timeout [default: 10s].
    #[arg(long, env = "TRIBUTARY_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<HumanDuration>,

    /// Longest wait before a failed payload is tried again [default: 5m].
    #[arg(long, env = "TRIBUTARY_MAX_RETRY_DELAY", value_name = "DURATION")]
    pub max_retry_delay: Option<HumanDuration>,

    /// Spool size limit in bytes; past it ingest answers 503 [default: 1073741824].
    #[arg(long, env = "TRIBUTARY_SPOOL_MAX_BYTES", value_name = "BYTES")]
    pub spool_max_bytes: Option<u64>,

    /// SQLite spool: free space kept on its file system for delivery; ingest answers 503
    /// once less than this (plus twice the request) is left, so the forwarder can always
    /// lease, acknowledge and checkpoint, and free the disk [default: 67108864].
    #[arg(long, env = "TRIBUTARY_SPOOL_RESERVE_BYTES", value_name = "BYTES")]
    pub spool_reserve_bytes: Option<u64>,

    /// Most upstream requests one forwarding cycle spends isolating the visitors the
    /// upstream refuses (400, 413, 422) [default: 1000]. What is not isolated when it runs
    /// out is sent again a second later in smaller batches; it is never dead-lettered.
    #[arg(long, env = "TRIBUTARY_ISOLATION_BUDGET", value_name = "N")]
    pub isolation_budget: Option<usize>,

    /// How long an undelivered payload is kept before it becomes a dead letter [default: 4days].
    #[arg(long, env = "TRIBUTARY_RETENTION", value_name = "DURATION")]
    pub retention: Option<HumanDuration>,

    /// SQLite durability: full (fsync per group commit) or normal [default: full].
    #[arg(long, env = "TRIBUTARY_SPOOL_SYNC", value_name = "MODE")]
    pub spool_sync: Option<SyncMode>,

    /// Bearer tokens clients must present (`Authorization: Bearer T`), comma-separated.
    /// A blank token is refused at start [default: none: no authentication].
    #[arg(
        long,
        env = "TRIBUTARY_AUTH_TOKENS",
        value_name = "T1,T2",
        value_delimiter = ','
    )]
    pub auth_tokens: Option<Vec<String>>,

    /// File of bearer tokens, one per line (blank lines and lines starting with `#` are
    /// skipped), instead of or beside --auth-tokens: keeps them off the command line.
    #[arg(long, env = "TRIBUTARY_AUTH_TOKENS_FILE", value_name = "FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Request-body bytes all requests together may hold in memory while they arrive;
    /// past it requests get 503 + Retry-After [default: 134217728].
    #[arg(long, env = "TRIBUTARY_MAX_BUFFERED_BYTES", value_name = "BYTES")]
    pub max_buffered_bytes: Option<usize>,

    /// Ingest requests handled at once; past it requests get 503 + Retry-After [default: 512].
    #[arg(long, env = "TRIBUTARY_MAX_CONCURRENT_REQUESTS", value_name = "N")]
    pub max_concurrent_requests: Option<usize>,

    /// Longest time a request body may take to arrive; past it the request gets 408
    /// [default: 30s].
    #[arg(long, env = "TRIBUTARY_BODY_TIMEOUT", value_name = "DURATION")]
    pub body_timeout: Option<HumanDuration>,

    /// Client connections open at once; more are closed at once. Kept below the open-file
    /// limit, which the relay raises to its hard limit at start [default: 10000, or what
    /// the file limit leaves].
    #[arg(long, env = "TRIBUTARY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Longest wait for a complete request head, idle keep-alive connections included;
    /// then the connection is closed [default: 10s].
    #[arg(long, env = "TRIBUTARY_HEADER_TIMEOUT", value_name = "DURATION")]
    pub header_timeout: Option<HumanDuration>,

    /// Most header bytes buffered per connection [default: 65536].
    #[arg(long, env = "TRIBUTARY_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,

    /// Concurrent HTTP/2 streams per connection [default: 32].
    #[arg(long, env = "TRIBUTARY_H2_MAX_STREAMS", value_name = "N")]
    pub h2_max_streams: Option<u32>,

    /// How long shutdown keeps forwarding before it exits [default: 10s]. What is left stays
    /// spooled for the next start.
    #[arg(long, env = "TRIBUTARY_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<HumanDuration>,

    /// How long a forwarder holds payloads it is sending before another forwarder may take
    /// them (the SQS visibility timeout of a receive) [default: 6 × request-timeout, at
    /// least 1m]. Must outlast one send with its retries, or payloads are sent twice.
    #[arg(long, env = "TRIBUTARY_LEASE_TIMEOUT", value_name = "DURATION")]
    pub lease_timeout: Option<HumanDuration>,

    /// SQS spool: dead-letter queue, name or URL [default: the target of the queue's
    /// redrive policy, if any].
    #[arg(long, env = "TRIBUTARY_SQS_DEAD_LETTER_QUEUE", value_name = "QUEUE")]
    pub sqs_dead_letter_queue: Option<String>,

    /// SQS spool: dead-letter a message received more than this many times; 0 = never
    /// [default: 0]. Each retry during an upstream outage is a receive: keep it above
    /// retention / max-retry-delay.
    #[arg(long, env = "TRIBUTARY_SQS_MAX_RECEIVES", value_name = "N")]
    pub sqs_max_receives: Option<u32>,

    /// SQS spool: long-polling wait of a forwarder's first receive, 0s to 20s [default: 1s].
    #[arg(long, env = "TRIBUTARY_SQS_WAIT_TIME", value_name = "DURATION")]
    pub sqs_wait_time: Option<HumanDuration>,

    /// SQS spool: receives in flight at once while filling a lease, 10 messages each
    /// [default: 8].
    #[arg(long, env = "TRIBUTARY_SQS_RECEIVERS", value_name = "N")]
    pub sqs_receivers: Option<usize>,

    /// SQS spool: largest message in bytes; payloads are split by visitors to fit
    /// [default: 262144]. Queues created since 2025 accept up to 1048576.
    #[arg(long, env = "TRIBUTARY_SQS_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub sqs_max_message_bytes: Option<usize>,
}

/// The resolved relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// US upstream URL.
    pub upstream: String,
    /// EU upstream URL.
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
    pub flush_interval: Duration,
    /// Upstream requests in flight.
    pub concurrency: usize,
    /// Upstream request timeout.
    pub request_timeout: Duration,
    /// Cap on the delay before a failed payload is retried.
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
    pub body_timeout: Duration,
    /// Client connections at once, if set (else what the file limit leaves, at most 10,000).
    pub max_connections: Option<usize>,
    /// Longest wait for a request head.
    pub header_timeout: Duration,
    /// Header bytes buffered per connection.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection.
    pub h2_max_streams: u32,
    /// Retention before dead-lettering.
    pub retention: Duration,
    /// SQLite sync mode.
    pub spool_sync: SyncMode,
    /// Accepted bearer tokens; empty means no auth.
    pub auth_tokens: Vec<String>,
    /// Shutdown drain time.
    pub shutdown_grace: Duration,
    /// How long a forwarder's lease hides payloads from other forwarders.
    pub lease_timeout: Duration,
    /// SQS dead-letter queue (name or URL), if set.
    pub sqs_dead_letter_queue: Option<String>,
    /// SQS receive count past which a message is dead-lettered; 0 = never.
    pub sqs_max_receives: u32,
    /// SQS long-polling wait.
    pub sqs_wait_time: Duration,
    /// SQS receives in flight per lease.
    pub sqs_receivers: usize,
    /// SQS message size limit.
    pub sqs_max_message_bytes: usize,
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
}

impl RelaySettings {
    /// Reads a TOML file of settings (kebab-case keys, as the flags without `--`).
    pub fn from_file(path: &Path) -> Result<RelaySettings, ConfigError> {
        let text = read_small(path, "config file").map_err(|e| match e {
            Small::Io(source) => ConfigError::Read {
                path: path.to_owned(),
                source,
            },
            Small::Unfit(message) => ConfigError::Unfit {
                path: path.to_owned(),
                message,
            },
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Resolves `self` (flags and env) over `file` over the defaults.
    pub fn resolve(self, file: RelaySettings) -> Result<RelayConfig, ConfigError> {
        let pick_d = |a: Option<HumanDuration>, b: Option<HumanDuration>, d: Duration| {
            a.or(b).map_or(d, |h| h.0)
        };
        let config = RelayConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            upstream: self
                .upstream
                .or(file.upstream)
                .unwrap_or_else(|| tributary::Region::Us.endpoint().to_owned()),
            eu_upstream: self
                .eu_upstream
                .or(file.eu_upstream)
                .unwrap_or_else(|| tributary::Region::Eu.endpoint().to_owned()),
            spool: self
                .spool
                .or(file.spool)
                .unwrap_or_else(|| "./tributary-spool".to_owned()),
            max_body_bytes: self
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(16 << 20),
            max_batch_bytes: self
                .max_batch_bytes
                .or(file.max_batch_bytes)
                .unwrap_or(tributary::MAX_PAYLOAD_BYTES),
            max_batch_events: self
                .max_batch_events
                .or(file.max_batch_events)
                .unwrap_or(10_000),
            flush_interval: pick_d(
                self.flush_interval,
                file.flush_interval,
                Duration::from_secs(1),
            ),
            concurrency: self.concurrency.or(file.concurrency).unwrap_or(4),
            request_timeout: pick_d(
                self.request_timeout,
                file.request_timeout,
                Duration::from_secs(10),
            ),
            max_retry_delay: pick_d(
                self.max_retry_delay,
                file.max_retry_delay,
                Duration::from_secs(300),
            ),
            spool_max_bytes: self
                .spool_max_bytes
                .or(file.spool_max_bytes)
                .unwrap_or(1 << 30),
            spool_reserve_bytes: self
                .spool_reserve_bytes
                .or(file.spool_reserve_bytes)
                .unwrap_or(64 << 20),
            isolation_budget: self
                .isolation_budget
                .or(file.isolation_budget)
                .unwrap_or(1000),
            max_buffered_bytes: self
                .max_buffered_bytes
                .or(file.max_buffered_bytes)
                .unwrap_or(128 << 20),
            max_concurrent_requests: self
                .max_concurrent_requests
                .or(file.max_concurrent_requests)
                .unwrap_or(512),
            body_timeout: pick_d(
                self.body_timeout,
                file.body_timeout,
                Duration::from_secs(30),
            ),
            max_connections: self.max_connections.or(file.max_connections),
            header_timeout: pick_d(
                self.header_timeout,
                file.header_timeout,
                Duration::from_secs(10),
            ),
            max_header_bytes: self
                .max_header_bytes
                .or(file.max_header_bytes)
                .unwrap_or(64 << 10),
            h2_max_streams: self.h2_max_streams.or(file.h2_max_streams).unwrap_or(32),
            retention: pick_d(
                self.retention,
                file.retention,
                Duration::from_secs(4 * 24 * 3600),
            ),
            spool_sync: self
                .spool_sync
                .or(file.spool_sync)
                .unwrap_or(SyncMode::Full),
            auth_tokens: auth_tokens(
                self.auth_tokens.or(file.auth_tokens),
                self.auth_tokens_file.or(file.auth_tokens_file).as_deref(),
            )?,
            shutdown_grace: pick_d(
                self.shutdown_grace,
                file.shutdown_grace,
                Duration::from_secs(10),
            ),
            lease_timeout: Duration::ZERO,
            sqs_dead_letter_queue: self.sqs_dead_letter_queue.or(file.sqs_dead_letter_queue),
            sqs_max_receives: self.sqs_max_receives.or(file.sqs_max_receives).unwrap_or(0),
            sqs_wait_time: pick_d(
                self.sqs_wait_time,
                file.sqs_wait_time,
                Duration::from_secs(1),
            ),
            sqs_receivers: self.sqs_receivers.or(file.sqs_receivers).unwrap_or(8),
            sqs_max_message_bytes: self
                .sqs_max_message_bytes
                .or(file.sqs_max_message_bytes)
                .unwrap_or(262_144),
        };
        // A lease must outlast one send with its in-request retries.
        let lease_default = (config.request_timeout * 6).max(Duration::from_secs(60));
        let config = RelayConfig {
            lease_timeout: pick_d(self.lease_timeout, file.lease_timeout, lease_default),
            ..config
        };
        config.check()?;
        Ok(config)
    }
}

/// Most bytes a config or token file may have: such files are small, and `/dev/zero` is not
/// one.
const MAX_SETTINGS_FILE_BYTES: u64 = 1 << 20;

enum Small {
    Io(std::io::Error),
    Unfit(String),
}

/// Reads a small regular text file, refusing devices, pipes and anything over 1 MiB.
fn read_small(path: &Path, what: &str) -> Result<String, Small> {
    let meta = std::fs::metadata(path).map_err(Small::Io)?;
    if !meta.is_file() {
        return Err(Small::Unfit(format!("a {what} must be a regular file")));
    }
    if meta.len() > MAX_SETTINGS_FILE_BYTES {
        return Err(Small::Unfit(format!(
            "{} bytes; a {what} may have at most {MAX_SETTINGS_FILE_BYTES}",
            meta.len()
        )));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(Small::Io)?,
            MAX_SETTINGS_FILE_BYTES,
        ),
        &mut text,
    )
    .map_err(Small::Io)?;
    Ok(text)
}

/// The accepted tokens from the flag and the file. Authentication fails closed: a blank
/// token, or a file that holds none, is an error, never "no authentication".
fn auth_tokens(
    listed: Option<Vec<String>>,
    file: Option<&Path>,
) -> Result<Vec<String>, ConfigError> {
    let invalid = |name, message: String| ConfigError::Invalid { name, message };
    let mut tokens = Vec::new();
    if let Some(listed) = listed {
        for t in listed {
            let t = t.trim();
            if t.is_empty() {
                return Err(invalid(
                    "auth-tokens",
                    "holds a blank token (a stray comma or space?); every token must be non-empty"
                        .into(),
                ));
            }
            tokens.push(t.to_owned());
        }
    }
    if let Some(path) = file {
        let text = read_small(path, "token file").map_err(|e| {
            let why = match e {
                Small::Io(e) => e.to_string(),
                Small::Unfit(m) => m,
            };
            invalid("auth-tokens-file", format!("{}: {why}", path.display()))
        })?;
        let before = tokens.len();
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
        if tokens.len() == before {
            return Err(invalid(
                "auth-tokens-file",
                format!("{} holds no token", path.display()),
            ));
        }
    }
    if tokens.iter().any(|t| t.chars().any(char::is_whitespace)) {
        return Err(invalid(
            "auth-tokens",
            "a token may not contain spaces (a bearer token is one word)".into(),
        ));
    }
    Ok(tokens)
}

/// Checks an upstream URL with a real URL parser: http or https, a host, a valid port.
fn check_url(name: &'static str, url: &str) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { name, message };
    let shown = tributary::dispatcher::transport::redact_url(url);
    let parsed =
        reqwest::Url::parse(url).map_err(|e| invalid(format!("{shown:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!("{shown:?} is not an http(s) URL")));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{shown:?} has no host")));
    }
    Ok(())
}

impl RelayConfig {
    fn check(&self) -> Result<(), ConfigError> {
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
        if self.max_body_bytes < 1024 {
            return invalid("max-body-bytes", "must be at least 1024");
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
        if self.sqs_wait_time > Duration::from_secs(20) {
            return invalid("sqs-wait-time", "must be at most 20s");
        }
        if self.sqs_receivers == 0 || self.sqs_receivers > 64 {
            return invalid("sqs-receivers", "must be between 1 and 64");
        }
        if !(4096..=1_048_576).contains(&self.sqs_max_message_bytes) {
            return invalid("sqs-max-message-bytes", "must be between 4096 and 1048576");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_win_over_file_over_defaults() {
        let file: RelaySettings = toml::from_str(
            "upstream = \"http://file.example/v1/events\"\nconcurrency = 8\nflush-interval = \"250ms\"",
        )
        .unwrap();
        let flags = RelaySettings {
            concurrency: Some(2),
            ..Default::default()
        };
        let c = flags.resolve(file).unwrap();
        assert_eq!(c.concurrency, 2);
        assert_eq!(c.upstream, "http://file.example/v1/events");
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!(c.max_batch_bytes, 3_500_000);
        assert_eq!(c.retention, Duration::from_secs(345_600));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = toml::from_str::<RelaySettings>("concurency = 8").unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
        let bad = RelaySettings {
            upstream: Some("ftp://x".into()),
            ..Default::default()
        };
        let err = bad.resolve(RelaySettings::default()).unwrap_err();
        assert!(err.to_string().contains("upstream"), "{err}");
    }

    fn refused(s: RelaySettings, name: &str) -> String {
        let err = s.resolve(RelaySettings::default()).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        err
    }

    #[test]
    fn careless_values_are_refused_with_their_name() {
        for url in [
            "http://",
            "http://a b/v1/events",
            "http://h:99999/",
            "file:///x",
            "relay:8080",
        ] {
            refused(
                RelaySettings {
                    upstream: Some(url.into()),
                    ..Default::default()
                },
                "upstream",
            );
        }
        let err = refused(
            RelaySettings {
                upstream: Some("http://user:hunter2@:99999/".into()),
                ..Default::default()
            },
            "upstream",
        );
        assert!(!err.contains("hunter2"), "{err}");
        refused(
            RelaySettings {
                spool: Some("".into()),
                ..Default::default()
            },
            "spool",
        );
        refused(
            RelaySettings {
                spool_max_bytes: Some(0),
                ..Default::default()
            },
            "spool-max-bytes",
        );
        refused(
            RelaySettings {
                max_retry_delay: Some(HumanDuration(Duration::ZERO)),
                ..Default::default()
            },
            "max-retry-delay",
        );
        refused(
            RelaySettings {
                flush_interval: Some(HumanDuration(Duration::from_nanos(1))),
                ..Default::default()
            },
            "flush-interval",
        );
        // A budget too small to reach one visitor of the largest batch: 2·⌈log2 10000⌉ = 28.
        let err = refused(
            RelaySettings {
                isolation_budget: Some(27),
                ..Default::default()
            },
            "isolation-budget",
        );
        assert!(err.contains("between 28"), "{err}");
        let c = RelaySettings {
            isolation_budget: Some(8),
            max_batch_events: Some(16),
            ..Default::default()
        }
        .resolve(RelaySettings::default())
        .unwrap();
        assert_eq!(c.isolation_budget, 8);
    }

    #[test]
    fn authentication_fails_closed() {
        for tokens in [
            vec!["".to_owned()],
            vec![" ".to_owned()],
            vec!["a".to_owned(), "".to_owned()],
        ] {
            refused(
                RelaySettings {
                    auth_tokens: Some(tokens),
                    ..Default::default()
                },
                "auth-tokens",
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# no tokens here\n\n").unwrap();
        refused(
            RelaySettings {
                auth_tokens_file: Some(empty),
                ..Default::default()
            },
            "auth-tokens-file",
        );
        let good = dir.path().join("tokens");
        std::fs::write(&good, "# team a\nt-one\n\n  t-two  \n").unwrap();
        let c = RelaySettings {
            auth_tokens: Some(vec!["t-zero".into()]),
            auth_tokens_file: Some(good),
            ..Default::default()
        }
        .resolve(RelaySettings::default())
        .unwrap();
        assert_eq!(c.auth_tokens, ["t-zero", "t-one", "t-two"]);
    }

    #[test]
    fn a_config_file_must_be_a_small_regular_file() {
        let err = RelaySettings::from_file(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
        let err = RelaySettings::from_file(&big).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }
}
