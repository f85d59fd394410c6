//! The settings as one source gives them ([`RelaySettings`]: the flags with their
//! environment variables, or the `--config` file), and layered over the one set of defaults
//! ([`LayeredSettings`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tributary_spool::{Compression, SqliteConfig, SqsConfig, SyncMode};

use super::ConfigError;

/// A duration written the human way: `500ms`, `30s`, `5m`, `4days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A [`Duration`] field (de)serialized as a [`HumanDuration`] string.
pub(super) mod human {
    use super::{Deserialize, Duration, HumanDuration, Serialize};

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        HumanDuration(*d).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        HumanDuration::deserialize(d).map(|h| h.0)
    }
}

/// The settings one source gives, shared by `serve`, `drain` and `spool`: the flags with
/// their `TRIBUTARY_*` variables (clap puts a flag over its variable), or the `--config`
/// file. A field left `None` is not set by that source. The defaults are in
/// [`LayeredSettings::default`] and `--help` shows them (see [`document_defaults`]).
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RelaySettings {
    /// Address to accept Event API payloads on.
    #[arg(long, env = "TRIBUTARY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Where `POST /v1/events` payloads go.
    // The value may hold a password: --help never shows it.
    #[arg(
        long,
        env = "TRIBUTARY_UPSTREAM",
        value_name = "URL",
        hide_env_values = true
    )]
    pub upstream: Option<String>,

    /// Where `POST /eu/v1/events` payloads go.
    #[arg(
        long,
        env = "TRIBUTARY_EU_UPSTREAM",
        value_name = "URL",
        hide_env_values = true
    )]
    pub eu_upstream: Option<String>,

    /// Spool: a directory for the embedded SQLite spool, or sqs://QUEUE (a name or a queue
    /// URL) for AWS SQS.
    #[arg(long, env = "TRIBUTARY_SPOOL", value_name = "DIR|sqs://QUEUE")]
    pub spool: Option<String>,

    /// Largest request body accepted, after decompression, in bytes. Payloads over
    /// max-batch-bytes are accepted and split by visitors.
    #[arg(long, env = "TRIBUTARY_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Largest payload sent upstream, in bytes; the default is the Event API's limit.
    #[arg(long, env = "TRIBUTARY_MAX_BATCH_BYTES", value_name = "BYTES")]
    pub max_batch_bytes: Option<usize>,

    /// Most visitors (events) in one upstream payload.
    #[arg(long, env = "TRIBUTARY_MAX_BATCH_EVENTS", value_name = "N")]
    pub max_batch_events: Option<usize>,

    /// How long a payload may wait for others to merge with.
    #[arg(long, env = "TRIBUTARY_FLUSH_INTERVAL", value_name = "DURATION")]
    pub flush_interval: Option<HumanDuration>,

    /// Upstream requests in flight at once.
    #[arg(long, env = "TRIBUTARY_CONCURRENCY", value_name = "N")]
    pub concurrency: Option<usize>,

    /// Upstream request timeout.
    #[arg(long, env = "TRIBUTARY_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<HumanDuration>,

    /// Longest wait before a failed payload is tried again.
    #[arg(long, env = "TRIBUTARY_MAX_RETRY_DELAY", value_name = "DURATION")]
    pub max_retry_delay: Option<HumanDuration>,

    /// Spool size limit in bytes; past it ingest answers 503.
    #[arg(long, env = "TRIBUTARY_SPOOL_MAX_BYTES", value_name = "BYTES")]
    pub spool_max_bytes: Option<u64>,

    /// SQLite spool: free space kept on its file system for delivery; ingest answers 503
    /// once less than this (plus twice the request) is left, so the forwarder can always
    /// lease, acknowledge and checkpoint, and free the disk.
    #[arg(long, env = "TRIBUTARY_SPOOL_RESERVE_BYTES", value_name = "BYTES")]
    pub spool_reserve_bytes: Option<u64>,

    /// Most upstream requests one forwarding cycle spends isolating the visitors the
    /// upstream refuses (400, 413, 422). What is not isolated when it runs out is sent again
    /// a second later in smaller batches; it is never dead-lettered.
    #[arg(long, env = "TRIBUTARY_ISOLATION_BUDGET", value_name = "N")]
    pub isolation_budget: Option<usize>,

    /// How long an undelivered payload is kept before it becomes a dead letter.
    #[arg(long, env = "TRIBUTARY_RETENTION", value_name = "DURATION")]
    pub retention: Option<HumanDuration>,

    /// SQLite durability: full (fsync per group commit, survives power loss) or normal
    /// (fsync at checkpoints, survives a crash of the relay).
    #[arg(
        long,
        env = "TRIBUTARY_SPOOL_SYNC",
        value_name = "MODE",
        value_parser = clap::builder::TypedValueParser::try_map(
            clap::builder::PossibleValuesParser::new(["full", "normal"]),
            |s| s.parse::<SyncMode>(),
        ),
    )]
    pub spool_sync: Option<SyncMode>,

    /// How the SQLite spool stores visitor runs: zstd (compressed, kept only where smaller;
    /// the file is several times smaller and durable ingest faster) or none (as received,
    /// readable with the sqlite3 shell). Limits count bytes as received either way; rows
    /// already stored keep their encoding.
    #[arg(
        long,
        env = "TRIBUTARY_SPOOL_COMPRESSION",
        value_name = "CODEC",
        value_parser = clap::builder::TypedValueParser::try_map(
            clap::builder::PossibleValuesParser::new(["zstd", "none"]),
            |s| s.parse::<Compression>(),
        ),
    )]
    pub spool_compression: Option<Compression>,

    /// Bearer tokens clients must present (`Authorization: Bearer T`), comma-separated.
    /// A blank token is refused at start.
    #[arg(
        long,
        env = "TRIBUTARY_AUTH_TOKENS",
        hide_env_values = true,
        value_name = "T1,T2",
        value_delimiter = ','
    )]
    pub auth_tokens: Option<Vec<String>>,

    /// File of bearer tokens, one per line (blank lines and lines starting with `#` are
    /// skipped), instead of or beside --auth-tokens: keeps them off the command line.
    #[arg(long, env = "TRIBUTARY_AUTH_TOKENS_FILE", value_name = "FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Request-body bytes all requests together may hold in memory while they arrive;
    /// past it requests get 503 + Retry-After.
    #[arg(long, env = "TRIBUTARY_MAX_BUFFERED_BYTES", value_name = "BYTES")]
    pub max_buffered_bytes: Option<usize>,

    /// Ingest requests handled at once; past it requests get 503 + Retry-After.
    #[arg(long, env = "TRIBUTARY_MAX_CONCURRENT_REQUESTS", value_name = "N")]
    pub max_concurrent_requests: Option<usize>,

    /// Longest time a request body may take to arrive; past it the request gets 408.
    #[arg(long, env = "TRIBUTARY_BODY_TIMEOUT", value_name = "DURATION")]
    pub body_timeout: Option<HumanDuration>,

    /// Client connections open at once; more are closed at once. Kept below the open-file
    /// limit, which the relay raises to its hard limit at start.
    #[arg(long, env = "TRIBUTARY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Longest wait for a complete request head, idle keep-alive connections included;
    /// then the connection is closed.
    #[arg(long, env = "TRIBUTARY_HEADER_TIMEOUT", value_name = "DURATION")]
    pub header_timeout: Option<HumanDuration>,

    /// Most header bytes buffered per connection.
    #[arg(long, env = "TRIBUTARY_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,

    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "TRIBUTARY_H2_MAX_STREAMS", value_name = "N")]
    pub h2_max_streams: Option<u32>,

    /// How long shutdown keeps forwarding before it exits. What is left stays spooled for
    /// the next start.
    #[arg(long, env = "TRIBUTARY_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<HumanDuration>,

    /// How long a forwarder holds payloads it is sending before another forwarder may take
    /// them (the SQS visibility timeout of a receive). Must outlast one send with its
    /// retries, or payloads are sent twice.
    #[arg(long, env = "TRIBUTARY_LEASE_TIMEOUT", value_name = "DURATION")]
    pub lease_timeout: Option<HumanDuration>,

    /// SQS spool: dead-letter queue, name or URL.
    #[arg(long, env = "TRIBUTARY_SQS_DEAD_LETTER_QUEUE", value_name = "QUEUE")]
    pub sqs_dead_letter_queue: Option<String>,

    /// SQS spool: dead-letter a message received more than this many times; 0 = never.
    /// Each retry during an upstream outage is a receive, as often as every
    /// max-retry-delay / 2 (the delay is jittered): keep it above
    /// 2 × retention / max-retry-delay.
    #[arg(long, env = "TRIBUTARY_SQS_MAX_RECEIVES", value_name = "N")]
    pub sqs_max_receives: Option<u32>,

    /// SQS spool: long-polling wait of a forwarder's first receive, 0s to 20s.
    #[arg(long, env = "TRIBUTARY_SQS_WAIT_TIME", value_name = "DURATION")]
    pub sqs_wait_time: Option<HumanDuration>,

    /// SQS spool: receives in flight at once while filling a lease, 10 messages each.
    #[arg(long, env = "TRIBUTARY_SQS_RECEIVERS", value_name = "N")]
    pub sqs_receivers: Option<usize>,

    /// SQS spool: largest message in bytes; payloads are split by visitors to fit. Queues
    /// created since 2025 accept up to 1048576.
    #[arg(long, env = "TRIBUTARY_SQS_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub sqs_max_message_bytes: Option<usize>,

    /// Privacy: visitor attributes with these keys are removed before anything is
    /// spooled. Not with allow-attributes.
    #[arg(
        long,
        env = "TRIBUTARY_DROP_ATTRIBUTES",
        value_name = "KEY,...",
        value_delimiter = ','
    )]
    pub drop_attributes: Option<Vec<String>>,

    /// Privacy: only visitor attributes with these keys (and the SDKs' reserved `$opt_*`)
    /// are kept. Not with drop-attributes.
    #[arg(
        long,
        env = "TRIBUTARY_ALLOW_ATTRIBUTES",
        value_name = "KEY,...",
        value_delimiter = ','
    )]
    pub allow_attributes: Option<Vec<String>>,

    /// Privacy: replace each visitor_id by the lowercase hex HMAC-SHA256 of it under the
    /// key in hash-key-file, the same on every relay with the same key.
    #[arg(
        long,
        env = "TRIBUTARY_HASH_VISITOR_IDS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub hash_visitor_ids: Option<bool>,

    /// Privacy: the HMAC key for hash-visitor-ids: the file's bytes, without a trailing
    /// newline.
    #[arg(long, env = "TRIBUTARY_HASH_KEY_FILE", value_name = "FILE")]
    pub hash_key_file: Option<PathBuf>,

    /// Drop an event whose uuid the relay accepted within this long (a retry after a
    /// lost acknowledgement); 0s turns the filter off. Durable on the SQLite spool.
    #[arg(long, env = "TRIBUTARY_DEDUP_WINDOW", value_name = "DURATION")]
    pub dedup_window: Option<HumanDuration>,

    /// Most event uuids the duplicate filter keeps in memory (about 100 bytes each).
    #[arg(long, env = "TRIBUTARY_DEDUP_CACHE_UUIDS", value_name = "N")]
    pub dedup_cache_uuids: Option<usize>,

    /// Most event uuids the duplicate filter keeps on disk (dedup.db beside the spool,
    /// about 60 bytes each); the oldest go first.
    #[arg(long, env = "TRIBUTARY_DEDUP_MAX_UUIDS", value_name = "N")]
    pub dedup_max_uuids: Option<u64>,

    /// Fair share: once an account_id's pending payloads would pass this many bytes, its
    /// requests get 429 + Retry-After while other accounts are still accepted. SQLite
    /// spool only.
    #[arg(
        long,
        env = "TRIBUTARY_MAX_PENDING_BYTES_PER_ACCOUNT",
        value_name = "BYTES"
    )]
    pub max_pending_bytes_per_account: Option<u64>,

    /// Fair share: requests per second each bearer token may send (a token bucket); past
    /// it, 429 + Retry-After. Needs auth-tokens.
    #[arg(long, env = "TRIBUTARY_TOKEN_RATE_LIMIT", value_name = "REQ/S")]
    pub token_rate_limit: Option<f64>,

    /// Fair share: requests a token may send at once above its rate (the bucket's size).
    #[arg(long, env = "TRIBUTARY_TOKEN_BURST", value_name = "N")]
    pub token_burst: Option<u32>,

    /// Metrics: distinct account_id values that get a label of their own (besides the
    /// accounts of [[privacy.account]] tables, which always do); later ones are counted
    /// under account="other", so a client cannot grow /metrics without bound.
    #[arg(long, env = "TRIBUTARY_MAX_ACCOUNT_LABELS", value_name = "N")]
    pub max_account_labels: Option<usize>,

    /// Privacy rules of single accounts, from the file only (`[[privacy.account]]`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyTable>,
}

/// Client connections at once when `max-connections` is not set, if the open-file limit
/// leaves that many.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default `lease-timeout` is this many request timeouts...
pub const LEASE_PER_REQUEST_TIMEOUT: u32 = 6;

/// ...and at least this long.
pub const MIN_DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Every setting, with the sources layered over the defaults ([`LayeredSettings::layer`]).
/// The settings still `None` here have no default value: their default is described by
/// [`described_default`] and decided where it is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LayeredSettings {
    /// [`RelaySettings::listen`].
    pub listen: SocketAddr,
    /// [`RelaySettings::upstream`].
    pub upstream: String,
    /// [`RelaySettings::eu_upstream`].
    pub eu_upstream: String,
    /// [`RelaySettings::spool`].
    pub spool: String,
    /// [`RelaySettings::max_body_bytes`].
    pub max_body_bytes: usize,
    /// [`RelaySettings::max_batch_bytes`].
    pub max_batch_bytes: usize,
    /// [`RelaySettings::max_batch_events`].
    pub max_batch_events: usize,
    /// [`RelaySettings::flush_interval`].
    #[serde(with = "human")]
    pub flush_interval: Duration,
    /// [`RelaySettings::concurrency`].
    pub concurrency: usize,
    /// [`RelaySettings::request_timeout`].
    #[serde(with = "human")]
    pub request_timeout: Duration,
    /// [`RelaySettings::max_retry_delay`].
    #[serde(with = "human")]
    pub max_retry_delay: Duration,
    /// [`RelaySettings::spool_max_bytes`].
    pub spool_max_bytes: u64,
    /// [`RelaySettings::spool_reserve_bytes`].
    pub spool_reserve_bytes: u64,
    /// [`RelaySettings::isolation_budget`].
    pub isolation_budget: usize,
    /// [`RelaySettings::retention`].
    #[serde(with = "human")]
    pub retention: Duration,
    /// [`RelaySettings::spool_sync`].
    pub spool_sync: SyncMode,
    /// [`RelaySettings::spool_compression`].
    pub spool_compression: Compression,
    /// [`RelaySettings::auth_tokens`].
    pub auth_tokens: Option<Vec<String>>,
    /// [`RelaySettings::auth_tokens_file`].
    pub auth_tokens_file: Option<PathBuf>,
    /// [`RelaySettings::max_buffered_bytes`].
    pub max_buffered_bytes: usize,
    /// [`RelaySettings::max_concurrent_requests`].
    pub max_concurrent_requests: usize,
    /// [`RelaySettings::body_timeout`].
    #[serde(with = "human")]
    pub body_timeout: Duration,
    /// [`RelaySettings::max_connections`].
    pub max_connections: Option<usize>,
    /// [`RelaySettings::header_timeout`].
    #[serde(with = "human")]
    pub header_timeout: Duration,
    /// [`RelaySettings::max_header_bytes`].
    pub max_header_bytes: usize,
    /// [`RelaySettings::h2_max_streams`].
    pub h2_max_streams: u32,
    /// [`RelaySettings::shutdown_grace`].
    #[serde(with = "human")]
    pub shutdown_grace: Duration,
    /// [`RelaySettings::lease_timeout`].
    pub lease_timeout: Option<HumanDuration>,
    /// [`RelaySettings::sqs_dead_letter_queue`].
    pub sqs_dead_letter_queue: Option<String>,
    /// [`RelaySettings::sqs_max_receives`].
    pub sqs_max_receives: u32,
    /// [`RelaySettings::sqs_wait_time`].
    #[serde(with = "human")]
    pub sqs_wait_time: Duration,
    /// [`RelaySettings::sqs_receivers`].
    pub sqs_receivers: usize,
    /// [`RelaySettings::sqs_max_message_bytes`].
    pub sqs_max_message_bytes: usize,
    /// [`RelaySettings::drop_attributes`].
    pub drop_attributes: Option<Vec<String>>,
    /// [`RelaySettings::allow_attributes`].
    pub allow_attributes: Option<Vec<String>>,
    /// [`RelaySettings::hash_visitor_ids`].
    pub hash_visitor_ids: bool,
    /// [`RelaySettings::hash_key_file`].
    pub hash_key_file: Option<PathBuf>,
    /// [`RelaySettings::dedup_window`].
    #[serde(with = "human")]
    pub dedup_window: Duration,
    /// [`RelaySettings::dedup_cache_uuids`].
    pub dedup_cache_uuids: usize,
    /// [`RelaySettings::dedup_max_uuids`].
    pub dedup_max_uuids: u64,
    /// [`RelaySettings::max_pending_bytes_per_account`].
    pub max_pending_bytes_per_account: Option<u64>,
    /// [`RelaySettings::token_rate_limit`].
    pub token_rate_limit: Option<f64>,
    /// [`RelaySettings::token_burst`].
    pub token_burst: Option<u32>,
    /// [`RelaySettings::max_account_labels`].
    pub max_account_labels: usize,
    /// [`RelaySettings::privacy`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyTable>,
}

/// `[privacy]` in the config file: rules for single accounts.
///
/// ```toml
/// drop-attributes = ["email"]          # every account
///
/// [[privacy.account]]
/// account-id = "12133785640"
/// allow-attributes = ["country"]       # this account: only country (and $opt_*)
/// hash-visitor-ids = true
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrivacyTable {
    /// One table per account.
    #[serde(default)]
    pub account: Vec<AccountPrivacy>,
}

/// `[[privacy.account]]`: what it sets replaces the relay-wide rule for that account; what
/// it leaves out is the relay-wide rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AccountPrivacy {
    /// The `account_id` the rules are for.
    pub account_id: String,
    /// As drop-attributes, for this account.
    pub drop_attributes: Option<Vec<String>>,
    /// As allow-attributes, for this account.
    pub allow_attributes: Option<Vec<String>>,
    /// As hash-visitor-ids, for this account (the key is the relay's hash-key-file).
    pub hash_visitor_ids: Option<bool>,
}

impl Default for LayeredSettings {
    /// The one place each default is written (or taken from the crate whose setting it
    /// is). `--help` and `tributary serve --print-config` show these values.
    fn default() -> Self {
        let sqlite = SqliteConfig::default();
        let sqs = SqsConfig::new("");
        let forward = tributary_spool::forward::ForwarderConfig::default();
        let upstream = tributary_spool::forward::UpstreamConfig::default();
        LayeredSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstream: upstream.us,
            eu_upstream: upstream.eu,
            spool: "./tributary-spool".to_owned(),
            max_body_bytes: 16 << 20,
            max_batch_bytes: forward.max_batch_bytes,
            max_batch_events: forward.max_batch_events,
            flush_interval: forward.flush_interval,
            concurrency: forward.concurrency,
            request_timeout: upstream.request_timeout,
            max_retry_delay: forward.max_retry_delay,
            spool_max_bytes: sqlite.max_bytes,
            spool_reserve_bytes: sqlite.reserve_bytes,
            isolation_budget: forward.isolation_budget,
            retention: sqlite.retention,
            spool_sync: sqlite.sync,
            spool_compression: sqlite.compression,
            auth_tokens: None,
            auth_tokens_file: None,
            max_buffered_bytes: 128 << 20,
            max_concurrent_requests: 512,
            body_timeout: Duration::from_secs(30),
            max_connections: None,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            h2_max_streams: 32,
            shutdown_grace: Duration::from_secs(10),
            lease_timeout: None,
            sqs_dead_letter_queue: sqs.dead_letter_queue,
            sqs_max_receives: sqs.max_receives,
            sqs_wait_time: sqs.wait_time,
            sqs_receivers: sqs.receivers,
            sqs_max_message_bytes: sqs.max_message_bytes,
            drop_attributes: None,
            allow_attributes: None,
            hash_visitor_ids: false,
            hash_key_file: None,
            dedup_window: crate::dedup::DEFAULT_WINDOW,
            dedup_cache_uuids: crate::dedup::DEFAULT_CACHE_UUIDS,
            dedup_max_uuids: crate::dedup::DEFAULT_MAX_UUIDS,
            max_pending_bytes_per_account: None,
            token_rate_limit: None,
            token_burst: None,
            max_account_labels: crate::account_labels::DEFAULT_MAX_ACCOUNT_LABELS,
            privacy: None,
        }
    }
}

/// What `--help` says for the settings without a default value (`None` in
/// [`LayeredSettings::default`]), from the same constants that decide them. `key` is the
/// file key.
pub fn described_default(key: &str) -> Option<String> {
    Some(match key {
        "auth-tokens" => "none: no authentication".to_owned(),
        "auth-tokens-file" => "none".to_owned(),
        "max-connections" => {
            format!("{DEFAULT_MAX_CONNECTIONS}, or what the open-file limit leaves")
        }
        "lease-timeout" => format!(
            "{LEASE_PER_REQUEST_TIMEOUT} × request-timeout, at least {}",
            HumanDuration(MIN_DEFAULT_LEASE)
        ),
        "sqs-dead-letter-queue" => "the target of the queue's redrive policy, if any".to_owned(),
        "drop-attributes" | "allow-attributes" => "none: every attribute is kept".to_owned(),
        "hash-key-file" => "none".to_owned(),
        "max-pending-bytes-per-account" => "none: no quota per account".to_owned(),
        "token-rate-limit" => "none: no limit per token".to_owned(),
        "token-burst" => "the rate, at least 1".to_owned(),
        _ => return None,
    })
}

impl LayeredSettings {
    /// `sources` over the defaults, each over the ones before it: a setting a source sets
    /// replaces what the earlier ones said, one it leaves `None` keeps it. This is serde's
    /// view of the structs, so no setting needs code of its own here.
    pub fn layer(sources: &[&RelaySettings]) -> Result<LayeredSettings, ConfigError> {
        let mut merged = object(&LayeredSettings::default())?;
        for source in sources {
            merged.extend(object(source)?.into_iter().filter(|(_, v)| !v.is_null()));
        }
        serde_json::from_value(Value::Object(merged)).map_err(ConfigError::layering)
    }

    /// The lease: `lease-timeout` if set, else `LEASE_PER_REQUEST_TIMEOUT` (6) request
    /// timeouts and at least `MIN_DEFAULT_LEASE` (1 minute), so that it outlasts one send with its
    /// in-request retries.
    pub fn lease_timeout(&self) -> Duration {
        self.lease_timeout.map_or_else(
            || {
                self.request_timeout
                    .checked_mul(LEASE_PER_REQUEST_TIMEOUT)
                    .unwrap_or(Duration::MAX)
                    .max(MIN_DEFAULT_LEASE)
            },
            |h| h.0,
        )
    }
}

/// `value` as a JSON object: setting name to value, `null` when not set.
fn object(value: &impl Serialize) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::to_value(value).map_err(ConfigError::layering)? {
        Value::Object(map) => Ok(map),
        other => Err(ConfigError::Layering(format!("not a table: {other}"))),
    }
}

/// Appends `[default: X]` to the help of every setting in `cmd` and its subcommands, X as
/// [`LayeredSettings::default`] has it (or [`described_default`]), so the help cannot
/// drift from the defaults. A setting is an argument named after a [`RelaySettings`] field
/// that reads the matching `TRIBUTARY_*` variable.
pub fn document_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = object(&LayeredSettings::default()).unwrap_or_default();
    let text = |key: &str| match defaults.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) | None => described_default(key),
        Some(v) => Some(v.to_string()),
    };
    walk(cmd, &text)
}

fn walk(cmd: clap::Command, text: &dyn Fn(&str) -> Option<String>) -> clap::Command {
    let mut cmd = cmd.mut_args(|arg| {
        let key = arg.get_id().as_str().replace('_', "-");
        let env = format!("TRIBUTARY_{}", arg.get_id().as_str().to_uppercase());
        if arg.get_env().is_none_or(|e| e != env.as_str()) {
            return arg;
        }
        let Some(default) = text(&key) else {
            return arg;
        };
        let with = |help: &clap::builder::StyledStr| format!("{help} [default: {default}]");
        let help = arg.get_help().map(with);
        let long = arg.get_long_help().map(with);
        let arg = match help {
            Some(h) => arg.help(h),
            None => arg,
        };
        match long {
            Some(h) => arg.long_help(h),
            None => arg,
        }
    });
    for sub in cmd.get_subcommands_mut() {
        *sub = walk(std::mem::take(sub), text);
    }
    cmd
}
